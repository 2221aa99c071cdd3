"""Kernel uevents of the DRM subsystem, bridged to asyncio.

The monitor listens to the kernel's own netlink group ("kernel" source), so it works where
no udevd runs (containers, minimal hosts). The socket is non-blocking and watched with
``loop.add_reader``: no thread, nothing blocking on the loop. A containerised agent only
receives uevents in the host's network namespace (``--network host``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pyudev


def open_monitor(subsystem: str = "drm") -> pyudev.Monitor:
    """A started kernel-uevent monitor for ``subsystem``; raises OSError where netlink is
    not available (no permission, no libudev)."""
    try:
        context = pyudev.Context()
        monitor = pyudev.Monitor.from_netlink(context, source="kernel")
        monitor.filter_by(subsystem)
        monitor.start()
    except ImportError as err:  # pyudev could not load libudev
        raise OSError(str(err)) from err
    return monitor


async def uevents(monitor: pyudev.Monitor) -> AsyncIterator[str]:
    """Yield the action ("add", "remove", "change", …) of each uevent the monitor receives."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[str] = asyncio.Queue()

    def drain() -> None:
        # Called when the socket is readable; poll(0) never blocks.
        while (device := monitor.poll(timeout=0)) is not None:
            queue.put_nowait(device.action or "change")

    fd = monitor.fileno()
    loop.add_reader(fd, drain)
    try:
        while True:
            yield await queue.get()
    finally:
        loop.remove_reader(fd)
