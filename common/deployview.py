"""What each deployment looks like now, built from etcd records; one view for every reader.

``aivmmctl deployments --json``, ``aivmmctl status`` and the scheduler's ``/v1/cluster``
all show the same thing, so it is built here once from the records (docs/operations.md:
aivmmctl deployments): the operator's :class:`DeploymentRecord`, the placer's
:class:`PlacementStatus` and :class:`AssignmentRecord` s, and the agents'
:class:`BackendRecord` s. Records that do not parse are skipped and counted, never raised.

Environment values are not shown (they may hold tokens and ``/v1/cluster`` can be public):
only their names.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from common.generation import generation
from common.keys import Keys
from common.records import (
    AssignmentRecord,
    BackendRecord,
    DeploymentRecord,
    PlacementStatus,
    parse_assignment,
    parse_backend,
    parse_deployment,
    parse_each,
    parse_placement,
    to_dict,
)

GIB = 2**30


class PrefixReader(Protocol):
    async def get_prefix(self, prefix: str) -> Any: ...


@dataclass(slots=True)
class DeploymentRecords:
    """The parsed deployment, placement and assignment records, and how many did not parse."""

    deployments: list[DeploymentRecord] = field(default_factory=list)
    placements: dict[str, PlacementStatus] = field(default_factory=dict)
    assignments: list[AssignmentRecord] = field(default_factory=list)
    skipped: int = 0


def parse_records(deployments: Iterable[bytes], placements: Iterable[bytes],
                  assignments: Iterable[bytes]) -> DeploymentRecords:
    """Parse raw record values; each one that is unusable is counted in ``skipped``."""
    out = DeploymentRecords()
    out.deployments, bad_d = parse_each(deployments, parse_deployment)
    statuses, bad_p = parse_each(placements, parse_placement)
    out.placements = {p.deployment: p for p in statuses}
    out.assignments, bad_a = parse_each(assignments, parse_assignment)
    out.skipped += bad_d + bad_p + bad_a
    return out


def parse_backends(values: Iterable[bytes]) -> tuple[list[BackendRecord], int]:
    """Backend records and how many did not parse."""
    return parse_each(values, parse_backend)


async def read_records(store: PrefixReader, keys: Keys) -> DeploymentRecords:
    """Read deployments, placement statuses and assignments (three range reads at once)."""
    deployments, placements, assignments = await asyncio.gather(
        store.get_prefix(keys.deployments), store.get_prefix(keys.placements),
        store.get_prefix(keys.assignments))
    return parse_records([kv.value for kv in deployments.items],
                         [kv.value for kv in placements.items],
                         [kv.value for kv in assignments.items])


def _replica(a: AssignmentRecord, backend: BackendRecord | None, current: str
              ) -> dict[str, Any]:
    return {
        "replica": a.replica, "node": a.node, "backend": a.name, "assigned": True,
        "engine": a.engine, "vendor": a.vendor, "gpus": list(a.gpus),
        "memory_bytes": a.memory_bytes,
        "memory_gib": None if a.memory_bytes is None else round(a.memory_bytes / GIB, 2),
        "state": None if backend is None else backend.state,
        "error": None if backend is None else backend.error,
        "generation": a.generation,
        # False while a rolling update has not reached this replica (docs/deployments.md).
        "current": a.generation == current,
        **download_fields(backend),
    }


def _leftover(b: BackendRecord) -> dict[str, Any]:
    """A backend of the deployment with no assignment: being removed (an old placement)."""
    return {
        "replica": None, "node": b.node, "backend": b.name, "assigned": False,
        "engine": b.engine, "vendor": b.vendor, "gpus": [], "memory_bytes": None,
        "memory_gib": None, "state": b.state, "error": b.error, "generation": None,
        "current": False, **download_fields(b),
    }


def deployment_views(records: DeploymentRecords,
                     backends: Iterable[BackendRecord]) -> list[dict[str, Any]]:
    """One JSON-ready dict per deployment, sorted by name (the shape is documented in
    docs/operations.md and is the same for aivmmctl and /v1/cluster).

    ``placed`` counts the deployment's assignments, ``ready`` its backend records in state
    ready; ``pending`` and ``reasons`` are the placer's (``pending`` is None until the
    placer has reported on the deployment).
    """
    by_key: dict[tuple[str, str], BackendRecord] = {}
    of_deployment: dict[str, list[BackendRecord]] = {}
    for b in backends:
        by_key[(b.node, b.name)] = b
        if b.deployment is not None:
            of_deployment.setdefault(b.deployment, []).append(b)
    assigned: dict[str, list[AssignmentRecord]] = {}
    for a in records.assignments:
        assigned.setdefault(a.deployment, []).append(a)
    views = []
    for d in sorted(records.deployments, key=lambda d: d.name):
        mine = sorted(assigned.get(d.name, []), key=lambda a: (a.replica, a.node))
        taken = {(a.node, a.name) for a in mine}
        gen = generation(d)
        replicas = [_replica(a, by_key.get((a.node, a.name)), gen) for a in mine]
        own = sorted(of_deployment.get(d.name, []), key=lambda b: (b.node, b.name))
        replicas += [_leftover(b) for b in own if (b.node, b.name) not in taken]
        status = records.placements.get(d.name)
        views.append({
            "name": d.name, "model": d.model, "engine": d.engine, "policy": d.placement,
            # An autoscaled deployment wants what the autoscaler last decided.
            "desired": d.replicas if d.autoscale is None or status is None
            or status.desired is None else status.desired,
            "autoscale": None if d.autoscale is None else to_dict(d.autoscale),
            "placed": len(mine),
            "ready": sum(1 for b in own if b.state == "ready"),
            "pending": None if status is None else status.pending,
            "reasons": [] if status is None else list(status.reasons),
            "placer": None if status is None else (status.placer or None),
            "placement_updated_at": None if status is None else status.updated_at,
            "request": {"gpus": d.gpus, "memory_bytes": d.memory_bytes,
                        "vendors": list(d.vendors), "nodes": list(d.nodes),
                        "labels": dict(d.labels), "cpus": d.cpus},
            "image": d.image, "args": list(d.args), "env": sorted(d.env),
            "created_at": d.created_at, "updated_at": d.updated_at,
            "replicas": replicas,
            "rollout": _rollout(d, gen, mine, by_key),
        })
    return views


def _rollout(d: DeploymentRecord, gen: str, mine: list[AssignmentRecord],
             by_key: dict[tuple[str, str], BackendRecord]) -> dict[str, int] | None:
    """A rolling update's progress: replicas serving the new generation (ready, in its
    container of that generation) of those wanted; None when no replica is of an older
    one."""
    if all(a.generation == gen for a in mine):
        return None
    done = 0
    for a in mine:
        b = by_key.get((a.node, a.name))
        if a.generation == gen and b is not None and b.state == "ready" \
                and b.generation in (None, gen):
            done += 1
    return {"done": done, "of": d.replicas}


def download_fields(b: BackendRecord | None) -> dict[str, Any]:
    """A downloading replica's progress (docs/models.md): bytes, rate, ETA in seconds."""
    if b is None or b.state != "downloading":
        return {"bytes_done": None, "bytes_total": None, "download_rate": None,
                "eta_s": None}
    return {"bytes_done": b.bytes_done, "bytes_total": b.bytes_total,
            "download_rate": b.download_rate,
            "eta_s": eta_s(b.bytes_done, b.bytes_total, b.download_rate)}


def eta_s(done: int | None, total: int | None, rate: float | None) -> float | None:
    if done is None or total is None or not rate or rate <= 0:
        return None
    return round(max(0, total - done) / rate, 1)


def _bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def _duration(s: float) -> str:
    s = int(s)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def download_text(done: int | None, total: int | None, rate: float | None) -> str:
    """``downloading 42% of 140.0 GiB, 310.2 MiB/s, ETA 4m10s`` (what aivmmctl shows)."""
    if total is None:
        return "downloading"
    part = f"{100 * (done or 0) / total:.0f}% of {_bytes(total)}" if total else "0 B"
    rate_text = f", {_bytes(rate)}/s" if rate else ""
    eta = eta_s(done, total, rate)
    return f"downloading {part}{rate_text}" + ("" if eta is None else f", ETA {_duration(eta)}")


def pending_text(view: dict[str, Any]) -> str:
    """The pending column: a rolling update's progress, then what is not placed: the count
    and the placer's reasons; '' when all is placed and current."""
    rollout = view.get("rollout")
    parts = [f"rolling update: {rollout['done']}/{rollout['of']} on the new generation"] \
        if rollout else []
    pending = view["pending"]
    if pending is None:
        short = view["desired"] - view["placed"]
        if short > 0:
            parts.append(f"{short}: waiting for the placer")
    elif pending:
        parts.append(f"{pending}: " + ("; ".join(view["reasons"]) or "no reason given"))
    return "; ".join(parts)


def gpus_text(replica: dict[str, Any]) -> str:
    """A replica's GPUs: '0,1', or '0 (20.0 GiB)' when it reserves memory on a shared GPU."""
    text = ",".join(str(i) for i in replica["gpus"]) or "-"
    if replica["memory_gib"] is not None:
        text += f" ({replica['memory_gib']:.1f} GiB)"
    return text
