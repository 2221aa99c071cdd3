"""The scheduler's aiohttp application: OpenAI routes, health, metrics, status page.

State lives in AppKeys; the etcd watch runs in a cleanup_ctx as a guarded eternal task. The
contexts are module-level functions reading AppKeys, as in the agent; the store and sd-notify
ones are shared (:mod:`common.contexts`).
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import time
from collections.abc import AsyncIterator

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler

from common.contexts import STORE, DaemonSpec, etcd_connected, init_daemon, notify_ctx, store_ctx
from common.daemon import STOPPING
from common.keys import Keys
from common.metrics import REGISTRY, handle_metrics
from common.tasks import GUARD
from scheduler import hardening, status
from scheduler.apikeys import (
    CALLER,
    KeyCollector,
    KeyRing,
    UsagePublisher,
    publish_presence,
)
from scheduler.auth import read_keys_file
from scheduler.budget import RetryBudget
from scheduler.config import SchedulerConfig
from scheduler.deployed import DeployedModels
from scheduler.errors import error_response
from scheduler.load import LoadPublisher
from scheduler.metrics import SchedulerMetrics
from scheduler.netpolicy import networks
from scheduler.placer.service import Placer
from scheduler.proxy import Proxy, ProxySettings
from scheduler.registry import Registry
from scheduler.request import REQUEST_DATA, parse_request
from scheduler.routes import RouteService
from scheduler.routing import Router

CONFIG: web.AppKey[SchedulerConfig] = web.AppKey("config", SchedulerConfig)
ROUTER: web.AppKey[Router] = web.AppKey("router", Router)
PROXY: web.AppKey[Proxy] = web.AppKey("proxy", Proxy)
REGISTRY_VIEW: web.AppKey[Registry] = web.AppKey("registry", Registry)
AUTH: web.AppKey[KeyRing] = web.AppKey("auth", KeyRing)
METRICS: web.AppKey[SchedulerMetrics] = web.AppKey("metrics", SchedulerMetrics)
FAILOVERS: web.AppKey[status.FailoverLog] = web.AppKey("failovers", status.FailoverLog)
RATES: web.AppKey[status.RequestRates] = web.AppKey("rates", status.RequestRates)
ETCD_VIEW: web.AppKey[status.EtcdView] = web.AppKey("etcd_view", status.EtcdView)
DEPLOYED: web.AppKey[DeployedModels] = web.AppKey("deployed", DeployedModels)
PLACER: web.AppKey[Placer] = web.AppKey("placer", Placer)
ROUTES: web.AppKey[RouteService] = web.AppKey("routes", RouteService)
# Seconds a client is told to wait for a deployed model that is still starting.
STARTING_RETRY_AFTER_S = 5

OPENAI_POST_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")


def _unauthorized() -> web.Response:
    return error_response(401, "Incorrect API key provided", "invalid_api_key",
                          headers={"WWW-Authenticate": "Bearer"})


async def handle_openai(request: web.Request) -> web.StreamResponse:
    """POST /v1/...: check key, size and body, then forward to a backend of the model."""
    app = request.app
    admitted = await _admit(request)
    if isinstance(admitted, web.Response):
        # Counted without model or backend: a client's model name is no metric label.
        app[PROXY].count("", "", admitted.status)
        app[AUTH].rejected(request, admitted.status)
        return admitted
    body, model = admitted
    caller = request.get(CALLER)
    if caller is not None:
        # A key's limits and counts (docs/keys.md).
        return await app[AUTH].serve(request, caller, body, lambda b: app[ROUTES].forward(
            request, b, model, app[PROXY]))
    # A model naming a route is sent to one of its targets (docs/routes.md).
    return await app[ROUTES].forward(request, body, model, app[PROXY])


async def _admit(request: web.Request) -> web.Response | tuple[bytes, str]:
    """The request's body and model, or the error answer it gets instead."""
    app = request.app
    auth = app[AUTH]
    caller = None
    if auth.enabled:
        caller = auth.identify(request.headers.get("Authorization"))
        if caller is None:
            return _unauthorized()
        request[CALLER] = caller
    refused = hardening.refuse_content_type(request)
    if refused is not None:
        return refused
    limit = app[CONFIG].max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        return error_response(413, f"request body over {limit} bytes", "body_too_large")
    try:
        async with asyncio.timeout(app[CONFIG].body_timeout):
            body = await request.read()
    except TimeoutError:
        return await hardening.body_timed_out(request, app[CONFIG].body_timeout)
    except web.HTTPRequestEntityTooLarge:
        return error_response(413, f"request body over {limit} bytes", "body_too_large")
    parsed = parse_request(body)
    if isinstance(parsed, str):
        return error_response(400, parsed, "invalid_request",
                              param="model" if "model" in parsed else None)
    request[REQUEST_DATA], model = parsed
    if caller is not None and (forbidden := auth.forbidden(caller, model)) is not None:
        return forbidden
    if not app[ROUTER].known(model) and not app[ROUTES].has(model):
        deployment = app[DEPLOYED].deployment_of(model)
        if deployment is not None and deployment.autoscale is not None:
            return body, model  # scaled to zero: it waits for its replica (cold start)
        if deployment is not None:
            # Deployed but served nowhere yet: a 503 is retried by the OpenAI SDKs, a 404
            # is not, and the model will be there once its engine has started.
            return error_response(
                503, f"The model '{model}' is starting (deployment '{deployment.name}': "
                f"{deployment.replicas} replica(s) wanted, none ready yet); retry shortly",
                "model_starting", headers={"Retry-After": str(STARTING_RETRY_AFTER_S)})
        return error_response(404, f"The model '{model}' does not exist", "model_not_found",
                              param="model")
    return body, model


@web.middleware
async def openai_shaped_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A wrong path or method gets the OpenAI error shape too, not aiohttp's plain text."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return error_response(exc.status, f"{exc.reason}: {request.method} {request.path}",
                              exc.reason.lower().replace(" ", "_"), headers=headers)


async def handle_models(request: web.Request) -> web.Response:
    """GET /v1/models in OpenAI's list shape, from the ready backends."""
    if not request.app[AUTH].allows(request.headers.get("Authorization")):
        return _unauthorized()
    served = set(request.app[ROUTER].models())
    served.update(request.app[ROUTES].names(time.monotonic()))  # routes are models to clients
    caller = request.app[AUTH].identify(request.headers.get("Authorization"))
    if caller is not None and caller.models is not None:
        served &= caller.models  # a key sees the models it may use
    data = [{"id": m, "object": "model", "created": 0, "owned_by": "aivmm"}
            for m in sorted(served)]
    return web.Response(body=orjson.dumps({"object": "list", "data": data}),
                        content_type="application/json")


async def handle_healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def handle_readyz(request: web.Request) -> web.Response:
    """Ready once the table was loaded and until stopping begins; a lost etcd is reported
    but does not stop routing."""
    app = request.app
    stopping = app[STOPPING].is_set()
    # Not ready while stopping: the load balancer sends new work elsewhere while the
    # requests in flight here finish.
    ready = app[REGISTRY_VIEW].synced and not stopping
    connected = etcd_connected(app)
    body = {"ready": ready, "stopping": stopping,
            "etcd": "connected" if connected else "disconnected",
            "stale": not connected, "backends": app[ROUTER].counts(time.monotonic()),
            "revision": app[REGISTRY_VIEW].revision, "placer": placer_role(app)}
    return web.json_response(body, status=200 if ready else 503)


def placer_role(app: web.Application) -> str:
    """"leader", "standby", or "off" (placer = false in scheduler.toml)."""
    if not app[CONFIG].placer:
        return "off"
    return "leader" if PLACER in app and app[PLACER].leading else "standby"


async def handle_metrics_fresh(request: web.Request) -> web.Response:
    """GET /metrics, with the gauges that describe the table brought up to date first."""
    app = request.app
    m = app[METRICS]
    for state, n in app[ROUTER].counts(time.monotonic()).items():
        m.backends.labels(state).set(n)
    m.etcd_connected.set(1 if etcd_connected(app) else 0)
    if PLACER in app:
        m.placer_leader.set(1 if app[PLACER].leading else 0)
        m.placer_pending.set(app[PLACER].pending)
    return await handle_metrics(request)


async def handle_status(request: web.Request) -> web.Response:
    """GET /: the status page; it holds no data (that is /v1/cluster), so needs no key."""
    return web.Response(text=status.PAGE, content_type="text/html",
                        headers={"Cache-Control": "no-cache", **PAGE_HEADERS})


# CSP (the page's own script by hash), no framing, no sniffing (docs/security.md).
PAGE_HEADERS = hardening.page_headers(status.PAGE)


async def handle_cluster(request: web.Request) -> web.Response:
    """GET /v1/cluster: nodes, GPUs, backends, rates and recent failovers, as JSON."""
    app = request.app
    auth = app[AUTH]
    caller = auth.identify(request.headers.get("Authorization")) if auth.enabled else None
    if not app[CONFIG].status_page_public and auth.enabled and caller is None:
        return _unauthorized()
    view = app[ETCD_VIEW]
    await view.refresh(app[STORE])
    body = status.cluster(app[ROUTER], view, app[RATES].rates(), app[FAILOVERS],
                          etcd_connected=etcd_connected(app), now=time.monotonic())
    if caller is not None and caller.operator:
        body["keys"] = await auth.view(app[STORE])  # per-key usage: operators only
    return web.Response(body=orjson.dumps(body), content_type="application/json",
                        headers={"Cache-Control": "no-store"})


def request_totals(metrics: SchedulerMetrics) -> dict[tuple[str, str], float]:
    """The request counter summed over status, by (model, backend)."""
    totals: dict[tuple[str, str], float] = {}
    for family in metrics.requests.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                key = (sample.labels["model"], sample.labels["backend"])
                totals[key] = totals.get(key, 0.0) + sample.value
    return totals


async def proxy_ctx(app: web.Application) -> AsyncIterator[None]:
    """The upstream HTTP client's session."""
    await app[PROXY].open()
    yield
    await app[PROXY].close()


async def watch_ctx(app: web.Application) -> AsyncIterator[None]:
    """Follow etcd's backend records into the routing table, and the deployments, in
    guarded tasks."""
    app[GUARD].spawn("backend-watch", app[REGISTRY_VIEW].run(app[STORE]))
    app[GUARD].spawn("deployment-watch", app[DEPLOYED].run(app[STORE]))
    start_load(app)
    yield
    await app[GUARD].cancel("load-publisher", "deployment-watch", "backend-watch")


async def routes_ctx(app: web.Application) -> AsyncIterator[None]:
    """Follow the routes, write the guard's trips, publish this replica's route figures."""
    routes = app[ROUTES]
    app[GUARD].spawn("route-watch", routes.table.run(app[STORE]))
    app[GUARD].spawn("route-guard", routes.run_guard(app[STORE]))
    app[GUARD].spawn("route-stats", routes.publish(app[STORE]))
    yield
    await app[GUARD].cancel("route-stats", "route-guard", "route-watch")


async def keys_ctx(app: web.Application) -> AsyncIterator[None]:
    """Follow the API keys and the live replicas; publish this replica's presence and its
    per-key usage (docs/keys.md)."""
    config, ring, store = app[CONFIG], app[AUTH], app[STORE]
    usage = UsagePublisher(store, ring, ring.replica, interval=config.key_usage_interval,
                           keep_days=config.key_usage_keep_days)
    app[GUARD].spawn("key-watch", ring.run(store))
    app[GUARD].spawn("scheduler-presence-watch", ring.run_presence(store))
    app[GUARD].spawn("scheduler-presence", publish_presence(
        store, ring.keys, ring.replica, config.listen))
    app[GUARD].spawn("key-usage", usage.run())
    yield
    await app[GUARD].cancel("key-usage", "scheduler-presence", "scheduler-presence-watch",
                            "key-watch")


async def placer_ctx(app: web.Application) -> AsyncIterator[None]:
    """Campaign for the placer role (unless turned off); while elected, place deployments."""
    config = app[CONFIG]
    if not config.placer:
        yield
        return
    metrics = app[METRICS]
    placer = Placer(app[STORE], Keys(config.etcd_prefix), holder=placer_holder(config),
                    ttl=config.placer_lease_ttl, replace_after=config.placer_replace_after,
                    max_restarts=config.placer_max_restarts,
                    on_bad_record=metrics.placer_bad_records.inc,
                    on_write=metrics.placer_writes.inc,
                    audit_keep_seconds=config.audit_keep_days * 86400,
                    audit_keep_entries=config.audit_keep_entries,
                    drain_timeout=config.placer_drain_timeout)
    app[PLACER] = placer
    app[GUARD].spawn("placer", placer.run())
    yield
    # Cancelling resigns (revokes the election lease): a standby takes over at once.
    await app[GUARD].cancel("placer")


def start_load(app: web.Application) -> None:
    """Publish this replica's demand for the autoscaler, and let requests for a model scaled
    to zero wait for its replica (docs/autoscaling.md)."""
    config = app[CONFIG]
    proxy = app[PROXY]
    deployed = app[DEPLOYED]
    router = app[ROUTER]
    publisher = LoadPublisher(
        app[STORE], Keys(config.etcd_prefix), load_replica(config), router,
        queued=lambda: queued_models(proxy.waiting, deployed),
        totals=lambda: model_totals(request_totals(app[METRICS])),
        interval=config.load_interval)

    def cold(pool: object) -> float | None:
        # A pool is a model id, or a route's deployment (an object with a name).
        d = (deployed.autoscaled(pool) if isinstance(pool, str)
             else deployed.deployments.get(str(getattr(pool, "name", ""))))
        if d is None or d.autoscale is None:
            return None
        if any(b.ready and d.model in b.models for b in router.backends.values()):
            return None
        return config.cold_start_timeout

    proxy.cold_start, proxy.cold_start_queue = cold, config.cold_start_queue
    proxy.on_queue = lambda _pool: publisher.poke()
    app[GUARD].spawn("load-publisher", publisher.run())


def queued_models(waiting: dict[object, int], deployed: DeployedModels) -> dict[str, int]:
    """Queued requests by model (a route's deployment pool counts for its model)."""
    out: dict[str, int] = {}
    for pool, n in waiting.items():
        if isinstance(pool, str):
            model: str | None = pool
        else:
            d = deployed.deployments.get(str(getattr(pool, "name", "")))
            model = None if d is None else d.model
        if model is not None:
            out[model] = out.get(model, 0) + n
    return out


def model_totals(totals: dict[tuple[str, str], float]) -> dict[str, float]:
    """The request counter summed by model."""
    out: dict[str, float] = {}
    for (model, _backend), n in totals.items():
        if model:
            out[model] = out.get(model, 0.0) + n
    return out


def load_replica(config: SchedulerConfig) -> str:
    """This replica's name in ``{prefix}/load/``: host, process and port, key-safe."""
    raw = f"{socket.gethostname()}-{os.getpid()}-{config.listen.rpartition(':')[2]}"
    return re.sub(r"[^A-Za-z0-9_.-]", "-", raw)


def placer_holder(config: SchedulerConfig) -> str:
    """Who the leader record names: this host and process, for operators and logs."""
    return f"{socket.gethostname()}:{os.getpid()} ({config.listen})"


def status_line(app: web.Application) -> str:
    """One line for ``systemctl status``."""
    if not app[REGISTRY_VIEW].synced:
        return "loading the backend table from etcd"
    counts = app[ROUTER].counts(time.monotonic())
    etcd = "etcd connected" if etcd_connected(app) else "etcd away, routing on the last view"
    return (f"{counts['ready']} backends ready, {counts['ejected']} ejected, "
            f"{counts['not_ready']} not ready; {etcd}")


def table_loaded(app: web.Application) -> bool:
    """READY=1 waits for the backend table: routing before it would answer 404s."""
    return app[REGISTRY_VIEW].synced


def engine_key(config: SchedulerConfig) -> str | None:
    """The key the engines demand (engine_api_key_file), or None."""
    if config.engine_api_key_file is None:
        return None
    with open(config.engine_api_key_file, encoding="utf-8") as fh:
        return fh.read().strip()


def build_app(config: SchedulerConfig) -> web.Application:
    """The scheduler application; a ``STORE`` or ``NOTIFIER`` set before start-up is used as
    it is (and not closed), else they are made from config and the environment."""
    app = web.Application(client_max_size=config.max_body_bytes,
                          middlewares=[openai_shaped_errors])
    init_daemon(app, DaemonSpec(etcd=list(config.etcd), status=status_line, ready=table_loaded,
                                security=config.etcd_security()))
    keys = list(config.api_keys)
    if config.api_keys_file:
        keys += read_keys_file(config.api_keys_file)
    metrics = SchedulerMetrics()
    router = Router(
        eject_threshold=config.eject_failures, eject_base_s=config.eject_base_seconds,
        eject_max_s=config.eject_max_seconds, max_inflight=config.max_inflight_per_backend)
    proxy = Proxy(router, RetryBudget(ratio=config.retry_budget_ratio), metrics, ProxySettings(
        connect_timeout=config.connect_timeout, first_byte_timeout=config.first_byte_timeout,
        stream_idle_timeout=config.stream_idle_timeout, request_timeout=config.request_timeout,
        queue_timeout=config.queue_timeout, max_attempts=config.max_attempts,
        strip_authorization=bool(keys), client_write_timeout=config.client_write_timeout,
        hide_names=config.hide_internal_names,
        max_connections_per_backend=config.max_connections_per_backend,
        engine_api_key=engine_key(config)))
    ring = KeyRing(Keys(config.etcd_prefix), keys, replica=load_replica(config),
                   on_bad_record=metrics.bad_records.inc, on_enabled=proxy.strip_authorization)
    registry = Registry(router, Keys(config.etcd_prefix), on_change=proxy.notify,
                        on_bad_record=metrics.bad_records.inc,
                        on_reset=metrics.etcd_resyncs.inc,
                        networks=networks(config.backend_networks))
    app[CONFIG] = config
    app[ROUTER] = router
    app[PROXY] = proxy
    app[REGISTRY_VIEW] = registry
    app[AUTH] = ring
    metrics.registry.register(KeyCollector(ring))
    app[METRICS] = metrics
    app[FAILOVERS] = status.FailoverLog()
    proxy.on_failover = app[FAILOVERS].add
    app[RATES] = status.RequestRates(lambda: request_totals(metrics))
    app[ETCD_VIEW] = status.EtcdView(Keys(config.etcd_prefix))
    app[DEPLOYED] = DeployedModels(Keys(config.etcd_prefix),
                                   on_bad_record=metrics.bad_records.inc)
    app[ROUTES] = RouteService(
        Keys(config.etcd_prefix), router, app[DEPLOYED], metrics.registry,
        replica=f"{socket.gethostname()}-{os.getpid()}-{config.listen.rpartition(':')[2]}",
        on_bad_record=metrics.bad_records.inc)
    app[REGISTRY] = metrics.registry
    hardening.install(app, max_concurrent=config.max_concurrent_requests,
                      hide_names=config.hide_internal_names,
                      metrics_networks=config.metrics_networks,
                      backend_networks=config.backend_networks, registry=metrics.registry,
                      on_stop=[proxy.cut_streams])
    for path in OPENAI_POST_PATHS:
        app.router.add_post(path, handle_openai)
    app.router.add_get("/v1/models", handle_models)
    app.router.add_get("/healthz", handle_healthz)
    app.router.add_get("/readyz", handle_readyz)
    app.router.add_get("/metrics", handle_metrics_fresh)
    app.router.add_get("/", handle_status)
    app.router.add_get("/v1/cluster", handle_cluster)
    # notify_ctx last, so that on the way out STOPPING=1 goes first.
    app.cleanup_ctx.extend([proxy_ctx, store_ctx, watch_ctx, routes_ctx, keys_ctx,
                            placer_ctx, notify_ctx])
    return app
