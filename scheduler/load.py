"""This scheduler replica's demand, published for the autoscaler (docs/autoscaling.md).

:func:`snapshot` reads what the replica already knows: requests in flight on each backend
(the router's ``Backend.inflight``), requests queued for a backend per model (the proxy's
queue), and the request counter, whose growth says when a model last had a request.
:class:`LoadPublisher` writes it to ``{prefix}/load/{replica}`` under this replica's own
lease, at most every ``interval`` seconds and only when it changed, but at once when a model
with nothing queued gets a queued request (a cold start is waiting for that write).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping

from common.keys import Keys
from common.records import BackendInflight, ModelLoad, SchedulerLoad, dump
from common.store import StoreError
from common.store_api import Store
from scheduler.routing import Router

log = logging.getLogger(__name__)

POLL_S = 0.25  # how often the figures are looked at (a write still waits for ``interval``)
LEASE_TTL = 10


def snapshot(replica: str, router: Router, queued: Mapping[str, int],
             last_request: Mapping[str, float], now: float) -> SchedulerLoad:
    """The load record for the figures now (``last_request`` already brought up to date)."""
    inflight: dict[str, int] = {}
    backends = []
    for b in router.backends.values():
        if b.inflight > 0:
            backends.append(BackendInflight(b.key, b.inflight))
            for m in b.models:
                inflight[m] = inflight.get(m, 0) + b.inflight
    models = sorted(set(inflight) | set(queued) | set(last_request))
    return SchedulerLoad(
        replica=replica,
        models=[ModelLoad(m, inflight.get(m, 0), queued.get(m, 0), last_request.get(m, 0.0))
                for m in models],
        backends=sorted(backends, key=lambda x: x.backend), updated_at=now)


class LoadPublisher:
    """Keeps ``{prefix}/load/{replica}`` true, under a lease of its own."""

    def __init__(self, store: Store, keys: Keys, replica: str, router: Router, *,
                 queued: Callable[[], Mapping[str, int]],
                 totals: Callable[[], Mapping[str, float]], interval: float = 2.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.keys = keys
        self.replica = replica
        self.router = router
        self._queued = queued
        self._totals = totals
        self.interval = interval
        self.clock = clock
        self.last_request: dict[str, float] = {}
        self._counts: dict[str, float] = {}
        self._poke = asyncio.Event()
        self._lease: int | None = None
        self._published: SchedulerLoad | None = None
        self._published_at = 0.0
        self.writes = 0

    def poke(self) -> None:
        """A request was queued: look now (a cold model's demand is written at once)."""
        self._poke.set()

    def current(self) -> SchedulerLoad:
        """The record as of now; also notes which models had requests since last time."""
        now = self.clock()
        queued = {m: n for m, n in self._queued().items() if n > 0}
        for model, total in self._totals().items():
            if total > self._counts.get(model, 0.0):
                self.last_request[model] = now
            self._counts[model] = total
        record = snapshot(self.replica, self.router, queued, self.last_request, now)
        for m in record.models:
            if m.inflight or m.queued:
                self.last_request[m.model] = now
                m.last_request_at = now
        return record

    def _due(self, record: SchedulerLoad, now: float) -> bool:
        old = self._published
        if old is None:
            return True
        if (old.models, old.backends) == (record.models, record.backends):
            return False
        before = {m.model: m.queued for m in old.models}
        cold = any(m.queued and not before.get(m.model) for m in record.models)
        return cold or now - self._published_at >= self.interval

    async def publish_once(self) -> bool:
        """Write the record if it is due; True when written."""
        record = self.current()
        now = self.clock()
        if not self._due(record, now):
            return False
        if self._lease is None:
            self._lease = await self.store.grant_lease(LEASE_TTL)
        await self.store.put(self.keys.load(self.replica), dump(record), lease=self._lease)
        self._published, self._published_at = record, now
        self.writes += 1
        return True

    async def run(self) -> None:
        """The eternal task: publish, keep the lease alive, retry after an etcd error."""
        refreshed = time.monotonic()
        try:
            while True:
                try:
                    await self.publish_once()
                    if self._lease is not None and \
                            time.monotonic() - refreshed >= LEASE_TTL / 3:
                        await self.store.keep_alive(self._lease)
                        refreshed = time.monotonic()
                except StoreError as err:
                    # Lost lease or etcd away: start over with a new lease and a full write.
                    log.warning("load record not written: %s", err)
                    self._lease, self._published = None, None
                    await asyncio.sleep(1.0)
                self._poke.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._poke.wait(), POLL_S)
        finally:
            if self._lease is not None:
                with contextlib.suppress(StoreError, OSError):
                    await self.store.revoke_lease(self._lease)
