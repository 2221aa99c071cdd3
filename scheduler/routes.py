"""Routes: a model name clients ask for that the scheduler splits over targets by weight,
with an ordered fallback list and an optional guard (docs/routes.md).

:class:`RouteTable` follows ``{prefix}/routes/`` from etcd. :func:`pick` is the pure choice
of one target for one request. :class:`RouteService` resolves a request's model, rewrites the
body for the target's model, forwards it through the proxy, and keeps the figures: Prometheus
series per route and target, a sliding window per target that the guard checks, output
tokens per backend for the cost figures, and a :class:`RouteStats` record that it publishes
under its own lease every few seconds for ``aivmmctl routes`` and the status page.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram

from common import audit
from common.keys import Keys
from common.records import (
    BackendFigures,
    GuardTrip,
    RecordError,
    RouteRecord,
    RouteStats,
    TargetFigures,
    dump,
    parse_route,
)
from common.store import Compare, Event, LeaseLost, Reset, StoreError
from scheduler.deployed import DeployedModels
from scheduler.errors import error_response
from scheduler.request import REQUEST_DATA
from scheduler.routing import Backend, Deployed, Pool, Router
from scheduler.tap import TAP, Tap

log = logging.getLogger(__name__)

ROUTE_HEADER = "x-aivmm-route"
# How often a replica rewrites its figures record, and the lease that takes it away.
PUBLISH_EVERY_S = 5.0
STATS_LEASE_TTL = 15
# The window of the p95 published for targets of routes without a guard.
DEFAULT_WINDOW_S = 60.0
# The guard looks at a target's window at most this often (its figures move slowly).
GUARD_EVERY_S = 0.2
WINDOW_MAX = 20000  # samples kept per target, whatever the window
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class RouteStore(Protocol):
    def sync_prefix(self, prefix: str) -> AsyncIterator[Reset | Event]: ...


# -- the pure choice ----------------------------------------------------------------------------

def _weighted(options: Sequence[tuple[str, int]], rng: random.Random) -> str:
    x = rng.random() * sum(w for _, w in options)
    for name, w in options:
        x -= w
        if x < 0:
            return name
    return options[-1][0]


def pick(route: RouteRecord, ready: Callable[[str], bool], rng: random.Random
         ) -> tuple[str, bool] | None:
    """The target for one request and whether it is a fallback; None when the route has
    nothing left (every target tripped or weighted 0, and no fallback).

    A weighted draw over the targets that have a ready backend (weight > 0, not tripped);
    when none has, the first fallback in order that has; when nothing is ready anywhere,
    a weighted draw over all live targets (the request then queues for it as usual).
    """
    tripped = {t.target for t in route.tripped}
    live = [(t.target, t.weight) for t in route.targets
            if t.weight > 0 and t.target not in tripped]
    up = [tw for tw in live if ready(tw[0])]
    if up:
        return _weighted(up, rng), False
    others = [f for f in route.fallback if f not in tripped]
    for f in others:
        if ready(f):
            return f, True
    if live:
        return _weighted(live, rng), False
    return (others[0], True) if others else None


def p95(values: Sequence[float]) -> float | None:
    """The 95th percentile (nearest rank) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


# -- the table ------------------------------------------------------------------------------------

class RouteTable:
    """Routes by name, kept from etcd (as :class:`DeployedModels` keeps deployments)."""

    def __init__(self, keys: Keys, on_bad_record: Callable[[], None] = lambda: None,
                 on_change: Callable[[str, RouteRecord | None], None] = lambda *_: None
                 ) -> None:
        self.keys = keys
        self.on_bad_record = on_bad_record
        self.on_change = on_change
        self.routes: dict[str, RouteRecord] = {}

    def _put(self, key: str, value: bytes) -> None:
        name = key.removeprefix(self.keys.routes)
        try:
            record = parse_route(value)
        except RecordError as err:
            log.warning("skipping unusable route", extra={"key": key, "error": str(err)})
            self._drop(name)
            self.on_bad_record()
            return
        if record.name != name:
            log.warning("skipping route named unlike its key", extra={"key": key})
            self._drop(name)
            self.on_bad_record()
            return
        self.routes[name] = record
        self.on_change(name, record)

    def _drop(self, name: str) -> None:
        if self.routes.pop(name, None) is not None:
            self.on_change(name, None)

    def apply(self, item: Reset | Event) -> None:
        if isinstance(item, Reset):
            for name in list(self.routes):
                self._drop(name)
            for kv in item.snapshot.items:
                self._put(kv.key, kv.value)
        elif item.kind == "delete":
            self._drop(item.key.removeprefix(self.keys.routes))
        else:
            self._put(item.key, item.value)

    async def run(self, source: RouteStore) -> None:
        """Follow etcd forever (an eternal task)."""
        async for item in source.sync_prefix(self.keys.routes):
            self.apply(item)
        raise RuntimeError("the etcd route watch ended")


# -- figures ------------------------------------------------------------------------------------

@dataclass(slots=True)
class _Target:
    """This replica's figures for one target of one route."""

    figures: TargetFigures
    # (monotonic time, error, ttft seconds or None) of recent requests, for guard and p95.
    window: collections.deque[tuple[float, bool, float | None]] = field(
        default_factory=lambda: collections.deque(maxlen=WINDOW_MAX))
    errors: int = 0  # errors in the window
    checked_at: float = 0.0  # when the p95 was last looked at
    tripping: bool = False  # a trip is being written; do not ask twice

    def add(self, now: float, error: bool, ttft: float | None) -> None:
        if len(self.window) == self.window.maxlen and self.window[0][1]:
            self.errors -= 1
        self.window.append((now, error, ttft))
        self.errors += error

    def trim(self, now: float, window_s: float) -> None:
        w = self.window
        while w and w[0][0] < now - window_s:
            self.errors -= w.popleft()[1]

    def clear(self) -> None:
        self.window.clear()
        self.errors = 0


@dataclass(frozen=True, slots=True)
class Choice:
    """Where one request of a route goes."""

    route: str
    target: str
    pool: Pool
    model: str
    fallback: bool


class RouteMetrics:
    """The per-route, per-target series, and output tokens per backend."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        labels = ["route", "target"]
        self.requests = Counter("aivmm_route_requests_total",
                                "Requests of a route by the target that served them",
                                labels, registry=r)
        self.errors = Counter("aivmm_route_errors_total",
                              "Requests of a route that failed (5xx or a broken stream)",
                              labels, registry=r)
        self.fallbacks = Counter("aivmm_route_fallbacks_total",
                                 "Requests of a route sent to a fallback target", labels,
                                 registry=r)
        self.ttft = Histogram("aivmm_route_time_to_first_token_seconds",
                              "From request received to the answer's first byte", labels,
                              buckets=_BUCKETS, registry=r)
        self.tokens = Counter("aivmm_route_output_tokens_total",
                              "Output tokens of a route's answers", labels, registry=r)
        self.generation = Counter("aivmm_route_generation_seconds_total",
                                  "Seconds spent generating the output tokens counted",
                                  labels, registry=r)
        self.trips = Counter("aivmm_route_guard_trips_total",
                             "Targets this replica's guard set to weight 0", labels,
                             registry=r)
        self.backend_tokens = Counter("aivmm_scheduler_output_tokens_total",
                                      "Output tokens served, by model and backend",
                                      ["model", "backend"], registry=r)

    def forget_backend(self, key: str) -> None:
        doomed = {(s.labels["model"], s.labels["backend"])
                  for fam in self.backend_tokens.collect() for s in fam.samples
                  if s.labels.get("backend") == key}
        for values in doomed:
            self.backend_tokens.remove(*values)

    def forget(self, route: str) -> None:
        for metric in (self.requests, self.errors, self.fallbacks, self.ttft, self.tokens,
                       self.generation, self.trips):
            doomed = {(s.labels["route"], s.labels["target"])
                      for fam in metric.collect() for s in fam.samples
                      if s.labels.get("route") == route}
            for values in doomed:
                metric.remove(*values)


class Proxying(Protocol):
    async def forward(self, request: web.Request, body: bytes, model: str, *,
                      pool: Pool | None = None) -> web.StreamResponse: ...


class RouteService:
    """Routes requests whose model names a route, and keeps every figure routes need."""

    def __init__(self, keys: Keys, router: Router, deployed: DeployedModels,
                 registry: CollectorRegistry, *, replica: str,
                 rng: random.Random | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 on_bad_record: Callable[[], None] = lambda: None) -> None:
        self.keys = keys
        self.router = router
        self.deployed = deployed
        self.replica = replica
        self.rng = rng or random.Random()
        self.clock = clock
        self.metrics = RouteMetrics(registry)
        self.table = RouteTable(keys, on_bad_record=on_bad_record, on_change=self._changed)
        self.since = time.time()
        self.targets: dict[tuple[str, str], _Target] = {}
        # backend key -> [output tokens, wall time of its first request here]
        self.served: dict[str, list[float]] = {}
        self._trips: asyncio.Queue[tuple[str, GuardTrip]] = asyncio.Queue()
        self._published: Any = None
        self.publish_every = PUBLISH_EVERY_S
        previous = router.on_remove

        def removed(b: Backend) -> None:
            previous(b)
            self.served.pop(b.key, None)
            self.metrics.forget_backend(b.key)
        router.on_remove = removed

    # -- resolution -------------------------------------------------------------------------

    def has(self, name: str) -> bool:
        return name in self.table.routes

    def names(self, now: float) -> list[str]:
        """The routes that could serve a request now (for /v1/models)."""
        return sorted(name for name, r in self.table.routes.items()
                      if any(self._ready(t.target, now) for t in r.targets)
                      or any(self._ready(f, now) for f in r.fallback))

    def _pool(self, target: str) -> tuple[Pool, str]:
        """A target's backend pool and the model its requests are sent upstream as: a
        deployment's replicas and its model, else every backend of the model so named."""
        d = self.deployed.deployments.get(target)
        if d is not None:
            return Deployed(target), d.model
        models = self.router.deployment_models(target)
        if models:
            return Deployed(target), models[0]
        return target, target

    def _ready(self, target: str, now: float) -> bool:
        return self.router.has_usable(self._pool(target)[0], now)

    def choose(self, name: str, now: float) -> Choice | None:
        """Where a request of route ``name`` goes; None when it is not a route or has
        nothing left to send to."""
        route = self.table.routes.get(name)
        if route is None:
            return None
        picked = pick(route, lambda t: self._ready(t, now), self.rng)
        if picked is None:
            return None
        target, fallback = picked
        pool, model = self._pool(target)
        return Choice(name, target, pool, model, fallback)

    # -- a request --------------------------------------------------------------------------

    async def forward(self, request: web.Request, body: bytes, model: str,
                      proxy: Proxying) -> web.StreamResponse:
        """Forward one admitted request, through its route's choice when ``model`` names a
        route, and count what it served."""
        start = self.clock()
        tap = Tap(start)
        request[TAP] = tap
        choice: Choice | None = None
        upstream = model
        pool: Pool | None = None
        if model in self.table.routes:
            choice = self.choose(model, start)
            if choice is None:
                return error_response(
                    503, f"route '{model}' has no target left (all tripped or weighted 0, "
                    "and no fallback)", "no_backend", headers={"Retry-After": "1"})
            upstream, pool = choice.model, choice.pool
            tap.headers[ROUTE_HEADER] = f"{choice.route}/{choice.target}"
            if upstream != model:
                body = _with_model(body, upstream, request.get(REQUEST_DATA))
        status = 499
        try:
            resp = await proxy.forward(request, body, upstream, pool=pool)
            status = resp.status
            return resp
        finally:
            self.finish(tap, choice, upstream, status)

    def finish(self, tap: Tap, choice: Choice | None, model: str, status: int) -> None:
        """Account one request that ended with ``status`` (499: the client left)."""
        now = self.clock()
        tokens = tap.output_tokens() if tap.first_at is not None else 0
        if tap.backend and tokens:
            self.metrics.backend_tokens.labels(model, tap.backend).inc(tokens)
            served = self.served.setdefault(tap.backend, [0, time.time()])
            served[0] += tokens
        if choice is None:
            return
        labels = (choice.route, choice.target)
        t = self._target(*labels)
        f = t.figures
        error = status >= 500 or tap.broken
        f.requests += 1
        self.metrics.requests.labels(*labels).inc()
        if choice.fallback:
            f.fallbacks += 1
            self.metrics.fallbacks.labels(*labels).inc()
        if error:
            f.errors += 1
            self.metrics.errors.labels(*labels).inc()
        ttft = None if tap.first_at is None else tap.first_at - tap.start
        if ttft is not None and not error:
            f.ttft_sum_s += ttft
            f.ttft_count += 1
            self.metrics.ttft.labels(*labels).observe(ttft)
        if tokens:
            begun = tap.first_at if tap.sse and tap.first_at is not None else tap.start
            seconds = max(now - begun, 0.0)
            f.output_tokens += tokens
            f.generation_s += seconds
            self.metrics.tokens.labels(*labels).inc(tokens)
            self.metrics.generation.labels(*labels).inc(seconds)
        if status == 499:
            return  # the client's doing: neither the target's success nor its failure
        t.add(now, error, None if error else ttft)
        self._check(choice.route, choice.target, t, now)

    def _target(self, route: str, target: str) -> _Target:
        t = self.targets.get((route, target))
        if t is None:
            t = self.targets[(route, target)] = _Target(TargetFigures(route, target))
        return t

    # -- the guard --------------------------------------------------------------------------

    def _check(self, name: str, target: str, t: _Target, now: float) -> None:
        route = self.table.routes.get(name)
        guard = route.guard if route is not None else None
        if guard is None or route is None or t.tripping:
            return
        if any(x.target == target for x in route.tripped):
            return
        t.trim(now, guard.window_s)
        n = len(t.window)
        if n < guard.min_requests:
            return
        errors = t.errors
        rate = errors / n
        # The error rate is kept as a running count, so it is judged after every request;
        # the p95 needs a sort of the window, so it is judged at most every GUARD_EVERY_S.
        failing = guard.max_error_rate is not None and rate > guard.max_error_rate
        if not failing and (guard.max_p95_ttft_ms is None or
                            now - t.checked_at < GUARD_EVERY_S):
            return
        t.checked_at = now
        high = p95([s for _, _, s in t.window if s is not None])
        high_ms = None if high is None else high * 1000
        why = None
        if failing:
            why = f"error rate {rate:.2f} > {guard.max_error_rate:g}"
        elif (guard.max_p95_ttft_ms is not None and high_ms is not None
              and high_ms > guard.max_p95_ttft_ms):
            why = f"p95 time to first token {high_ms:.0f} ms > {guard.max_p95_ttft_ms:g} ms"
        if why is None:
            return
        trip = GuardTrip(target=target, at=time.time(), by=self.replica,
                         reason=f"{why} over {guard.window_s:g}s ({n} requests, "
                         f"{errors} errors)", requests=n, errors=errors,
                         p95_ttft_ms=None if high_ms is None else round(high_ms, 1))
        t.tripping = True
        # Out of this replica's choice at once; the others follow the record's watch.
        route.tripped.append(trip)
        self.metrics.trips.labels(name, target).inc()
        log.warning("route guard tripped", extra={"route": name, "target": target,
                                                   "reason": trip.reason})
        self._trips.put_nowait((name, trip))

    def _changed(self, name: str, record: RouteRecord | None) -> None:
        """A route changed in etcd: forget the window of targets restored or gone, so an
        old spell of failures does not trip a restored target again at once."""
        tripped = set() if record is None else {t.target for t in record.tripped}
        present = set() if record is None else (
            {t.target for t in record.targets} | set(record.fallback))
        for (route, target), t in list(self.targets.items()):
            if route != name:
                continue
            if target not in present:
                del self.targets[(route, target)]
            elif target not in tripped:
                if t.tripping:
                    continue  # our own trip is still on its way to etcd
                t.clear()
            else:
                t.tripping = False
        if record is None:
            self.metrics.forget(name)

    async def run_guard(self, store: Any) -> None:
        """Write each trip into its route record (compare-and-swap, with an audit entry),
        retrying while etcd is away; an eternal task."""
        while True:
            name, trip = await self._trips.get()
            delay = 0.5
            while not await self._write_trip(store, name, trip):
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def _write_trip(self, store: Any, name: str, trip: GuardTrip) -> bool:
        """True when written, or when there is nothing to write any more."""
        key = self.keys.route(name)
        try:
            kv = await store.get_item(key)
            if kv is None:
                return True
            try:
                record = parse_route(kv.value)
            except RecordError:
                return True
            if trip.target not in {t.target for t in record.targets} | set(record.fallback) \
                    or any(t.target == trip.target for t in record.tripped):
                return True
            old = orjson.loads(kv.value)
            record.tripped.append(trip)
            change = audit.entry(
                "scheduler", "trip", name, old=old, new=record, who=self.replica,
                detail=f"target {trip.target} weight -> 0: {trip.reason}")
            result = await store.txn([Compare.modified(key, kv.mod_revision)],
                                     puts=[(key, dump(record)), audit.audit_put(self.keys,
                                                                                change)])
            return bool(result.succeeded)
        except StoreError as err:
            log.info("route trip not written yet", extra={"route": name, "error": str(err)})
            return False

    # -- publishing -------------------------------------------------------------------------

    def stats(self) -> RouteStats:
        """This replica's figures now."""
        now = self.clock()
        wall = time.time()
        targets = []
        for (name, _), t in sorted(self.targets.items()):
            route = self.table.routes.get(name)
            window = route.guard.window_s if route is not None and route.guard else \
                DEFAULT_WINDOW_S
            t.trim(now, window)
            high = p95([s for _, _, s in t.window if s is not None])
            f = t.figures
            f.p95_ttft_ms = None if high is None else round(high * 1000, 1)
            targets.append(dataclasses.replace(f))
        backends = [BackendFigures(key, int(tokens), round(max(wall - first, 0.0), 1))
                    for key, (tokens, first) in sorted(self.served.items())]
        return RouteStats(replica=self.replica, since=self.since, updated_at=wall,
                          targets=targets, backends=backends)

    async def publish(self, store: Any) -> None:
        """Put :meth:`stats` under this replica's own lease every ``publish_every`` s, when
        anything was served since the last put; an eternal task. The lease is revoked on
        the way out, so the record goes with the replica."""
        key = self.keys.route_stats_of(self.replica)
        lease: int | None = None
        try:
            while True:
                await asyncio.sleep(self.publish_every)
                if not self.targets and not self.served:
                    continue
                try:
                    if lease is None:
                        lease = await store.grant_lease(STATS_LEASE_TTL)
                        self._published = None
                    else:
                        await store.keep_alive(lease)
                    s = self.stats()
                    figures = ([(t.route, t.target, t.requests) for t in s.targets],
                               [(b.backend, b.output_tokens) for b in s.backends])
                    if figures != self._published:
                        await store.put(key, dump(s), lease=lease)
                        self._published = figures
                except LeaseLost:
                    lease = None
                except StoreError as err:
                    log.debug("route figures not published: %s", err)
        finally:
            if lease is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(store.revoke_lease(lease), 2.0)


def _with_model(body: bytes, model: str, data: dict[str, Any] | None = None) -> bytes:
    """The request body with its ``model`` replaced (the proxy sends bytes as they are);
    ``data`` is the body already parsed, if it was (it is left as it is)."""
    return orjson.dumps({**(orjson.loads(body) if data is None else data), "model": model})
