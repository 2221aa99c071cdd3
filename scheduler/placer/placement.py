"""Deployments to assignments: which node and GPUs each replica gets, as a pure function.

Capacity is what assignments and pinned backends reserve, never the live memory reading: a
decision must not wobble with load, and an engine that is still loading shows little use.
Valid assignments are kept exactly as they are, because the placer runs on every change and
every moved replica is a container restarted somewhere.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from common.engines import ENGINE_VENDORS, engine_for
from common.generation import generation
from common.records import (
    VENDORS,
    AssignmentRecord,
    DeploymentRecord,
    GpuRecord,
    NodeRecord,
    PlacementStatus,
    Vendor,
    deployment_problem,
)

GIB = 1 << 30
Mode = Literal["none", "whole", "memory"]
# A node's rank for one deployment (lowest first): its cost per hour under the "cost" policy
# (0 under the others), then two figures of the policy; the node's name ends it, so ties are
# broken by name and the heap never compares anything else.
Score = tuple[float, int, int, str]


@dataclass(frozen=True, slots=True)
class Placement:
    """The full desired set of assignments (sorted by key) and a status per deployment."""

    assignments: list[AssignmentRecord]
    status: dict[str, PlacementStatus]
    # Deployments whose surge replica (``place(surge=...)``) found no room on another node.
    surge_failed: frozenset[str] = frozenset()


def assignment_key(a: AssignmentRecord) -> str:
    """The assignment's key below ``{prefix}/assignments/``: the order results are sorted in."""
    return f"{a.node}/{a.name}"


@dataclass(slots=True, eq=False)
class _Gpu:
    record: GpuRecord
    pinned: bool
    whole: bool = False  # taken whole by an assignment
    mem_used: int = 0  # reserved by memory-mode assignments
    # Memory-mode replicas per deployment, so spread can keep them on different GPUs.
    replicas: dict[str, int] = field(default_factory=dict)

    def wholly_free(self) -> bool:
        return not self.pinned and not self.whole and self.mem_used == 0

    def avail(self) -> int:
        """Memory a memory-mode replica may still reserve (0: full or unknown)."""
        total = self.record.memory_total_bytes
        if total is None or self.pinned or self.whole:
            return 0
        return max(total - self.mem_used, 0)


@dataclass(slots=True, eq=False)
class _Node:
    record: NodeRecord
    gpus: dict[int, _Gpu]  # offered GPUs only: integrated ones are never placed on
    replicas: dict[str, int] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.record.node


@dataclass(slots=True, eq=False)
class _Want:
    """A deployment, resolved against the fleet: what its replicas need and may use."""

    d: DeploymentRecord
    gen: str
    mode: Mode
    vendors: tuple[Vendor, ...]  # eligible GPU vendors (empty in mode "none")
    nodes: list[_Node]  # eligible nodes for new replicas, by name
    # Nodes where a replica may stay: those eligible, and those avoided after another
    # replica's failed start there (a healthy replica is not moved for its neighbour).
    names: frozenset[str]
    # Why nothing of this deployment can be placed whatever the load; None: it can try.
    blocked: str | None = None
    # Why no new replica can go anywhere, while existing ones may stay.
    nowhere: str | None = None


def place(deployments: Sequence[DeploymentRecord], nodes: Sequence[NodeRecord],
          current: Sequence[AssignmentRecord], *, reserved: Mapping[str, Collection[str]],
          drained: Collection[str] = frozenset(),
          avoid: Mapping[str, Collection[str]] | None = None, now: float,
          holding: Sequence[AssignmentRecord] = (),
          removing: Mapping[str, Collection[str]] | None = None,
          held_back: Mapping[str, Collection[int]] | None = None,
          surge: Mapping[str, int] | None = None) -> Placement:
    """The assignments the fleet should run, and what could not be placed and why.

    ``nodes`` are the live nodes; ``current`` is what etcd holds now; ``reserved`` maps a
    node to the uuids of GPUs its pinned backends hold; ``drained`` nodes and, per
    deployment, ``avoid`` nodes (a replica failed to start there) are not placed on, and
    their replicas move. Valid current assignments are kept unchanged; new ones get
    ``assigned_at=now``. Deployments are placed in name order. ``holding`` (replicas being
    drained) are not in the result but keep their GPUs or memory taken meanwhile.
    ``removing`` maps a node to the uuids of GPUs whose replica is gone but whose container
    is still being removed: no new replica goes there yet, and those kept stay.
    ``held_back`` maps a deployment to the replicas a rolling update has not reached yet:
    their assignments of an older generation are kept as they are, GPUs and all, where
    their node still takes them (scheduler/placer/rollout.py decides which). ``surge`` maps a
    deployment to one held replica whose successor of the current generation is placed now,
    beside it on another node; a surge with no room is named in ``surge_failed``.
    """
    avoid = avoid or {}
    fleet: dict[str, _Node] = {}
    for record in sorted(nodes, key=lambda n: n.node):
        if record.node in fleet:
            continue
        pinned = reserved.get(record.node, ())
        fleet[record.node] = _Node(record, {
            g.index: _Gpu(g, g.uuid in pinned) for g in record.gpus if not g.integrated})

    for a in holding:
        host = fleet.get(a.node)
        for index in a.gpus if host is not None else ():
            gpu = host.gpus.get(index) if host is not None else None
            if gpu is None:
                continue
            if a.memory_bytes is not None:
                gpu.mem_used += a.memory_bytes
            else:
                gpu.whole = True

    wants: dict[str, _Want] = {}
    status: dict[str, PlacementStatus] = {}
    for d in sorted(deployments, key=lambda d: d.name):
        if d.name in wants or d.name in status:
            continue
        problem = deployment_problem(d)
        if problem:
            status[d.name] = PlacementStatus(d.name, 0, max(d.replicas, 0), [problem],
                                             updated_at=now)
            continue
        wants[d.name] = _resolve(d, fleet, len(nodes), drained, avoid.get(d.name, ()))

    result: list[AssignmentRecord] = []
    kept: dict[str, set[int]] = {name: set() for name in wants}
    # During a rolling update a replica may have two assignments: its held older one and
    # its successor (a surge), on another node. One of each kind is kept per replica.
    slots: set[tuple[str, int, bool]] = set()
    old_node: dict[tuple[str, int], str] = {}
    for a in sorted(current, key=lambda a: (a.deployment, a.replica, a.node)):
        w = wants.get(a.deployment)
        if w is None or w.blocked or a.replica >= w.d.replicas or a.replica < 0:
            continue
        stale = a.generation != w.gen
        if (a.deployment, a.replica, stale) in slots:
            continue
        gpus = _still_valid(a, w, fleet.get(a.node))
        if gpus is None and stale and a.replica in (held_back or {}).get(a.deployment, ()):
            gpus = _as_recorded(a, w, fleet.get(a.node))
            if gpus is None:
                continue
            _take(fleet[a.node], gpus, w, a.memory_bytes)
            old_node[(a.deployment, a.replica)] = a.node
        elif gpus is None:
            continue
        else:
            _take(fleet[a.node], gpus, w)
        slots.add((a.deployment, a.replica, stale))
        kept[a.deployment].add(a.replica)
        result.append(a)

    # After the keeping: a replica sharing a GPU with one being removed is not moved for it.
    for node_name, uuids in (removing or {}).items():
        host = fleet.get(node_name)
        for gpu in host.gpus.values() if host is not None else ():
            if gpu.record.uuid in uuids:
                gpu.whole = True

    short: list[_Want] = []
    for name, w in wants.items():
        missing = [r for r in range(w.d.replicas) if r not in kept[name]]
        placed, reason = _place_replicas(w, missing, fleet, now, result)
        total = len(kept[name]) + placed
        status[name] = PlacementStatus(name, total, w.d.replicas - total,
                                       [reason] if reason else [], updated_at=now)
        if reason and not w.blocked:
            short.append(w)
    # Surges come after every missing replica: they add capacity, the others restore it.
    surge_failed = set()
    for name, replica in sorted((surge or {}).items()):
        w = wants.get(name)
        beside = old_node.get((name, replica))
        if w is None or beside is None or (name, replica, False) in slots:
            continue
        placed, _ = _place_replicas(w, [replica], fleet, now, result, exclude=beside)
        if not placed:
            surge_failed.add(name)
    # A shortfall is measured on the fleet as every deployment left it, not as it was when
    # this one was placed: a deployment placed later may have taken what was free then.
    for w in short:
        status[w.d.name].reasons = [_shortfall(w)]

    result.sort(key=assignment_key)
    return Placement(result, dict(sorted(status.items())), frozenset(surge_failed))


def _resolve(d: DeploymentRecord, fleet: Mapping[str, _Node], alive: int,
             drained: Collection[str], avoided: Collection[str]) -> _Want:
    """What ``d`` may use: its GPU vendors and nodes, or the reason it can use nothing."""
    gen = generation(d)
    mode: Mode = "memory" if d.memory_bytes is not None else "whole" if d.gpus else "none"

    def blocked(reason: str) -> _Want:
        return _Want(d, gen, mode, (), [], frozenset(), reason)

    if d.engine == "custom" and not d.image:
        return blocked("engine 'custom' needs an image")
    runs = _engine_vendors(d.engine)
    if runs is None:
        return blocked(f"unknown engine '{d.engine}'")
    vendors: tuple[Vendor, ...] = ()
    if mode == "none":
        if engine_for(d.engine, None) is None:
            return blocked(f"engine '{d.engine}' needs a GPU; the deployment asks for none "
                           "(gpus 0)")
    else:
        vendors = tuple(v for v in runs if not d.vendors or v in d.vendors)
        if not vendors:
            return blocked(f"engine '{d.engine}' runs on {_either(runs)}; the deployment "
                           f"allows only {_either(d.vendors)}")

    matching = [n for n in fleet.values()
                if (not d.nodes or n.name in d.nodes)
                and all(n.record.labels.get(k) == v for k, v in d.labels.items())
                and (d.cpus is None or n.record.cpu_count is None
                     or n.record.cpu_count >= d.cpus)]
    if not matching:
        if not fleet:
            return blocked("no node alive")
        wanted = []
        if d.nodes:
            wanted.append("nodes " + ", ".join(sorted(d.nodes)))
        if d.labels:
            wanted.append("labels " + ", ".join(f"{k}={v}" for k, v in sorted(d.labels.items())))
        if d.cpus is not None:
            wanted.append(f"at least {d.cpus:g} CPUs")
        return blocked(f"no node matches: {' and '.join(wanted)} ({alive} nodes alive)")
    usable = [n for n in matching if n.name not in drained]
    eligible = [n for n in usable if n.name not in avoided]
    nowhere = None
    if not eligible:
        n_drained = len(matching) - len(usable)
        n_avoided = len(usable)
        parts = [f"{n_drained} drained"] if n_drained else []
        if n_avoided:
            parts.append(f"{n_avoided} avoided after a failed start")
        nowhere = f"no eligible node: {len(matching)} matching, {', '.join(parts)}"
        if not usable:
            return blocked(nowhere)

    w = _Want(d, gen, mode, vendors, eligible, frozenset(n.name for n in usable),
              nowhere=nowhere)
    if mode != "none" and not any(g.record.vendor in vendors
                                  for n in usable for g in n.gpus.values()):
        w.blocked = f"engine '{d.engine}' runs on {_either(runs)}; no eligible " \
                    f"{_either(vendors)} GPU"
    return w


def _engine_vendors(engine: str) -> tuple[Vendor, ...] | None:
    """The vendors ``engine`` runs on for deployments, or None for an unknown engine."""
    if engine == "auto" or engine == "sim":
        return tuple(v for v in VENDORS if engine_for(engine, v))
    return ENGINE_VENDORS.get(engine)


def _still_valid(a: AssignmentRecord, w: _Want, node: _Node | None) -> list[_Gpu] | None:
    """The GPUs ``a`` holds if it may be kept as it is; None if it must be placed again."""
    d = w.d
    if node is None or node.name not in w.names or a.generation != w.gen:
        return None
    if len(a.gpu_uuids) != len(a.gpus) or len(set(a.gpus)) != len(a.gpus):
        return None
    if w.mode == "none":
        ok = (not a.gpus and a.vendor is None and a.memory_bytes is None
              and a.engine == engine_for(d.engine, None))
        return [] if ok else None
    if a.vendor not in w.vendors or a.engine != engine_for(d.engine, a.vendor):
        return None
    if len(a.gpus) != (1 if w.mode == "memory" else d.gpus):
        return None
    gpus = _gpus_of(a, node)
    if gpus is None:
        return None
    if w.mode == "memory":
        mem = d.memory_bytes
        assert mem is not None
        return gpus if a.memory_bytes == mem and gpus[0].avail() >= mem else None
    return gpus if a.memory_bytes is None and all(g.wholly_free() for g in gpus) else None


def _gpus_of(a: AssignmentRecord, node: _Node) -> list[_Gpu] | None:
    """The node's GPUs ``a`` names, if each is still there with the same uuid and vendor."""
    gpus = []
    for index, uuid in zip(a.gpus, a.gpu_uuids, strict=True):
        gpu = node.gpus.get(index)
        if gpu is None or gpu.record.uuid != uuid or gpu.record.vendor != a.vendor:
            return None
        gpus.append(gpu)
    return gpus


def _as_recorded(a: AssignmentRecord, w: _Want, node: _Node | None) -> list[_Gpu] | None:
    """The GPUs an assignment of an older generation holds, if it may stay as it was made:
    its node still takes the deployment and its GPUs are there with room for it."""
    if node is None or node.name not in w.names:
        return None
    if len(a.gpu_uuids) != len(a.gpus) or len(set(a.gpus)) != len(a.gpus):
        return None
    gpus = _gpus_of(a, node)
    if gpus is None:
        return None
    if a.memory_bytes is not None:
        return gpus if len(gpus) == 1 and gpus[0].avail() >= a.memory_bytes else None
    return gpus if all(g.wholly_free() for g in gpus) else None


_OWN = -1  # ``_take``'s default: the memory the deployment itself asks for


def _take(node: _Node, gpus: list[_Gpu], w: _Want, memory: int | None = _OWN) -> None:
    """Reserve ``gpus`` on ``node`` for a replica of ``w``: whole, or ``memory`` bytes of
    each (by default what ``w`` asks; an older generation's replica gives its own)."""
    name = w.d.name
    node.replicas[name] = node.replicas.get(name, 0) + 1
    if memory == _OWN:
        memory = w.d.memory_bytes if w.mode == "memory" else None
    for gpu in gpus:
        if memory is not None:
            gpu.mem_used += memory
            gpu.replicas[name] = gpu.replicas.get(name, 0) + 1
        else:
            gpu.whole = True


def _place_replicas(w: _Want, missing: list[int], fleet: Mapping[str, _Node], now: float,
                    out: list[AssignmentRecord], exclude: str | None = None
                    ) -> tuple[int, str | None]:
    """Place these replicas of ``w`` (not on node ``exclude``); returns how many were placed
    and why not all."""
    if not missing:
        return 0, None
    if w.blocked:
        return 0, w.blocked
    score = _scorer(w)
    # Only this deployment's placements change the fleet while it is placed, and each one
    # changes only its node: a heap of node scores stays exact with one push per replica.
    heap = [s for n in w.nodes if n.name != exclude and (s := score(n)) is not None]
    heapq.heapify(heap)
    for placed, replica in enumerate(missing):
        if not heap:
            return placed, _shortfall(w)
        node = fleet[heapq.heappop(heap)[-1]]
        gpus = _choose(w, node)
        _take(node, gpus, w)
        out.append(_assignment(w, replica, node, gpus, now))
        again = score(node)
        if again is not None:
            heapq.heappush(heap, again)
    return len(missing), None


def _scorer(w: _Want) -> Callable[[_Node], Score | None]:
    """How nodes rank for ``w`` (lowest first); None for a node where a replica won't fit."""
    # "cost": the cheapest nodes that fit first (an unknown cost last), spread among equals.
    name, spread = w.d.name, w.d.placement in ("spread", "cost")
    vendors = w.vendors
    by_cost = w.d.placement == "cost"

    def price(node: _Node) -> float:
        cost = node.record.cost_per_hour
        return (math.inf if cost is None else cost) if by_cost else 0.0

    def no_gpu(node: _Node) -> Score:
        count = node.replicas.get(name, 0)
        return (price(node), count, 0, node.name) if spread else \
            (price(node), -count, 0, node.name)

    def whole(node: _Node) -> Score | None:
        free = dict.fromkeys(vendors, 0)
        for gpu in node.gpus.values():
            if gpu.record.vendor in free and gpu.wholly_free():
                free[gpu.record.vendor] += 1
        if max(free.values()) < w.d.gpus:
            return None
        total = sum(free.values())
        if spread:
            return (price(node), node.replicas.get(name, 0), -total, node.name)
        return (price(node), total, 0, node.name)

    def memory(node: _Node) -> Score | None:
        mem = w.d.memory_bytes
        assert mem is not None
        avail = [g.avail() for g in node.gpus.values() if g.record.vendor in vendors]
        fits = [a for a in avail if a >= mem]
        if not fits:
            return None
        if spread:
            return (price(node), node.replicas.get(name, 0), -sum(avail), node.name)
        return (price(node), min(fits), 0, node.name)  # best fit: the fullest GPU that fits

    return {"none": no_gpu, "whole": whole, "memory": memory}[w.mode]


def _choose(w: _Want, node: _Node) -> list[_Gpu]:
    """The GPUs of ``node`` a replica of ``w`` takes (the node's score said it fits)."""
    if w.mode == "none":
        return []
    eligible = sorted((g for g in node.gpus.values() if g.record.vendor in w.vendors),
                      key=lambda g: g.record.index)
    if w.mode == "whole":
        options = []
        for vendor in w.vendors:
            free = [g for g in eligible if g.record.vendor == vendor and g.wholly_free()]
            if len(free) >= w.d.gpus:
                options.append(free[:w.d.gpus])
        return min(options, key=lambda gs: [g.record.index for g in gs])
    mem = w.d.memory_bytes
    assert mem is not None
    fits = [g for g in eligible if g.avail() >= mem]
    if w.d.placement in ("spread", "cost"):
        return [min(fits, key=lambda g: (g.replicas.get(w.d.name, 0), -g.avail(),
                                         g.record.index))]
    return [min(fits, key=lambda g: (g.avail(), g.record.index))]


def _assignment(w: _Want, replica: int, node: _Node, gpus: list[_Gpu],
                now: float) -> AssignmentRecord:
    d = w.d
    vendor = gpus[0].record.vendor if gpus else None
    engine = engine_for(d.engine, vendor)
    assert engine is not None  # the eligible vendors were chosen so that it is
    return AssignmentRecord(
        deployment=d.name, replica=replica, node=node.name, model=d.model, engine=engine,
        vendor=vendor, gpus=[g.record.index for g in gpus],
        gpu_uuids=[g.record.uuid for g in gpus], memory_bytes=d.memory_bytes,
        image=d.image, args=list(d.args), env=dict(d.env), cpus=d.cpus, generation=w.gen,
        assigned_at=now)


def _shortfall(w: _Want) -> str:
    """One line naming what a replica of ``w`` lacks, measured on the eligible nodes."""
    if w.nowhere is not None:
        return w.nowhere
    d = w.d
    # Naming all three vendors says nothing ("auto" on any GPU): then name none.
    vendors = "" if set(w.vendors) == set(VENDORS) else _either(w.vendors) + " "
    if w.mode == "whole":
        most, where = 0, ""
        for node in w.nodes:
            for vendor in w.vendors:
                n = sum(g.record.vendor == vendor and g.wholly_free() for g in node.gpus.values())
                if n > most:
                    most, where = n, node.name
        plural = "s" if d.gpus > 1 else ""
        need = f"needs {d.gpus} whole {vendors}GPU{plural} on one node"
        if not most:
            return f"{need}; none free on {_nodes(len(w.nodes))}"
        return f"{need}; most free: {most} on {where}"
    mem = d.memory_bytes
    assert mem is not None
    need = f"needs {_gib(mem)} on one {vendors}GPU"
    sized = [(n, g) for n in w.nodes for g in n.gpus.values()
             if g.record.vendor in w.vendors and g.record.memory_total_bytes is not None]
    if not sized:
        return f"{need}; no eligible {vendors}GPU reports its memory size"
    node, gpu = min(sized, key=lambda ng: (-ng[1].avail(), ng[0].name, ng[1].record.index))
    return f"{need}; largest free: {_gib(gpu.avail())} on {node.name}/gpu{gpu.record.index}"


def _nodes(n: int) -> str:
    return f"{n} eligible node" if n == 1 else f"{n} eligible nodes"


def _gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


def _either(names: Sequence[str]) -> str:
    """"nvidia", "nvidia or amd", "nvidia, amd or intel"."""
    names = list(names)
    if len(names) <= 1:
        return "".join(names)
    return ", ".join(names[:-1]) + " or " + names[-1]
