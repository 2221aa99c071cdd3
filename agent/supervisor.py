"""Keeping this node's backends running as containers: pinned ones and assigned ones.

A backend is either pinned in agent.toml's ``[[backend]]`` (re-read live on SIGHUP) or a
replica of a deployment that the placer assigned to this node. :func:`plan` is the pure
reconciliation: desired specs against observed containers gives adopt / create / recreate /
remove / start actions. :class:`Supervisor` is the shell that lists containers, runs the plan
with restart backoff, reacts to Docker events at once, probes the backends and keeps one
:class:`BackendRecord` per backend for the heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from agent.backoff import RestartBackoff
from agent.config import AgentConfig, BackendConfig
from agent.docker.client import (
    ContainerEvent,
    DockerAdapter,
    DockerFailed,
    DockerUnavailable,
    ImageMissing,
    Reconnected,
)
from agent.docker.observed import ObservedContainer, exit_reason
from agent.docker.spec import ContainerSpec, backend_url, build_spec, quota_problem
from agent.engines import EngineError, share_args
from agent.health.probe import Ewma, Prober, ProbeResult
from agent.metrics import AgentMetrics
from agent.models.manager import ModelManager
from agent.placement import Placement, PlacementError, place
from common import audit
from common.backoff import Backoff
from common.records import (
    AssignmentRecord,
    AuditEntry,
    BackendLoad,
    BackendRecord,
    GpuRecord,
    State,
)

log = logging.getLogger(__name__)

# A full re-list now and then catches anything an event could not tell (belt and braces).
RESYNC_S = 30.0
REFUSED_RETRY_S = 2.0  # a refused removal of an unconfigured backend's container
# Retries of a container listing the engine refused (it answered, with an error).
LIST_RETRY_INITIAL_S = 0.5
LIST_RETRY_MAX_S = RESYNC_S
# Consecutive failed probes before a ready backend counts as unhealthy.
FAILS_TO_UNHEALTHY = 2


@dataclass(frozen=True, slots=True)
class Adopt:
    backend: str
    container: ObservedContainer


@dataclass(frozen=True, slots=True)
class Create:
    backend: str
    spec: ContainerSpec


@dataclass(frozen=True, slots=True)
class Recreate:
    backend: str
    old: ObservedContainer
    spec: ContainerSpec


@dataclass(frozen=True, slots=True)
class Start:
    """The container is right but not running (it crashed, or the engine restarted)."""

    backend: str
    container: ObservedContainer


@dataclass(frozen=True, slots=True)
class Remove:
    backend: str
    container: ObservedContainer


Action = Adopt | Create | Recreate | Start | Remove


def plan(desired: dict[str, ContainerSpec],
         actual: Sequence[ObservedContainer]) -> list[Action]:
    """What to do so that exactly the desired containers exist and run.

    Removals come first so that a recreated container can take its predecessor's name and
    port. Of several containers for one backend, the running one with the right hash is kept.
    """
    by_backend: dict[str, list[ObservedContainer]] = {}
    for c in actual:
        by_backend.setdefault(c.backend, []).append(c)
    removes: list[Action] = []
    rest: list[Action] = []
    for name, found in sorted(by_backend.items()):
        if name not in desired:
            removes.extend(Remove(name, c) for c in found)
    for name, spec in desired.items():
        found = sorted(by_backend.get(name, []),
                       key=lambda c: (c.config_hash != spec.config_hash, not c.running, c.id))
        if not found:
            rest.append(Create(name, spec))
            continue
        keep, *extra = found
        removes.extend(Remove(name, c) for c in extra)
        if keep.config_hash != spec.config_hash:
            rest.append(Recreate(name, keep, spec))
        elif keep.running:
            rest.append(Adopt(name, keep))
        else:
            rest.append(Start(name, keep))
    return removes + rest


@dataclass(slots=True)
class BackendStatus:
    """What the agent knows about one backend between reconciliations."""

    config: BackendConfig
    backoff: RestartBackoff
    spec: ContainerSpec | None = None
    container_id: str | None = None
    state: State = "starting"
    error: str | None = None
    restarts: int = 0
    not_before: float = 0.0  # monotonic time before which no (re)start is tried
    seen_exit: tuple[str, str] | None = None  # (id, finished_at) of the last counted crash
    probe_fails: int = 0
    latency: Ewma = field(default_factory=Ewma)
    load: BackendLoad | None = None
    updated_at: float = field(default_factory=time.time)
    # Set for a deployment's replica: what the placer assigned (None: pinned in agent.toml).
    assignment: AssignmentRecord | None = None
    # The generation of the assignment the current container was adopted or made for.
    generation: str | None = None


GpuSource = Callable[[], tuple[list[GpuRecord], list[GpuRecord]]]


def _device_gids(gpus: Sequence[GpuRecord]) -> dict[str, int]:
    """The host gids owning these GPUs' device nodes, for the container's group_add."""
    from agent.inventory.devnodes import device_gids, device_nodes  # keeps NVML lazy
    return device_gids(device_nodes(gpus))


class Supervisor:
    """Runs this node's backends; records in :meth:`records`, changes through ``on_change``."""

    def __init__(self, config: AgentConfig, docker: DockerAdapter, metrics: AgentMetrics,
                 gpus: GpuSource, on_change: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 on_audit: Callable[[AuditEntry], None] | None = None) -> None:
        self.config = config
        self.node = config.node_name
        self.docker = docker
        self.metrics = metrics
        self._gpus = gpus
        self.on_change = on_change
        # Receives an audit entry for what the agent does on its own (a crash restart, a
        # container removed for a drain); agent.app queues them for etcd.
        self.on_audit = on_audit
        self._clock = clock
        self._wake = asyncio.Event()
        self._prober = Prober(timeout=max(1.0, min(5.0, config.probe_interval)))
        self._pinned: list[BackendConfig] = list(config.backend)
        self._assigned: dict[str, AssignmentRecord] = {}
        # Until the first assignment table arrives, a deployment's container found on this
        # node is left alone: an agent restarted while etcd is away must not remove it.
        self.assignments_known = asyncio.Event()
        self._ports: dict[str, int] = {}  # port given to each assigned replica
        # Records this node's previous agent process left in etcd (see recover()).
        self._trusted: dict[str, BackendRecord] = {}
        self.status: dict[str, BackendStatus] = {
            b.name: BackendStatus(b, RestartBackoff(clock)) for b in config.backend}
        self.activity = "starting"
        self.drained: str | None = None  # why, while an operator has drained this node
        # Set once the drain watch has first said whether this node is drained.
        self.drain_known = asyncio.Event()
        # How long the first reconcile waits for that answer: long enough for a reachable
        # etcd, short enough that an etcd outage at start does not keep backends down.
        self.drain_wait = 3.0
        self._retry_at = 0.0  # when to retry an action Docker refused outside any backend
        # Prepares models in models_dir before their engines start (docs/models.md); None:
        # the engines find their weights there as they are.
        self.models: ModelManager | None = None

    # -- what the heartbeat and /v1/state read -------------------------------------------------

    def records(self) -> list[BackendRecord]:
        return [self._record(s) for s in self.status.values()]

    def _record(self, s: BackendStatus) -> BackendRecord:
        spec = s.spec
        a = s.assignment
        vendor = spec.vendor if spec else None
        gpus = list(spec.gpu_uuids) if spec else []
        if a is not None:  # a sim replica holds its GPUs on paper only: say which
            vendor, gpus = a.vendor, list(a.gpu_uuids)
        # A replica the placer is scaling away serves what it has and is routed nothing new.
        state: State = "draining" if a is not None and a.draining and s.state == "ready" \
            else s.state
        fetch = self.models.progress(s.config.model) \
            if state == "downloading" and self.models is not None else None
        return BackendRecord(
            node=self.node, name=s.config.name, models=[s.config.model],
            url=spec.url if spec else backend_url(self.config.advertise_host, s.config.port),
            state=state, engine=s.config.engine, vendor=vendor,
            gpus=gpus, container_id=s.container_id,
            probe_latency_ms=None if s.latency.value is None else round(
                s.latency.value * 1000, 3),
            load=s.load,
            updated_at=s.updated_at, error=s.error, restarts=s.restarts,
            api_path=spec.api_path if spec else "/v1",
            deployment=a.deployment if a is not None else None,
            generation=s.generation if s.container_id is not None else None,
            bytes_done=fetch.done if fetch is not None else None,
            bytes_total=fetch.total if fetch is not None else None,
            download_rate=None if fetch is None or fetch.rate is None
            else round(fetch.rate, 1))

    def _set(self, s: BackendStatus, state: State, error: str | None) -> None:
        if (s.state, s.error) == (state, error):
            return
        if state == "ready":
            s.backoff.healthy()
        elif s.state == "ready":
            s.backoff.unhealthy()
        log.info("backend state", extra={"backend": s.config.name, "state": state,
                                         "error": error or ""})
        s.state, s.error = state, error
        s.updated_at = time.time()
        self.metrics.backend(self._record(s))
        self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def _audit(self, verb: str, backend: str, detail: str) -> None:
        if self.on_audit is not None:
            self.on_audit(audit.entry("agent", verb, f"{self.node}/{backend}", detail=detail))

    def wake(self) -> None:
        """Reconcile now (inventory changed, or a test wants it)."""
        self._wake.set()

    # -- reconciliation -------------------------------------------------------------------------

    def set_drained(self, reason: str | None) -> None:
        """Stop every backend (``reason``), or run them again (None); reconciles at once."""
        self.drain_known.set()
        if reason == self.drained:
            return
        log.info("drain" if reason else "undrain", extra={"reason": reason or ""})
        self.drained = reason
        for s in self.status.values():
            s.not_before = 0.0  # an undrained backend starts now, not after an old backoff
        self.wake()

    def recover(self, previous: Sequence[BackendRecord]) -> None:
        """Take over from this node's previous agent process, through its records in etcd.

        A restarted agent adopts the containers it finds; a backend the old process
        reported ready, in the same container, stays ready rather than going back to
        "starting" until its first probe: a restart must not take the node's backends out
        of routing. The probes correct it within a probe interval if it is not so. The
        ports given to assigned replicas are learnt back too.
        """
        for record in previous:
            if record.node != self.node:
                continue
            self._trusted[record.name] = record
            port = _url_port(record.url)
            if record.deployment is not None and port is not None:
                self._ports.setdefault(record.name, port)
        for s in self.status.values():
            self._trust(s)

    def _trust(self, s: BackendStatus) -> None:
        old = self._trusted.pop(s.config.name, None)
        if old is None:
            return
        s.restarts = old.restarts
        if old.state == "ready" and old.container_id:
            s.state, s.container_id, s.load = "ready", old.container_id, old.load
            if old.probe_latency_ms is not None:
                s.latency.add(old.probe_latency_ms / 1000)
            s.backoff.healthy()

    def set_pinned(self, backends: Sequence[BackendConfig]) -> None:
        """agent.toml's backends changed (``systemctl reload``): apply them live."""
        self._pinned = list(backends)
        self._sync_status()

    def set_assignments(self, table: dict[str, AssignmentRecord]) -> None:
        """This node's assignments, whole, as the placer wrote them."""
        self._assigned = dict(table)
        self.assignments_known.set()
        self._sync_status()

    def _sync_status(self) -> None:
        """One status per pinned backend and per assignment; gone ones are dropped."""
        wanted: dict[str, tuple[BackendConfig, AssignmentRecord | None]] = {
            b.name: (b, None) for b in self._pinned}
        a: AssignmentRecord | None
        for name, a in sorted(self._assigned.items()):
            if name in wanted:
                log.warning("assignment has the name of a pinned backend; not run",
                            extra={"backend": name})
                continue
            wanted[name] = (self._assignment_config(a, self._ports.get(name, 0)), a)
        for name in [n for n in self.status if n not in wanted]:
            del self.status[name]
            self._ports.pop(name, None)
            self.metrics.forget(name)
        for name, (config, a) in wanted.items():
            s = self.status.get(name)
            if s is None:
                s = self.status[name] = BackendStatus(config, RestartBackoff(self._clock))
                s.assignment = a
                self._trust(s)
            elif s.config != config or s.assignment != a:
                draining_only = s.assignment is not None and a is not None and \
                    dataclasses.replace(s.assignment, draining=a.draining) == a
                s.config, s.assignment = config, a
                if draining_only:
                    # Draining begins or ends: the same container goes on; the record says it.
                    self.metrics.backend(self._record(s))
                    continue
                s.not_before = 0.0  # a changed backend is tried now, not after an old backoff
        self._changed()
        self.wake()

    def _assignment_config(self, a: AssignmentRecord, port: int) -> BackendConfig:
        return BackendConfig(name=a.name, model=a.model, engine=a.engine,  # type: ignore[arg-type]
                             port=port, gpus=list(a.gpus), image=a.image, args=list(a.args),
                             env=dict(a.env), cpus=a.cpus)

    def _port_for(self, name: str) -> int:
        """The replica's port: the one it had, or the lowest free one of assignment_ports."""
        port = self._ports.get(name)
        if port is not None:
            return port
        low, high = self.config.port_range
        taken = {b.port for b in self._pinned} | set(self._ports.values())
        for candidate in range(low, high + 1):
            if candidate not in taken:
                self._ports[name] = candidate
                return candidate
        raise EngineError(f"no free port left in assignment_ports ({low}-{high})")

    def _assignment_spec(self, s: BackendStatus, a: AssignmentRecord, gpus: list[GpuRecord],
                         pinned_taken: set[int]) -> ContainerSpec:
        by_index = {g.index: g for g in gpus}
        chosen: list[GpuRecord] = []
        for index, uuid in zip(a.gpus, a.gpu_uuids, strict=False):
            gpu = by_index.get(index)
            if gpu is None or gpu.uuid != uuid:
                raise EngineError(f"assigned GPU {index} ({uuid}) is not on this node")
            if index in pinned_taken:
                raise EngineError(f"assigned GPU {index} is held by a pinned backend")
            chosen.append(gpu)
        problem = quota_problem(a.cpus, None, self._cores())
        if problem:
            raise EngineError(problem)
        config = self._assignment_config(a, self._port_for(a.name))
        if a.memory_bytes is not None and chosen and chosen[0].memory_total_bytes:
            share = share_args(a.engine, a.memory_bytes / chosen[0].memory_total_bytes)
            config = dataclasses.replace(config, args=[*share, *a.args])
        s.config = config
        # The sim engine holds its GPUs on paper (demos, tests): no device is mapped.
        real = a.engine != "sim"
        return build_spec(self.node, config, chosen if real else (),
                          a.vendor if real else None, models_dir=self.config.models_dir,
                          advertise_host=self.config.advertise_host, node_gpus=gpus,
                          deployment=a.deployment,
                          device_gids=_device_gids(chosen) if real else None,
                          engine_api_key=self.config.engine_api_key)

    @staticmethod
    def _cores() -> set[int]:
        """The CPUs this agent's engines may use (its own affinity: a cgroup may narrow it)."""
        return set(os.sched_getaffinity(0))

    def desired(self) -> dict[str, ContainerSpec]:
        """The specs the config and the assignments ask for; one that cannot run gets its
        error in its record, the others still run."""
        if self.drained is not None:
            # Nothing desired: plan() removes every container; the records stay, stopped.
            for s in self.status.values():
                self._set(s, "stopped", self.drained)
            return {}
        gpus, offerable = self._gpus()
        placements = place(self._pinned, gpus, offerable)
        pinned_taken = {g.index for p in placements.values() if isinstance(p, Placement)
                        for g in p.gpus}
        specs: dict[str, ContainerSpec] = {}
        for name, s in self.status.items():
            a = s.assignment
            if a is None:
                continue
            try:
                specs[name] = s.spec = self._assignment_spec(s, a, gpus, pinned_taken)
            except EngineError as err:
                s.spec = None
                self._set(s, "stopped", str(err))
        for b in self._pinned:
            s = self.status[b.name]
            p = placements[b.name]
            if isinstance(p, PlacementError):
                s.spec = None
                self._set(s, "stopped", p.message)
                continue
            problem = quota_problem(b.cpus, b.cpuset, self._cores())
            if problem:
                s.spec = None
                self._set(s, "stopped", problem)
                continue
            try:
                specs[b.name] = build_spec(
                    self.node, b, p.gpus, p.vendor, models_dir=self.config.models_dir,
                    advertise_host=self.config.advertise_host, node_gpus=gpus,
                    device_gids=_device_gids(p.gpus),
                    engine_api_key=self.config.engine_api_key)
            except EngineError as err:
                s.spec = None
                self._set(s, "stopped", str(err))
                continue
            s.spec = specs[b.name]
        return specs

    async def reconcile(self) -> None:
        """One pass: list, plan, act. Raises DockerUnavailable when the engine is away."""
        actual = await self.docker.list_managed(self.node)
        for c in actual:  # a replica keeps the port its container has (recover from labels)
            if c.deployment is not None and c.port is not None:
                self._ports.setdefault(c.backend, c.port)
        if self.assignments_known.is_set():
            # A replica no longer assigned gives its port back, whether it was learnt from
            # a record, a label or given here (its container, if any, is removed below).
            for name in [n for n in self._ports if n not in self.status]:
                del self._ports[name]
        desired = self.desired()
        if not self.assignments_known.is_set():
            actual = [c for c in actual if c.deployment is None or c.backend in desired]
        for action in plan(desired, actual):
            try:
                await self._act(action)
            except DockerUnavailable:
                raise
            except DockerFailed as err:
                # The engine answered but refused (a removal already in progress, a busy
                # device): that backend waits and retries; the loop and the agent go on.
                log.warning("docker refused an action", extra={
                    "backend": action.backend, "action": type(action).__name__,
                    "error": str(err)})
                s = self.status.get(action.backend)
                if s is not None:
                    self._failed(s, str(err))
                else:  # a container of a backend no longer configured: try again soon
                    self._retry_at = self._clock() + REFUSED_RETRY_S

    async def _act(self, action: Action) -> None:
        now = self._clock()
        if isinstance(action, Remove):
            log.info("removing container", extra={"backend": action.backend,
                                                  "container": action.container.id[:12]})
            await self.docker.remove(action.container.id)
            if self.drained is not None:
                self._audit("drain", action.backend,
                            f"container {action.container.id[:12]} removed: node drained"
                            + (f" ({self.drained})" if self.drained else ""))
            gone = self.status.get(action.backend)
            if gone is not None and gone.container_id == action.container.id:
                gone.container_id = None
                self._changed()
            return
        s = self.status[action.backend]
        if isinstance(action, Adopt | Start):
            # The container matches what the assignment asks for now (else it would be
            # recreated): it is of the assignment's generation.
            self._made_for(s)
        if isinstance(action, Adopt):
            if s.container_id is not None and s.container_id != action.container.id and \
                    s.state == "ready":
                self._set(s, "starting", None)  # not the container that was ready
            if s.container_id != action.container.id:
                log.info("adopted container", extra={"backend": action.backend,
                                                     "container": action.container.id[:12]})
                s.container_id = action.container.id
                self._changed()
            if s.state == "stopped":
                self._set(s, "starting", None)
            return
        if isinstance(action, Start):
            c = action.container
            s.container_id = c.id
            # A container created but never started (its start failed) did not crash: keep
            # the start's own error instead of "exited with code 0" and count no restart.
            if c.status != "created" and s.seen_exit != (c.id, c.finished_at):
                s.seen_exit = (c.id, c.finished_at)
                delay = s.backoff.failed()
                s.not_before = now + delay
                s.latency.reset()
                self._set(s, "unhealthy", f"{exit_reason(c)}; restarting in {delay:g}s")
            if now < s.not_before:
                return
            await self._start(s, c.id, None if c.status == "created" else exit_reason(c))
            return
        # Create or Recreate
        if now < s.not_before:
            return
        if not self._model_ready(s):
            return
        if isinstance(action, Recreate):
            log.info("config changed: recreating", extra={"backend": action.backend})
            await self.docker.remove(action.old.id)
            s.container_id = None
        await self._create(s, action.spec)

    def _model_ready(self, s: BackendStatus) -> bool:
        """Whether the backend's model is in models_dir; while it is being fetched the
        backend is "downloading", and a fetch that failed (no disk, no such repository)
        stops it with the reason, retried with its backoff."""
        if self.models is None:
            return True
        prep = self.models.status(s.config.model)
        if prep.state == "ready":
            return True
        if prep.state == "failed":
            self._failed(s, prep.error or "the model could not be fetched")
        elif prep.state == "checking":
            self._set(s, "starting", prep.error)
        else:
            self._set(s, "downloading", prep.error)
        return False

    def models_changed(self) -> None:
        """A model's preparation moved on: backends waiting for it say so in their record."""
        if self.models is not None:
            for s in self.status.values():
                prep = self.models.progress(s.config.model)
                if prep is None or s.container_id is not None or \
                        s.state not in ("starting", "downloading"):
                    continue
                if prep.state == "downloading":
                    self._set(s, "downloading", prep.error)
                elif prep.state == "checking":
                    self._set(s, "starting", prep.error)
        self._changed()

    async def _start(self, s: BackendStatus, container_id: str, crash: str | None = None
                     ) -> None:
        """Start the stopped container; ``crash`` is how it ended (None: it never ran)."""
        try:
            await self.docker.start(container_id)
        except DockerFailed as err:
            self._failed(s, str(err))
            return
        s.restarts += 1
        if crash is not None:
            self._audit("restart", s.config.name,
                        f"{crash}; restarted (restart {s.restarts})")
        self.metrics.restarted(s.config.name, s.config.model)
        s.probe_fails = 0
        self._set(s, "starting", s.error)

    async def _create(self, s: BackendStatus, spec: ContainerSpec) -> None:
        try:
            cid = await self.docker.create(spec)
            s.container_id = cid
            await self.docker.start(cid)
        except ImageMissing as err:
            self._failed(s, f"{err} (build or load the image on this node)")
            return
        except DockerFailed as err:
            self._failed(s, str(err))
            return
        self._made_for(s)
        log.info("created container", extra={"backend": s.config.name, "container": cid[:12]})
        if self.models is not None:
            self.models.used(s.config.model)
        s.probe_fails = 0
        s.latency.reset()
        s.updated_at = time.time()
        self._set(s, "starting", None)
        self._changed()

    def _made_for(self, s: BackendStatus) -> None:
        generation = s.assignment.generation if s.assignment is not None else None
        if generation != s.generation:
            s.generation = generation
            self._changed()

    def _failed(self, s: BackendStatus, why: str) -> None:
        delay = s.backoff.failed()
        s.not_before = self._clock() + delay
        self._set(s, "stopped", f"{why}; retrying in {delay:g}s")

    def _next_deadline(self) -> float:
        pending = [s.not_before for s in self.status.values() if s.not_before > self._clock()]
        if self._retry_at > self._clock():
            pending.append(self._retry_at)
        return min([*pending, self._clock() + RESYNC_S]) - self._clock()

    async def run(self, rng: random.Random | None = None) -> None:
        """The reconcile loop: at start, on every wake, at backoff deadlines, and now and then.

        It never ends by itself: an engine that is away or that refuses to list containers
        is waited for. ``rng`` jitters the retries of a refused listing (seed it in tests).
        """
        # Jittered: a fleet-wide Docker fault (a bad upgrade) must not make every agent of a
        # fleet retry at the same instant; capped so the agent notices a fix soon enough.
        list_retry = Backoff(initial=LIST_RETRY_INITIAL_S, cap=LIST_RETRY_MAX_S, jitter=0.5,
                             rng=rng)
        # Starting containers on a node an operator drained, only to remove them a moment
        # later, is exactly what a drain is meant to prevent: learn the drain state first.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.drain_known.wait(), self.drain_wait)
        while True:
            self._wake.clear()
            try:
                await self.reconcile()
                self.activity = f"supervising {len(self.status)} backend(s)"
                list_retry.reset()
            except DockerFailed as err:
                # Refusals of single actions are handled inside reconcile(); what reaches
                # here is the engine refusing the listing itself (e.g. a 500). Without a
                # listing nothing can be planned, but the backends keep the state their
                # probes give them and the next attempt may well succeed.
                delay = list_retry.next()
                self.activity = (f"docker refused to list containers, retrying in "
                                 f"{delay:.1f}s: {err}")
                log.warning("cannot list containers, retrying in %.1fs: %s", delay, err)
                # A wake (drain, inventory, a Docker event) is worth an earlier attempt.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)
                continue
            except DockerUnavailable as err:
                self.activity = "waiting for the docker engine"
                # The engines may well still serve (live-restore, or a slow daemon): the
                # probes, not the daemon's absence, say whether a backend is healthy.
                log.warning("cannot reconcile: %s", err)
                # The events thread announces the engine's return; poll too, in case.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), 2.0)
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.05, self._next_deadline()))

    async def watch_events(self) -> None:
        """Wake the reconcile loop at once on a container's death, start or health change."""
        async for event in self.docker.events():
            if isinstance(event, Reconnected):
                self.wake()
            elif isinstance(event, ContainerEvent) and event.node == self.node and (
                    event.action in ("die", "oom", "start", "destroy")
                    or event.action.startswith("health_status")):
                log.debug("container event", extra={"action": event.action,
                                                    "backend": event.backend})
                self.wake()

    # -- probes ---------------------------------------------------------------------------------

    async def probe_loop(self) -> None:
        """Probe every backend with a container each probe_interval, concurrently."""
        try:
            while True:
                backends = list(self.status.values())
                outcomes = await asyncio.gather(*(self._probe(s) for s in backends),
                                                return_exceptions=True)
                # A probe that raises is a bug for one backend, never the end of probing
                # (the eternal task ending takes the agent, its lease and every backend).
                for s, outcome in zip(backends, outcomes, strict=True):
                    if isinstance(outcome, Exception):
                        log.error("probe of %s raised", s.config.name, exc_info=outcome)
                        with contextlib.suppress(Exception):
                            self.apply_probe(s, ProbeResult(
                                False, None, None, f"probe raised: {outcome!r}"))
                await asyncio.sleep(self.config.probe_interval)
        finally:
            await self._prober.close()

    async def _probe(self, s: BackendStatus) -> None:
        spec = s.spec
        # Nothing listens while no container runs: a stopped backend, or a crashed one
        # waiting out its backoff.
        if spec is None or s.container_id is None or s.state == "stopped" or \
                (s.state == "unhealthy" and s.not_before > self._clock()):
            return
        container = s.container_id
        result = await self._prober.probe(spec.url, spec.health_path, s.config.model,
                                          spec.api_path)
        # While the probe ran, the backend may have been drained, recreated or restarted:
        # an answer about what is gone must not mark what replaced it ready.
        if s.spec is not spec or s.container_id != container or s.state == "stopped":  # type: ignore[comparison-overlap]
            return
        self.apply_probe(s, result)

    def apply_probe(self, s: BackendStatus, result: ProbeResult) -> None:
        """Fold one probe result into the backend's state."""
        if result.latency_s is not None:
            s.latency.add(result.latency_s)
        s.load = result.load
        if result.ready:
            s.probe_fails = 0
            self._set(s, "ready", None)
        else:
            s.probe_fails += 1
            if s.state == "ready" and s.probe_fails >= FAILS_TO_UNHEALTHY:
                self._set(s, "unhealthy", result.error)
        self.metrics.backend(self._record(s))


def _url_port(url: str) -> int | None:
    _, _, port = url.rpartition(":")
    return int(port) if port.isdigit() else None
