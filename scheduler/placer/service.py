"""The placer as a service: an elected scheduler process turns deployments into assignments.

:class:`FleetView` is the placer's copy of the fleet (one etcd watch of the whole prefix),
:class:`StartFailures` decides where a replica that would not start must not go again, and
:func:`changes` is the diff between what etcd holds and what placement wants: all three are
pure and tested so. :class:`Placer` is the shell: it runs the election and, while leading,
places on every change and writes the difference in transactions fenced on its term.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from common import audit
from common.generation import generation
from common.keys import Keys
from common.records import (
    AssignmentRecord,
    AuditEntry,
    BackendRecord,
    DeploymentRecord,
    NodeRecord,
    PlacementStatus,
    RecordError,
    SchedulerLoad,
    dump,
    parse_assignment,
    parse_backend,
    parse_deployment,
    parse_load,
    parse_node,
    parse_placement,
)
from common.store import Event, Reset, StoreError, StoreUnavailable
from common.store_api import Store
from scheduler.placer.autoscale import Autoscaler
from scheduler.placer.election import Deposed, Election, Fence
from scheduler.placer.placement import Placement, place
from scheduler.placer.rollout import Rollout, plan_rollout

log = logging.getLogger(__name__)

# etcd allows 128 operations per transaction (--max-txn-ops); the fence compare is apart.
TXN_OPS = 120
# A draining replica's requests are counted only once its backend record says "draining"
# and this long has passed: the schedulers' routes and load records have caught up by then
# (load records are written every 2 s).
DRAIN_GRACE_S = 3.0
# While a deployment is autoscaled or a replica drains, the placer looks this often.
AUTOSCALE_TICK_S = 1.0


@dataclass(slots=True)
class FleetView:
    """What the placer knows, kept from the sync stream of the whole prefix."""

    keys: Keys
    on_bad_record: Callable[[str, str], None] = lambda key, why: None
    nodes: dict[str, NodeRecord] = field(default_factory=dict)
    deployments: dict[str, DeploymentRecord] = field(default_factory=dict)
    assignments: dict[str, AssignmentRecord] = field(default_factory=dict)  # by key
    backends: dict[str, BackendRecord] = field(default_factory=dict)  # by key
    statuses: dict[str, PlacementStatus] = field(default_factory=dict)  # by deployment
    loads: dict[str, SchedulerLoad] = field(default_factory=dict)  # by scheduler replica
    drained: set[str] = field(default_factory=set)
    synced: bool = False

    def apply(self, item: Reset | Event) -> bool:
        """Apply one item of the sync stream; whether placement may decide otherwise now.

        A node's heartbeat rewrites its record every few seconds with fresh GPU figures, and
        a backend's record moves with its probe latency and load; placement reads none of
        those, so such a write changes the view but asks for no new decision (at 1,000
        nodes, deciding on each cost half a core for nothing).
        """
        if isinstance(item, Reset):
            for every in (self.nodes, self.deployments, self.assignments, self.backends,
                          self.statuses, self.loads):
                every.clear()
            self.drained.clear()
            for kv in item.snapshot.items:
                self._put(kv.key, kv.value)
            self.synced = True
            return True
        table, name, _ = self._table(item.key)
        before = None if table is None else table.get(name)
        if item.kind == "delete":
            self._delete(item.key)
        else:
            self._put(item.key, item.value)
        if item.key.startswith(self.keys.drains):
            return True
        if table is None or table is self.loads:
            return False  # load is sampled by the autoscaler's tick, not placed on
        after = table.get(name)
        if before is None or after is None:
            return before is not after
        return bool(_placement_view(before) != _placement_view(after))

    def _table(self, key: str) -> tuple[dict[str, Any] | None, str, Callable[[bytes], Any]]:
        k = self.keys
        if key.startswith(k.nodes):
            return self.nodes, key.removeprefix(k.nodes), parse_node
        if key.startswith(k.deployments):
            return self.deployments, key.removeprefix(k.deployments), parse_deployment
        if key.startswith(k.assignments):
            return self.assignments, key, parse_assignment
        if key.startswith(k.backends):
            return self.backends, key, parse_backend
        if key.startswith(k.placements):
            return self.statuses, key.removeprefix(k.placements), parse_placement
        if key.startswith(k.loads):
            return self.loads, key.removeprefix(k.loads), parse_load
        return None, "", parse_node

    def _put(self, key: str, value: bytes) -> None:
        if key.startswith(self.keys.drains):
            self.drained.add(key.removeprefix(self.keys.drains))
            return
        table, name, parse = self._table(key)
        if table is None or not name:
            return
        try:
            table[name] = parse(value)
        except RecordError as err:
            # An unreadable record must not keep its old contents in the decision.
            table.pop(name, None)
            self.on_bad_record(key, str(err))

    def _delete(self, key: str) -> None:
        if key.startswith(self.keys.drains):
            self.drained.discard(key.removeprefix(self.keys.drains))
            return
        table, name, _ = self._table(key)
        if table is not None:
            table.pop(name, None)

    def reserved(self) -> dict[str, set[str]]:
        """GPUs (by uuid) held by pinned backends of agent.toml, per node."""
        out: dict[str, set[str]] = {}
        for b in self.backends.values():
            if b.deployment is None and b.gpus:
                out.setdefault(b.node, set()).update(b.gpus)
        return out

    def removing(self) -> dict[str, set[str]]:
        """GPUs (by uuid) of a deployment's backends whose assignment is gone, per node:
        their agent is still removing the container, which may hold the GPU's memory."""
        out: dict[str, set[str]] = {}
        for b in self.backends.values():
            if b.deployment is not None and b.gpus \
                    and self.keys.assignment(b.node, b.name) not in self.assignments:
                out.setdefault(b.node, set()).update(b.gpus)
        return out

    def backend_of(self, a: AssignmentRecord) -> BackendRecord | None:
        return self.backends.get(self.keys.backend(a.node, a.name))

    def serving(self, a: AssignmentRecord) -> bool:
        """Whether ``a``'s backend is ready in ``a``'s generation (not the container of an
        older one that its agent has yet to replace), or draining: it works and can be
        taken back (a replica drained for a successor that then crashed). An agent that
        reports no generation (older than this field) is taken at its word."""
        b = self.backend_of(a)
        return b is not None and b.state in ("ready", "draining") \
            and b.generation in (None, a.generation)


def _placement_view(record: Any) -> Any:
    """The part of a record that placement and failure tracking read."""
    if isinstance(record, NodeRecord):
        return (record.labels, record.cpu_count,
                [(g.index, g.uuid, g.vendor, g.integrated, g.memory_total_bytes)
                 for g in record.gpus])
    if isinstance(record, BackendRecord):
        return (record.state, record.gpus, record.deployment, record.restarts, record.generation,
                record.error)
    return record


@dataclass(slots=True)
class _Unready:
    since: float
    deployment: str = ""
    restarts: int = 0  # the backend's restart count when it stopped being ready
    assigned_at: float = 0.0  # its assignment's time: the timer runs from the later one
    # While the agent fetches the model (state "downloading", docs/models.md): since when,
    # the bytes last seen and when they last grew.
    downloading: bool = False
    download_since: float = 0.0
    progress: int = 0
    progress_at: float = 0.0


class StartFailures:
    """Where a deployment's replica must not be placed again for a while.

    A replica whose backend has not been ready for ``replace_after`` seconds since it was
    assigned (a missing image, an engine that cannot load the model) or that restarted
    ``max_restarts`` times without becoming ready is moved: its node is avoided for that
    deployment for ``avoid_base`` seconds, doubling at each new failure there up to
    ``avoid_max``. Healthy replicas are never moved by this.

    A replica whose agent is fetching the model ("downloading") is not timed by
    ``replace_after`` from its assignment: it is moved only when its ``bytes_done`` has not
    grown for ``replace_after`` seconds (a stalled or failing download) or it has been
    downloading for ``download_limit`` seconds; once the download ends, the engine's start
    is timed from then.
    """

    def __init__(self, *, replace_after: float, max_restarts: int = 3,
                 avoid_base: float = 60.0, avoid_max: float = 900.0,
                 download_limit: float = 6 * 3600.0, assignments: str = "") -> None:
        self.replace_after = replace_after
        # The etcd prefix of assignment keys: the statuses record the keys without it.
        self.assignments = assignments
        self.download_limit = download_limit
        self.max_restarts = max_restarts
        self.avoid_base = avoid_base
        self.avoid_max = avoid_max
        self._unready: dict[str, _Unready] = {}  # assignment key -> since when
        self._avoid: dict[tuple[str, str], float] = {}  # (deployment, node) -> until
        self._strikes: dict[tuple[str, str], int] = {}
        # Assignments given up on by the last observe(): placed again, elsewhere.
        self.given_up: set[str] = set()
        self._timers_restored = False  # this term has taken up the statuses' start timers

    def observe(self, view: FleetView, now: float) -> list[str]:
        """Note the replicas' states; returns a line for each replica given up on."""
        moved: list[str] = []
        self.given_up = set()
        seen: set[str] = set()
        for key, a in view.assignments.items():
            seen.add(key)
            backend = view.backend_of(a)
            if backend is not None and backend.state in ("ready", "draining"):
                self._unready.pop(key, None)
                continue
            if view.nodes.get(a.node) is None:
                continue  # a dead node's replicas move anyway
            restarts = backend.restarts if backend is not None else 0
            track = self._unready.setdefault(key, _Unready(
                since=max(now, 0.0), deployment=a.deployment, restarts=restarts))
            if backend is not None and backend.state == "downloading":
                done = backend.bytes_done or 0
                if not track.downloading:
                    track.downloading, track.download_since = True, now
                    track.progress, track.progress_at = done, now
                elif done > track.progress:
                    track.progress, track.progress_at = done, now
                if now - track.progress_at < self.replace_after and \
                        now - track.download_since < self.download_limit:
                    continue
            else:
                if track.downloading:  # fetched: the engine's start is timed from now
                    track.downloading, track.since = False, now
                track.assigned_at = a.assigned_at
                started = max(track.since, a.assigned_at)
                # Restarts since it stopped being ready: a lifetime total would move a
                # replica the first time it blinks after weeks of occasional crashes.
                recent = restarts - track.restarts
                if now - started < self.replace_after and recent < self.max_restarts:
                    continue
            pair = (a.deployment, a.node)
            strikes = self._strikes.get(pair, 0)
            self._strikes[pair] = strikes + 1
            hold = min(self.avoid_max, self.avoid_base * 2 ** strikes)
            self._avoid[pair] = now + hold
            self._unready.pop(key, None)
            self.given_up.add(key)
            why = ("no backend" if backend is None
                   else backend.error or f"{backend.state}, {restarts} restarts")
            moved.append(f"replica {a.name} did not start on {a.node} ({why}); "
                         f"placing it elsewhere, {a.node} avoided for {hold:g}s")
        for key in [k for k in self._unready if k not in seen]:
            del self._unready[key]
        return moved

    def avoid(self, now: float) -> dict[str, set[str]]:
        for pair in [p for p, until in self._avoid.items() if until <= now]:
            del self._avoid[pair]
        out: dict[str, set[str]] = {}
        for deployment, node in self._avoid:
            out.setdefault(deployment, set()).add(node)
        return out

    def of(self, deployment: str, now: float) -> tuple[dict[str, float], dict[str, int]]:
        """The nodes ``deployment`` avoids now (node: until) and its strikes per node, as
        its placement status records them."""
        avoid = {node: until for (d, node), until in sorted(self._avoid.items())
                 if d == deployment and until > now}
        strikes = {node: n for (d, node), n in sorted(self._strikes.items())
                   if d == deployment}
        return avoid, strikes

    def timers(self, deployment: str) -> tuple[dict[str, float], dict[str, int]]:
        """The start timers of ``deployment``'s replicas not ready yet (assignment key:
        since when) and their restart counts then, as its placement status records them.
        A download in progress is left out: it is timed by its progress, seen afresh."""
        tracks = sorted((k.removeprefix(self.assignments), t) for k, t in self._unready.items()
                        if t.deployment == deployment and not t.downloading)
        return {k: t.since for k, t in tracks}, {k: t.restarts for k, t in tracks}

    def placed(self, key: str, deployment: str, now: float, restarts: int = 0) -> None:
        """A replica was just assigned (key ``key``): its start is timed from ``now``, in
        the status written with the assignment, not one pass later in a second write."""
        self._unready[key] = _Unready(since=now, deployment=deployment, restarts=restarts)

    def new_term(self) -> None:
        """Leadership (re)gained: timers kept from an earlier term may be stale; the
        statuses in etcd, written by whoever led since, are taken up instead."""
        self._unready.clear()
        self._timers_restored = False

    def restore(self, statuses: Iterable[PlacementStatus], now: float) -> None:
        """Take up what an earlier leader recorded (:meth:`of`, :meth:`timers`), keeping
        what this one has. Timers are taken once per term: afterwards a status may lag
        this leader's own decisions (a replica just given up on would be timed again)."""
        take_timers = not self._timers_restored
        self._timers_restored = True
        for s in statuses:
            for node, until in s.avoid.items():
                if until > now:
                    self._avoid.setdefault((s.deployment, node), until)
            for node, n in s.strikes.items():
                self._strikes.setdefault((s.deployment, node), n)
            for key, since in s.unready_since.items() if take_timers else ():
                self._unready.setdefault(self.assignments + key, _Unready(
                    since=min(since, now), deployment=s.deployment,
                    restarts=s.unready_restarts.get(key, 0)))

    def next_deadline(self, now: float) -> float | None:
        """When the next decision may change with no event (an avoid ending, a timer), if
        one is still to come: a time already past would wake the placer at once, again and
        again, with nothing to decide."""
        times = [until for until in self._avoid.values()]
        times += [min(t.progress_at + self.replace_after,
                      t.download_since + self.download_limit) if t.downloading
                  else max(t.since, t.assigned_at) + self.replace_after
                  for t in self._unready.values()]
        future = [t for t in times if t > now]
        return min(future) if future else None


def _same_status(a: PlacementStatus, b: PlacementStatus) -> bool:
    return (a.placed, a.pending, a.reasons, a.desired, a.scaled_at, a.avoid, a.strikes,
            a.unready_since, a.unready_restarts) == \
        (b.placed, b.pending, b.reasons, b.desired, b.scaled_at, b.avoid, b.strikes,
         b.unready_since, b.unready_restarts)


@dataclass(frozen=True, slots=True)
class Changes:
    """The writes that bring etcd to a placement."""

    puts: list[tuple[str, bytes]]
    deletes: list[str]

    def __bool__(self) -> bool:
        return bool(self.puts or self.deletes)


def changes(keys: Keys, view: FleetView, assignments: Sequence[AssignmentRecord],
            statuses: Mapping[str, PlacementStatus]) -> Changes:
    """What to put and delete so that etcd holds ``assignments`` and ``statuses``."""
    puts: list[tuple[str, bytes]] = []
    deletes: list[str] = []
    wanted = {keys.assignment(a.node, a.name): a for a in assignments}
    for key, a in sorted(wanted.items()):
        if view.assignments.get(key) != a:
            puts.append((key, dump(a)))
    deletes += sorted(k for k in view.assignments if k not in wanted)
    for name, status in sorted(statuses.items()):
        old = view.statuses.get(name)
        if old is None or not _same_status(old, status):
            puts.append((keys.placement(name), dump(status)))
    deletes += sorted(keys.placement(n) for n in view.statuses if n not in statuses)
    return Changes(puts, deletes)


def _batches(c: Changes, first: Sequence[tuple[str, bytes]] = ()
             ) -> Iterable[tuple[list[tuple[str, bytes]], list[str]]]:
    # Deletes first: if the writes span transactions and the placer is deposed between two,
    # a replica may be missing for a moment, but no GPU is ever given twice. ``first`` (the
    # pass's audit entries) goes before them, into the first transaction.
    ops: list[tuple[str, bytes] | str] = [*first, *c.deletes, *c.puts]
    for i in range(0, len(ops), TXN_OPS):
        chunk = ops[i:i + TXN_OPS]
        yield ([op for op in chunk if isinstance(op, tuple)],
               [op for op in chunk if isinstance(op, str)])


def _replica_text(a: AssignmentRecord) -> str:
    text = f"{a.replica}@{a.node}:{','.join(str(g) for g in a.gpus) or '-'}"
    return text + " (draining)" if a.draining else text


def placement_audit(keys: Keys, view: FleetView, assignments: Sequence[AssignmentRecord],
                    given_up: Sequence[str], *, who: str, now: float,
                    deployments: Mapping[str, DeploymentRecord] | None = None
                    ) -> list[AuditEntry]:
    """One "place" entry per deployment whose assignments this pass changes, saying why
    where it can be told: its node gone or drained, a failed start, a scale, a change."""
    before: dict[str, dict[str, AssignmentRecord]] = {}
    after: dict[str, dict[str, AssignmentRecord]] = {}
    for key, a in view.assignments.items():
        before.setdefault(a.deployment, {})[key] = a
    for a in assignments:
        after.setdefault(a.deployment, {})[keys.assignment(a.node, a.name)] = a
    out = []
    for name in sorted(before.keys() | after.keys()):
        old, new = before.get(name, {}), after.get(name, {})
        if old == new:
            continue
        d = (view.deployments if deployments is None else deployments).get(name)
        by_replica = {a.replica: a for a in new.values()}
        old_replicas = {a.replica for a in old.values()}
        reasons: list[str] = []
        if d is None:
            reasons.append("deployment removed")
        elif not old:
            reasons.append("new deployment" if name not in view.statuses
                           else "pending replica(s) placed")
        for key, a in sorted(old.items()):
            if d is None or new.get(key) == a:
                continue
            to = by_replica.get(a.replica)
            moved = (f": replica {a.replica} moved to {to.node}/gpu{','.join(map(str, to.gpus))}"
                     if to is not None else f": replica {a.replica} removed")
            failed = next((ln for ln in given_up
                           if ln.startswith(f"replica {a.name} did not start on {a.node} ")),
                          None)
            if a.node not in view.nodes:
                reasons.append(f"node {a.node} lost{moved}")
            elif a.node in view.drained:
                reasons.append(f"node {a.node} drained{moved}")
            elif failed is not None:
                reasons.append(failed)
            elif a.generation != generation(d) and key in new and new[key].draining:
                reasons.append(f"rolling update: replica {a.replica} drains, its successor "
                               "serves")
            elif a.generation != generation(d) and key not in new and a.draining:
                reasons.append(f"rolling update: replica {a.replica} of the old generation "
                               "removed")
            elif to is not None and to.node == a.node and to.draining != a.draining:
                reasons.append(f"scaled to {d.replicas}: replica {a.replica} draining"
                               if to.draining else f"replica {a.replica} wanted again "
                               f"(wants {d.replicas}): drain cancelled")
            elif a.replica >= d.replicas:
                reasons.append(f"scaled to {d.replicas}: replica {a.replica} drained"
                               if a.draining and to is None else f"scaled to {d.replicas}{moved}")
            elif a.generation and a.generation != generation(d):
                reasons.append(f"deployment changed: replica {a.replica} replaced"
                               + (f" on {to.node}/gpu{','.join(map(str, to.gpus))}"
                                  if to is not None else ""))
        if d is not None:
            stale_on = {(a.replica, a.node) for a in old.values()
                        if a.generation != generation(d)}
            for key, a in sorted(new.items()):
                if key not in old and any(r == a.replica and n != a.node for r, n in stale_on):
                    reasons.append(
                        f"rolling update: replica {a.replica} of the new generation placed "
                        f"on {a.node}/gpu{','.join(map(str, a.gpus))} beside the old one")
        added = sorted(r for r in by_replica if r not in old_replicas)
        if d is not None and old and added:
            reasons.append(f"replica(s) {', '.join(map(str, added))} placed "
                           f"(wants {d.replicas})")
        out.append(audit.entry(
            "placer", "place", name, who=who, now=now,
            old=sorted(_replica_text(a) for a in old.values()),
            new=sorted(_replica_text(a) for a in new.values()),
            detail="; ".join(dict.fromkeys(reasons)) or "placement changed"))
    return out


class Placer:
    """Campaigns for the placer role; while elected, keeps assignments in step with the fleet."""

    def __init__(self, store: Store, keys: Keys, holder: str, *, ttl: int = 5,
                 replace_after: float = 180.0, max_restarts: int = 3,
                 debounce: float = 0.05, on_bad_record: Callable[[], None] = lambda: None,
                 on_write: Callable[[int], None] = lambda n: None,
                 audit_keep_seconds: float = 30 * 86400.0, audit_keep_entries: int = 10_000,
                 audit_compact_interval: float = 300.0, drain_timeout: float = 600.0) -> None:
        self.store = store
        self.keys = keys
        self.holder = holder
        self.election = Election(store, keys.placer_leader, holder, ttl=ttl)
        self.failures = StartFailures(replace_after=replace_after, max_restarts=max_restarts,
                                      assignments=keys.assignments)
        self.debounce = debounce
        self._on_bad_record = on_bad_record
        self._on_write = on_write
        self.audit_keep_seconds = audit_keep_seconds
        self.audit_keep_entries = audit_keep_entries
        self.audit_compact_interval = audit_compact_interval
        self.passes = 0  # placement passes run while leading (tests, metrics)
        self.pending = 0  # replicas that fit nowhere, as of the last pass
        self.scaler = Autoscaler()
        # A replica being scaled away is deleted once idle, or after this long regardless.
        self.drain_timeout = drain_timeout
        self._drain_began: dict[str, float] = {}  # assignment key -> when draining began
        self._drain_seen: dict[str, float] = {}  # ... -> when its backend said "draining"

    @property
    def leading(self) -> bool:
        return self.election.leading

    async def run(self) -> None:
        """The eternal task (a scheduler's guard runs it)."""
        await self.election.run(self._lead)

    def _bad(self, key: str, why: str) -> None:
        log.warning("placer skips an unusable record", extra={"key": key, "error": why})
        self._on_bad_record()

    async def _lead(self, fence: Fence) -> None:
        view = FleetView(self.keys, on_bad_record=self._bad)
        dirty = asyncio.Event()
        self.scaler = Autoscaler()  # a new term goes on from the statuses, not old memory
        self.failures.new_term()
        self._drain_began.clear()
        self._drain_seen.clear()
        full_at = 0.0  # when the next full pass is due without any event

        async def follow() -> None:
            async for item in self.store.sync_prefix(self.keys.prefix + "/"):
                # The audit trail is not in the view at all: nothing to place on it.
                if view.apply(item):
                    dirty.set()
                elif isinstance(item, Event) and item.key.startswith(self.keys.loads) \
                        and self.scaler.active:
                    nudge.set()  # demand changed: the autoscaler looks at once
            raise RuntimeError("the placer's etcd sync stream ended")

        nudge = asyncio.Event()

        follower = asyncio.create_task(follow(), name="placer-watch")
        compact_at = time.monotonic()
        try:
            while True:
                if time.monotonic() >= compact_at:
                    compact_at = time.monotonic() + self.audit_compact_interval
                    await self.compact_audit(fence)
                now = time.time()
                deadline = self.failures.next_deadline(now)
                wait = 5.0 if deadline is None else min(5.0, max(0.05, deadline - now))
                wait = min(wait, max(0.05, compact_at - time.monotonic()))
                if self.scaler.active or self._drain_began:
                    wait = min(wait, AUTOSCALE_TICK_S)
                waiter = asyncio.create_task(dirty.wait(), name="placer-wake")
                nudged = asyncio.create_task(nudge.wait(), name="placer-nudge")
                try:
                    done, _ = await asyncio.wait({waiter, nudged, follower}, timeout=wait,
                                                 return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waiter.cancel()
                    nudged.cancel()
                if follower in done:
                    follower.result()
                if not view.synced:
                    continue
                # A burst of events (an agent registering 16 backends) is one decision.
                await asyncio.sleep(self.debounce)
                nudge.clear()
                # A timer that came due (a replica that did not start, an avoid ending) is
                # decided now, not at the next periodic pass.
                timer_due = deadline is not None and time.time() >= deadline
                was_dirty = dirty.is_set() or timer_due
                dirty.clear()
                # A load sample alone asks for no placement unless the autoscaler changed a
                # count, a replica drains, or the periodic pass is due.
                if not (was_dirty or self._drain_began or time.monotonic() >= full_at
                        or self.step_autoscaler(view, time.time())):
                    continue
                full_at = time.monotonic() + 5.0
                await self.place_once(view, fence)
        finally:
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower

    def step_autoscaler(self, view: FleetView, now: float) -> bool:
        """Sample the load and decide the autoscaled counts; True when one changed."""
        return self.scaler.step(view.deployments, view.statuses, view.loads.values(),
                                list(view.backends.values()), now)

    def _drain_done(self, key: str, a: AssignmentRecord, view: FleetView, now: float) -> bool:
        """Whether a replica being scaled away has finished its requests (or may wait no
        longer): its backend no longer serves, or it has said "draining" for
        DRAIN_GRACE_S and neither its engine nor any scheduler has a request on it."""
        began = self._drain_began.setdefault(key, now)
        b = view.backend_of(a)
        if b is None or b.state not in ("ready", "draining") or now - began >= self.drain_timeout:
            return True
        if b.state != "draining":
            return False  # its agent has not taken it out of routing yet
        seen = self._drain_seen.setdefault(key, now)
        if now - seen < DRAIN_GRACE_S:
            return False
        if b.load is not None and (b.load.running or 0) + (b.load.waiting or 0) > 0:
            return False
        me = f"{a.node}/{a.name}"
        return not any(x.backend == me and x.inflight > 0
                       for record in view.loads.values() for x in record.backends)

    def _split_draining(self, view: FleetView, wanted: Mapping[str, DeploymentRecord],
                        given_up: set[str], now: float
                        ) -> tuple[list[AssignmentRecord], list[AssignmentRecord]]:
        """The assignments placement may keep, and the replicas that drain first: of a
        deployment that still exists, on a live undrained node, not finished yet, and either
        scaled away (current generation, index at or above the wanted count) or succeeded
        (an older generation whose successor serves on another node: a rolling update)."""
        current: list[AssignmentRecord] = []
        draining: list[AssignmentRecord] = []
        # Replicas whose successor of the current generation serves on another node (a
        # rolling update's surge, rollout.py): the older one drains, then goes.
        gens = {name: generation(d) for name, d in wanted.items()}
        succeeded: dict[tuple[str, int], set[str]] = {}
        for a in view.assignments.values():
            if a.generation == gens.get(a.deployment) and view.serving(a):
                succeeded.setdefault((a.deployment, a.replica), set()).add(a.node)
        for key, a in view.assignments.items():
            if key in given_up:
                continue
            d = wanted.get(a.deployment)
            alive = a.node in view.nodes and a.node not in view.drained
            current_gen = a.generation == gens.get(a.deployment)
            if d is not None and alive and (
                    (a.replica >= d.replicas and current_gen)
                    or (a.replica < d.replicas and not current_gen
                        and succeeded.get((a.deployment, a.replica), set()) - {a.node})):
                if not self._drain_done(key, a, view, now):
                    draining.append(a if a.draining else dataclasses.replace(a, draining=True))
                continue
            current.append(a)
        keep = {self.keys.assignment(a.node, a.name) for a in draining}
        for gone in [k for k in self._drain_began if k not in keep]:
            del self._drain_began[gone]
            self._drain_seen.pop(gone, None)
        return current, draining

    async def place_once(self, view: FleetView, fence: Fence) -> Changes:
        """Decide from ``view`` and write the difference under ``fence``."""
        now = time.time()
        # An earlier leader's avoids and strikes, from the statuses it wrote (a no-op for
        # what this leader already knows).
        self.failures.restore(view.statuses.values(), now)
        given_up = self.failures.observe(view, now)
        for line in given_up:
            log.warning(line)
        self.step_autoscaler(view, now)
        wanted = self.scaler.effective(view.deployments)
        # The replicas given up on are placed as if new (the avoid keeps them off that
        # node); their neighbours on the same node stay where they are. Replicas scaled
        # away drain first, holding their GPUs meanwhile.
        current, draining = self._split_draining(view, wanted, self.failures.given_up, now)
        # A changed deployment rolls: its older replicas are replaced one by one while the
        # new ones serve (rollout.py).
        rollout = plan_rollout(wanted, current, view.serving, draining)

        def placing(r: Rollout) -> Placement:
            return place(list(wanted.values()), list(view.nodes.values()),
                         current, reserved=view.reserved(),
                         drained=frozenset(view.drained), avoid=self.failures.avoid(now),
                         now=now, holding=draining, removing=view.removing(),
                         held_back=r.held, surge=r.surge)
        result = placing(rollout)
        # No room beside it: that replica is replaced in place. Unless the new generation
        # already failed to start somewhere (its nodes avoided): the old one serves on.
        avoided = self.failures.avoid(now)
        in_place = [n for n in result.surge_failed if not avoided.get(n)]
        if in_place:
            result = placing(rollout.in_place(in_place))
        # A replica wanted again while it drained is kept, and serves again.
        assignments = sorted(
            [dataclasses.replace(a, draining=False) if a.draining else a
             for a in result.assignments] + draining,
            key=lambda a: (a.node, a.name))
        for a in assignments:
            key = self.keys.assignment(a.node, a.name)
            if a.assigned_at == now and view.assignments.get(key) != a:
                backend = view.backend_of(a)
                self.failures.placed(key, a.deployment, now,
                                     backend.restarts if backend is not None else 0)
        statuses = {}
        for name, s in result.status.items():
            s = dataclasses.replace(s, placer=self.holder, updated_at=now)
            scaled = self.scaler.state(name)
            if scaled is not None:
                s.desired, s.scaled_at = scaled
            s.avoid, s.strikes = self.failures.of(name, now)
            s.unready_since, s.unready_restarts = self.failures.timers(name)
            statuses[name] = s
        self.pending = sum(s.pending for s in statuses.values())
        diff = changes(self.keys, view, assignments, statuses)
        self.passes += 1
        entries = [audit.entry("placer", "autoscale", e.deployment, old=e.old, new=e.new,
                               detail=f"replicas {e.old} -> {e.new}: {e.reason}",
                               who=self.holder, now=e.time)
                   for e in self.scaler.take_events()]
        for e in entries:
            log.info("autoscale", extra={"deployment": e.target, "detail": e.detail})
        entries += placement_audit(self.keys, view, assignments, given_up, who=self.holder,
                                   now=now, deployments=wanted)
        trail = [audit.audit_put(self.keys, e) for e in entries]
        for puts, deletes in _batches(diff, trail):
            written = await self.store.txn([fence.compare], puts=puts, deletes=deletes)
            if not written.succeeded:
                raise Deposed("the placer election has another leader; not writing")
            self._on_write(len(puts) + len(deletes))
            # Our own writes come back through the watch; apply them now so that a decision
            # made before they arrive does not place the same replicas twice.
            for key, value in puts:
                view.apply(Event("put", key, value, written.revision))
            for key in deletes:
                view.apply(Event("delete", key, b"", written.revision))
        if diff:
            log.info("placement written", extra={"puts": len(diff.puts),
                                                 "deletes": len(diff.deletes),
                                                 "pending": self.pending})
        return diff

    async def compact_audit(self, fence: Fence) -> int:
        """Delete the audit entries past retention (age or count), oldest first, in
        transactions fenced on ``fence``; returns how many. An etcd that refuses is logged
        and tried again at the next interval; losing the election or etcd ends the term as
        a placement write would."""
        try:
            snap = await self.store.get_prefix(self.keys.audit)
            doomed = audit.to_compact(audit.key_times(self.keys, (kv.key for kv in snap.items)),
                                      time.time(), self.audit_keep_seconds,
                                      self.audit_keep_entries)
            for i in range(0, len(doomed), TXN_OPS):
                written = await self.store.txn([fence.compare], deletes=doomed[i:i + TXN_OPS])
                if not written.succeeded:
                    raise Deposed("the placer election has another leader; not compacting")
        except (Deposed, StoreUnavailable):
            raise
        except StoreError as err:
            log.warning("audit trail not compacted: %s", err)
            return 0
        if doomed:
            log.info("audit trail compacted", extra={"deleted": len(doomed)})
        return len(doomed)
