"""Which groups own the GPU device nodes, by number.

A container reaches /dev/kfd and /dev/dri/renderD* only as a member of the group that owns
them (udev's 50-udev-default.rules makes renderD* ``render`` and card* ``video``; /dev/kfd is
``render`` on current distributions, ``video`` on older ones: ROCm's install docs ask for
both). ``docker run --group-add video`` resolves the name in the *image's* /etc/group,
so an engine image without those names cannot start. The gid read from the node itself
(stat(2)) needs no name and is right whatever the host's udev rules chose.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

from common.records import GpuRecord

KFD = "/dev/kfd"


def device_nodes(gpus: Sequence[GpuRecord]) -> list[str]:
    """The device nodes a container would be given for these GPUs (AMD and Intel)."""
    nodes = [KFD] if any(g.vendor == "amd" for g in gpus) else []
    for g in gpus:
        nodes += [n for n in (g.render_node, g.card_node) if n]
    return nodes


def device_gids(nodes: Iterable[str], dev_root: str = "/dev") -> dict[str, int]:
    """The owning gid of each node that exists (``/dev/x`` read as ``{dev_root}/x``, so a
    test or a containerised agent can point at another tree); absent ones are left out."""
    gids: dict[str, int] = {}
    for node in nodes:
        rel = node.removeprefix("/dev/") if node.startswith("/dev/") else node.lstrip("/")
        try:
            gids[node] = os.stat(os.path.join(dev_root, rel)).st_gid
        except OSError:
            continue
    return gids
