"""Rolling updates: which replicas of an older generation stay as they are this pass, and
which one gets its successor started beside it.

A deployment changed (model, engine, image, args, env, GPUs, memory, CPUs) gets a new
generation. Replacing every replica at once left the model unavailable while the new
engines loaded. Instead a serving replica is replaced only while every replica of the new
generation serves and none is missing, one at a time, lowest index first. Its successor is
started first on another node where one has room (a surge): the old replica serves until
the new one does, then drains (scheduler/placer/service.py). With no room elsewhere it is
replaced in place, one replica fewer serving meanwhile. Replicas of an older generation
that serve nothing (crashed, still starting, lost) are replaced at once, since keeping them
saves no capacity. A new generation that cannot start so stalls with the old replicas still
serving, instead of taking the model down.

Pure: the placer passes what etcd holds and how to tell a serving replica.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from common.generation import generation
from common.records import AssignmentRecord, DeploymentRecord


@dataclass(slots=True)
class Rollout:
    """Per deployment: the replica indexes whose older assignment is kept as it is, and the
    one (among them) whose successor is to be placed beside it now."""

    held: dict[str, set[int]] = field(default_factory=dict)
    surge: dict[str, int] = field(default_factory=dict)

    def in_place(self, deployments: Iterable[str]) -> Rollout:
        """The same rollout with these deployments' surges replaced in place instead (no
        room for them on another node)."""
        names = set(deployments)
        held = {n: s - {self.surge[n]} if n in names and n in self.surge else set(s)
                for n, s in self.held.items()}
        return Rollout({n: s for n, s in held.items() if s},
                       {n: i for n, i in self.surge.items() if n not in names})


def plan_rollout(deployments: Mapping[str, DeploymentRecord],
                 assignments: Iterable[AssignmentRecord],
                 serving: Callable[[AssignmentRecord], bool],
                 draining: Iterable[AssignmentRecord] = ()) -> Rollout:
    """What a rolling update does this pass, for every deployment with older replicas.

    ``assignments`` are those placement may keep; ``draining`` the replicas draining (an
    older one whose successor serves drains before the next step, so that its GPUs are free
    for the next surge). ``serving(a)`` says whether ``a``'s backend is ready in ``a``'s own
    generation (a container being replaced still reports the old one). Only replicas the
    deployment still wants (index below its count) count.
    """
    busy = {a.deployment for a in draining
            if (d := deployments.get(a.deployment)) is not None
            and a.generation != generation(d)}
    mine: dict[str, list[AssignmentRecord]] = {}
    for a in assignments:
        d = deployments.get(a.deployment)
        if d is not None and 0 <= a.replica < d.replicas:
            mine.setdefault(a.deployment, []).append(a)
    out = Rollout()
    for name, group in sorted(mine.items()):
        d = deployments[name]
        gen = generation(d)
        old = sorted({a.replica for a in group if a.generation != gen and serving(a)})
        if not old:
            continue
        fresh = [a for a in group if a.generation == gen]
        settled = name not in busy and len({a.replica for a in group}) >= d.replicas \
            and all(serving(a) for a in fresh)
        out.held[name] = set(old)
        if settled:
            succeeded = {a.replica for a in fresh}
            nxt = next((i for i in old if i not in succeeded), None)
            if nxt is not None:
                out.surge[name] = nxt
    return out
