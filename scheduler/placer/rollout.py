"""Rolling updates: which replicas of an older generation stay as they are this pass.

A deployment changed (model, engine, image, args, env, GPUs, memory, CPUs) gets a new
generation. Replacing every replica at once left the model unavailable while the new
engines loaded. Instead a serving replica is replaced only while every replica of the new
generation serves and none is missing, one at a time, lowest index first; replicas of an
older generation that serve nothing (crashed, still starting, lost) are replaced at once,
since keeping them saves no capacity. A new generation that cannot start so stalls with
the old replicas still serving, instead of taking the model down.

Pure: the placer passes what etcd holds and how to tell a serving replica.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from common.generation import generation
from common.records import AssignmentRecord, DeploymentRecord


def held_back(deployments: Mapping[str, DeploymentRecord],
              assignments: Iterable[AssignmentRecord],
              serving: Callable[[AssignmentRecord], bool]) -> dict[str, set[int]]:
    """Per deployment, the replica indexes whose older-generation assignment is kept.

    ``serving(a)`` says whether ``a``'s backend is ready in ``a``'s own generation (a
    container being replaced still reports the old one). Only replicas the deployment still
    wants (index below its count) count; a deployment with nothing held is left out.
    """
    mine: dict[str, list[AssignmentRecord]] = {}
    for a in assignments:
        d = deployments.get(a.deployment)
        if d is not None and 0 <= a.replica < d.replicas:
            mine.setdefault(a.deployment, []).append(a)
    out: dict[str, set[int]] = {}
    for name, group in sorted(mine.items()):
        d = deployments[name]
        gen = generation(d)
        old = sorted(a.replica for a in group if a.generation != gen and serving(a))
        if not old:
            continue
        settled = len({a.replica for a in group}) >= d.replicas and all(
            serving(a) for a in group if a.generation == gen)
        held = set(old[1:] if settled else old)
        if held:
            out[name] = held
    return out
