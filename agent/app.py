"""The agent's aiohttp application: state in AppKeys, loops in cleanup contexts.

:func:`common.daemon.serve` binds the socket before any of this starts (an agent whose port
is taken touches neither etcd nor Docker). Then docker, inventory, store, supervisor,
heartbeat (with the drain and assignment watches), reload, sd-notify; tear-down runs the other
way. A restart is not an outage: on SIGTERM the containers are left running and the lease is
left to the next process, which recovers the records (:meth:`Supervisor.recover`) and re-puts
them under its own lease; only ``--drain``, a drain request or the lease's expiry take the
node's backends out of routing. The contexts are module-level functions reading AppKeys, as
in the scheduler; the store and sd-notify ones are shared (:mod:`common.contexts`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CollectorRegistry

from agent.assignments import follow_assignments
from agent.config import AgentConfig
from agent.docker.client import DockerAdapter
from agent.drain import follow_drain
from agent.health.heartbeat import Heartbeat
from agent.metrics import AgentMetrics
from agent.models.lock import ModelLocks
from agent.models.manager import ModelManager
from agent.supervisor import Supervisor
from common import metrics as common_metrics
from common.audit import AuditWriter
from common.contexts import STORE, DaemonSpec, init_daemon, notify_ctx, store_ctx
from common.daemon import STOPPING, split_listen
from common.keys import Keys
from common.records import GpuRecord, NodeRecord, RecordError, parse_backend, to_dict
from common.store import StoreError
from common.tasks import GUARD

if TYPE_CHECKING:
    from agent.inventory import Inventory

log = logging.getLogger(__name__)


@dataclass(slots=True)
class GpuView:
    """The latest inventory scan, shared by placement, the node record and /v1/state."""

    gpus: list[GpuRecord] = field(default_factory=list)
    offerable: list[GpuRecord] = field(default_factory=list)
    on_change: Callable[[], None] | None = None


@dataclass(slots=True)
class LiveSettings:
    """The parts of agent.toml that ``systemctl reload`` (SIGHUP) applies without a restart."""

    labels: dict[str, str] = field(default_factory=dict)
    reloads: int = 0


CONFIG: web.AppKey[AgentConfig] = web.AppKey("agent_config", AgentConfig)
METRICS: web.AppKey[AgentMetrics] = web.AppKey("agent_metrics", AgentMetrics)
DOCKER: web.AppKey[DockerAdapter] = web.AppKey("docker", DockerAdapter)
INVENTORY: web.AppKey[Inventory] = web.AppKey("inventory")
GPUS: web.AppKey[GpuView] = web.AppKey("gpus", GpuView)
SUPERVISOR: web.AppKey[Supervisor] = web.AppKey("supervisor", Supervisor)
HEARTBEAT: web.AppKey[Heartbeat] = web.AppKey("heartbeat", Heartbeat)
STARTED_AT: web.AppKey[float] = web.AppKey("started_at", float)
LIVE: web.AppKey[LiveSettings] = web.AppKey("live", LiveSettings)
# Re-reads the config as the process was started (same file, environment and flags).
RELOAD: web.AppKey[Callable[[], AgentConfig]] = web.AppKey("reload")
# How long start-up waits for the previous process's records before going on without them.
RECOVER_TIMEOUT_S = 3.0
# What a reload applies; a change to any other key is named in a warning and waits for a
# restart.
LIVE_KEYS = frozenset({"backend", "labels"})


def agent_version() -> str:
    try:
        return version("aivmm")
    except PackageNotFoundError:
        return "0+unknown"


def agent_url(config: AgentConfig) -> str:
    host, port = split_listen(config.listen)
    if host in ("0.0.0.0", "::", ""):
        host = config.advertise_host
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def build_app(config: AgentConfig, *, inventory: Inventory | None = None,
              reload: Callable[[], AgentConfig] | None = None) -> web.Application:
    """The agent; ``inventory`` replaces the one built from config (and is not closed).

    Likewise a ``DOCKER``, ``STORE`` or ``NOTIFIER`` set before start-up is used as it is.
    ``reload`` re-reads the config on SIGHUP (agent.main passes the one it loaded with).
    """
    app = web.Application()
    init_daemon(app, DaemonSpec(etcd=list(config.etcd), status=status_line,
                                security=config.etcd_security()))
    app[CONFIG] = config
    app[STARTED_AT] = time.time()
    app[GPUS] = GpuView()
    app[LIVE] = LiveSettings(labels=dict(config.labels))
    if reload is not None:
        app[RELOAD] = reload
    if inventory is not None:
        app[INVENTORY] = inventory
    registry = CollectorRegistry()
    app[METRICS] = AgentMetrics(registry, config.node_name)
    common_metrics.install(app, registry)
    app.router.add_get("/healthz", handle_healthz)
    app.router.add_get("/v1/state", handle_state)
    app.cleanup_ctx.extend([docker_ctx, inventory_ctx, store_ctx, supervisor_ctx, heartbeat_ctx,
                            reload_ctx, notify_ctx])
    return app


async def docker_ctx(app: web.Application) -> AsyncIterator[None]:
    """The Docker client, unless one was set; closes only its own."""
    own = DOCKER not in app
    if own:
        app[DOCKER] = DockerAdapter(app[CONFIG].docker_host)
    yield
    if own:
        await app[DOCKER].close()


async def inventory_ctx(app: web.Application) -> AsyncIterator[None]:
    """The GPU inventory and its rescan loop; the first scan is done before start-up ends."""
    own = INVENTORY not in app
    if own:
        from agent.inventory import Inventory  # NVML loads only when the agent runs
        config = app[CONFIG]
        app[INVENTORY] = Inventory(config.sysfs_root, proc_root=config.proc_root,
                                   offer_integrated=config.offer_integrated)
    await rescan(app)
    app[GUARD].spawn("inventory", inventory_loop(app))
    yield
    await app[GUARD].cancel("inventory")
    if own:
        app[INVENTORY].close()


async def supervisor_ctx(app: web.Application) -> AsyncIterator[None]:
    """Reconcile the backend containers; on the way out they are left running."""
    view = app[GPUS]
    sup = Supervisor(app[CONFIG], app[DOCKER], app[METRICS],
                     gpus=lambda: (view.gpus, view.offerable))
    app[SUPERVISOR] = sup
    view.on_change = sup.wake
    # Models are fetched under a download lock that needs the heartbeat's lease (set there).
    models = sup.models = ModelManager(app[CONFIG], app[METRICS], require_lock=True)
    models.on_change = sup.models_changed
    models.on_done = sup.wake
    await recover(app, sup)
    guard = app[GUARD]
    guard.spawn("supervisor", sup.run())
    guard.spawn("docker-events", sup.watch_events())
    guard.spawn("probes", sup.probe_loop())
    yield
    await guard.cancel("supervisor", "docker-events", "probes")
    await models.close()


async def recover(app: web.Application, sup: Supervisor) -> None:
    """Hand the supervisor the records this node's previous process left in etcd."""
    config = app[CONFIG]
    prefix = Keys(config.etcd_prefix).node_backends(config.node_name)
    try:
        snapshot = await asyncio.wait_for(app[STORE].get_prefix(prefix), RECOVER_TIMEOUT_S)
    except (StoreError, TimeoutError) as err:
        log.warning("could not read this node's previous records; starting afresh: %s", err)
        return
    previous = []
    for kv in snapshot.items:
        try:
            previous.append(parse_backend(kv.value))
        except RecordError as err:
            log.warning("skipping an unusable previous record",
                        extra={"key": kv.key, "error": str(err)})
    sup.recover(previous)
    if previous:
        log.info("recovered the previous process's records", extra={"backends": len(previous)})


async def heartbeat_ctx(app: web.Application) -> AsyncIterator[None]:
    """Publish the node and its backends under a lease; follow drain and assignments.

    On the way out the lease is not revoked: the containers keep serving, so their records
    stay true until the next process takes them over, or the lease expires.
    """
    config = app[CONFIG]
    store = app[STORE]
    keys = Keys(config.etcd_prefix)
    sup = app[SUPERVISOR]
    beat = Heartbeat(store, keys, node=config.node_name,
                     interval=config.heartbeat_interval, ttl=config.lease_ttl,
                     node_record=lambda: node_record(app), backends=sup.records,
                     metrics=app[METRICS])
    app[HEARTBEAT] = beat
    sup.on_change = beat.poke
    # What the supervisor does on its own goes to the audit trail, queued: etcd may be away.
    trail = AuditWriter(store, keys)
    sup.on_audit = trail.add
    app[GUARD].spawn("audit-writer", trail.run())
    app[GUARD].spawn("heartbeat", beat.run())
    models = sup.models
    if models is not None:
        models.locks = ModelLocks(store, keys, config.node_name, lambda: beat.lease)
        models.on_audit = trail.add
        app[GUARD].spawn("models-record", models.publish_loop(
            store, keys, lambda: beat.lease, lambda: models_in_use(sup)))
    app[GUARD].spawn("drain-watch", follow_drain(store, keys, config.node_name, sup.set_drained))
    app[GUARD].spawn("assignment-watch", follow_assignments(
        store, keys, config.node_name, sup.set_assignments,
        on_bad_record=lambda key, why: bad_assignment(app, key, why)))
    yield
    await app[GUARD].cancel("assignment-watch", "drain-watch", "models-record", "heartbeat",
                            "audit-writer")
    sup.on_audit = None


def models_in_use(sup: Supervisor) -> dict[str, list[str]]:
    """This node's backends by model (a model in use is not removed)."""
    out: dict[str, list[str]] = {}
    for name, s in sup.status.items():
        out.setdefault(s.config.model, []).append(name)
    return out


def bad_assignment(app: web.Application, key: str, why: str) -> None:
    log.warning("skipping an unusable assignment", extra={"key": key, "error": why})
    app[METRICS].bad_records.labels(app[CONFIG].node_name).inc()


def reload_config(app: web.Application) -> bool:
    """Apply agent.toml again (SIGHUP): pinned backends and labels live; False on an error.

    A config that does not load is logged and ignored: the agent goes on with the one it
    has, as ``systemctl reload`` of a mistyped file must not take a node down.
    """
    if RELOAD not in app:
        log.warning("reload asked, but this agent was not started from a config file")
        return False
    try:
        new = app[RELOAD]()
    except Exception as err:  # ConfigError, or a file vanished: keep the running config
        log.error("reload: config not applied: %s", err)
        return False
    old = app[CONFIG]
    restart_only = [f.name for f in dataclasses.fields(new)
                    if f.name not in LIVE_KEYS and getattr(new, f.name) != getattr(old, f.name)]
    if restart_only:
        log.warning("reload: these keys change only at a restart: %s", ", ".join(restart_only))
    live = app[LIVE]
    live.reloads += 1
    if new.labels != live.labels:
        live.labels = dict(new.labels)
        if HEARTBEAT in app:
            app[HEARTBEAT].node_changed()
    app[SUPERVISOR].set_pinned(new.backend)
    log.info("reloaded the config", extra={"backends": len(new.backend)})
    return True


async def reload_ctx(app: web.Application) -> AsyncIterator[None]:
    """SIGHUP (``systemctl reload aivmm-agent``) re-reads agent.toml."""
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, reload_config, app)
    yield
    loop.remove_signal_handler(signal.SIGHUP)


async def rescan(app: web.Application) -> None:
    """Read the GPUs again; a changed offerable set makes the supervisor re-place."""
    inv = app[INVENTORY]
    view = app[GPUS]
    try:
        gpus = await inv.scan()
    except Exception:
        log.exception("GPU scan failed; keeping the previous GPU list")
        return
    offerable = inv.offerable(gpus)
    before = [(g.index, g.uuid) for g in view.offerable]
    present = [(g.index, g.uuid) for g in view.gpus]
    view.gpus, view.offerable = gpus, offerable
    app[METRICS].gpus(gpus)
    if before != [(g.index, g.uuid) for g in offerable] and view.on_change is not None:
        view.on_change()
    if present != [(g.index, g.uuid) for g in gpus] and HEARTBEAT in app:
        # A GPU came or went: schedulers and operators see it now, not a heartbeat later.
        app[HEARTBEAT].node_changed()


async def inventory_loop(app: web.Application) -> None:
    """Rescan on every DRM uevent, and each heartbeat interval for fresh GPU figures."""
    changed = asyncio.Event()

    async def listen() -> None:
        try:
            async for _ in app[INVENTORY].changes():
                changed.set()
        except Exception:
            # Hot-plug events are a speed-up, not a necessity: the periodic rescan goes on.
            log.exception("GPU uevent listener failed; rescanning every heartbeat only")

    listener = asyncio.create_task(listen(), name="inventory-uevents")
    try:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), app[CONFIG].heartbeat_interval)
            changed.clear()
            await rescan(app)
    finally:
        listener.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listener


def node_record(app: web.Application) -> NodeRecord:
    config = app[CONFIG]
    return NodeRecord(node=config.node_name, agent_version=agent_version(),
                      started_at=app[STARTED_AT], heartbeat_at=time.time(),
                      gpus=list(app[GPUS].gpus), agent_url=agent_url(config),
                      labels=dict(app[LIVE].labels),
                      cpu_count=len(os.sched_getaffinity(0)),
                      cost_per_hour=config.cost_per_hour)


def status_line(app: web.Application) -> str:
    parts = []
    if SUPERVISOR in app:
        sup = app[SUPERVISOR]
        states = [s.state for s in sup.status.values()]
        ready = states.count("ready")
        parts.append(f"{ready}/{len(states)} backends ready; {sup.activity}")
    if HEARTBEAT in app:
        parts.append(app[HEARTBEAT].activity)
    return "; ".join(parts) or "starting"


async def handle_healthz(request: web.Request) -> web.Response:
    """The agent process is serving (etcd or Docker being away is reported, not fatal)."""
    app = request.app
    return web.json_response({"status": "ok", "etcd_connected": heartbeat_connected(app),
                              "stopping": app[STOPPING].is_set()})


def heartbeat_connected(app: web.Application) -> bool:
    """Whether the heartbeat's last exchange with etcd worked; False before it started."""
    return app[HEARTBEAT].connected if HEARTBEAT in app else False


async def handle_state(request: web.Request) -> web.Response:
    """This node's inventory and backends as JSON."""
    app = request.app
    view = app[GPUS]
    backends = app[SUPERVISOR].records() if SUPERVISOR in app else []
    return web.json_response({
        "node": app[CONFIG].node_name,
        "gpus": [to_dict(g) for g in view.gpus],
        "offerable": [g.index for g in view.offerable],
        "backends": [to_dict(b) for b in backends],
        "etcd_connected": heartbeat_connected(app),
    })
