"""Publishing this node and its backends in etcd under a lease, through etcd outages.

The node record (with ``heartbeat_at`` and the GPU figures) is rewritten and the lease kept
alive every ``heartbeat_interval``; a backend record is written as soon as it changes and
deleted when its backend goes. Measurement noise is not a change: a record whose only
difference from the copy in etcd is a probe latency or engine load within a small band is
not rewritten (:func:`worth_writing`), so an idle fleet writes only its node records and
every scheduler's watch stays quiet (bench/fleet.py: 16 backend puts per heartbeat before).
While etcd is away the containers keep running; the loop retries with jittered backoff
capped at one interval and, once etcd answers, puts every record again (under a new lease if
the old one expired).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
from collections.abc import Callable

from agent.metrics import AgentMetrics
from common.backoff import Backoff
from common.keys import Keys
from common.records import BackendLoad, BackendRecord, NodeRecord, dump
from common.store import StoreError, StoreUnavailable
from common.store_api import Store

log = logging.getLogger(__name__)
REVOKE_TIMEOUT_S = 3.0
TXN_OPS = 128  # etcd's default --max-txn-ops


# Fields that move with every probe; all others are compared exactly.
_NOISY = frozenset({"probe_latency_ms", "load"})
_STEADY = tuple(f.name for f in dataclasses.fields(BackendRecord) if f.name not in _NOISY)


def _moved(old: float | None, new: float | None, rel: float, floor: float) -> bool:
    if old is None or new is None:
        return old is not new
    return abs(new - old) >= max(floor, rel * abs(old))


def worth_writing(old: BackendRecord | None, new: BackendRecord) -> bool:
    """Whether ``new`` differs from the copy in etcd (``old``) by more than noise.

    Anything but probe latency and load counts exactly. The engine's queue (``waiting``, a
    routing input) counts exactly too. Probe latency counts once it moves by 25 % (at least
    1 ms), ``running`` by 25 % (at least 1), KV-cache usage by 0.05: the schedulers' view
    stays within those bands of the truth for no write at all while nothing really changes.
    """
    if old is None or any(getattr(old, f) != getattr(new, f) for f in _STEADY):
        return True
    if _moved(old.probe_latency_ms, new.probe_latency_ms, 0.25, 1.0):
        return True
    a, b = old.load, new.load
    if a is None or b is None:
        return a is not b
    return (a.waiting != b.waiting or _moved(a.running, b.running, 0.25, 1)
            or _moved(a.kv_cache_usage, b.kv_cache_usage, 0.0, 0.05))


def _snapshot(record: BackendRecord) -> BackendRecord:
    # Our own copy: a record source may reuse and mutate the objects it hands out.
    load = record.load
    return dataclasses.replace(record, models=list(record.models), gpus=list(record.gpus),
                               load=None if load is None else BackendLoad(
                                   load.running, load.waiting, load.kv_cache_usage))


class Heartbeat:
    """Owns the agent's lease and the records bound to it."""

    def __init__(self, store: Store, keys: Keys, *, node: str, interval: float, ttl: int,
                 node_record: Callable[[], NodeRecord],
                 backends: Callable[[], list[BackendRecord]], metrics: AgentMetrics,
                 rng: random.Random | None = None) -> None:
        self.store = store
        self.keys = keys
        self.node = node
        self.interval = interval
        self.ttl = ttl
        self._node_record = node_record
        self._backends = backends
        self.metrics = metrics
        self._rng = rng or random.Random()
        self._changed = asyncio.Event()
        self.lease: int | None = None
        self._written: dict[str, BackendRecord] = {}  # as last put in etcd
        self._node_dirty = False  # the node record changed (a GPU came or went)
        self.connected = False
        self.activity = "registering in etcd"

    def poke(self) -> None:
        """A backend changed: write it now rather than at the next heartbeat."""
        self._changed.set()

    def node_changed(self) -> None:
        """The node itself changed (a GPU appeared or went): rewrite its record now."""
        self._node_dirty = True
        self._changed.set()

    async def run(self) -> None:
        """Forever: keep the lease, publish changes, survive etcd going away."""
        # Jittered so that a fleet cut off from etcd together does not retry in lockstep.
        retry = Backoff(initial=0.2, cap=self.interval, jitter=0.5, rng=self._rng)
        next_beat = 0.0
        while True:
            now = time.monotonic()
            beat = now >= next_beat
            self._changed.clear()
            try:
                await self._once(beat)
            except StoreUnavailable as err:
                self._lost_contact(str(err))
                await asyncio.sleep(retry.next())
                continue
            except StoreError as err:
                # The lease is gone (expired while we were cut off, or revoked by hand):
                # start over with a new one and every record re-put.
                log.warning("etcd refused the heartbeat, registering anew: %s", err)
                self.metrics.etcd_errors.labels(self.node).inc()
                self.lease = None
                self._written.clear()
                await asyncio.sleep(retry.next())
                continue
            retry.reset()
            if beat:
                next_beat = now + self.interval
            if not self.connected:
                log.info("registered in etcd", extra={"lease": f"{self.lease:x}"})
            self.connected = True
            self.activity = "heartbeating"
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(),
                                       max(0.0, next_beat - time.monotonic()))

    def _lost_contact(self, why: str) -> None:
        if self.connected:
            log.warning("etcd unreachable, backends keep running: %s", why)
        self.connected = False
        self.activity = "etcd unreachable, retrying"
        self.metrics.etcd_errors.labels(self.node).inc()
        # After an outage nothing is known about etcd's content: write everything again.
        self._written.clear()

    async def _once(self, beat: bool) -> None:
        if self.lease is None:
            self.lease = await self.store.grant_lease(self.ttl)
            self._written.clear()
            beat = True
        elif beat:
            await self.store.keep_alive(self.lease)
        if beat or self._node_dirty:
            self._node_dirty = False
            record = self._node_record()
            record.heartbeat_at = time.time()
            await self.store.put(self.keys.node(self.node), dump(record), lease=self.lease)
            self.metrics.heartbeats.labels(self.node).inc()
        await self._publish_backends()

    async def _publish_backends(self) -> None:
        current = {self.keys.backend(self.node, r.name): r for r in self._backends()}
        changed = [(k, r) for k, r in current.items() if worth_writing(self._written.get(k), r)]
        # One transaction per batch rather than one put per record: registering a node with
        # 16 backends is one round trip, not 16 (etcd allows 128 operations per transaction).
        for i in range(0, len(changed), TXN_OPS):
            batch = changed[i:i + TXN_OPS]
            await self.store.put_many([(k, dump(r)) for k, r in batch], lease=self.lease)
            for key, record in batch:
                self._written[key] = _snapshot(record)
        for key in [k for k in self._written if k not in current]:
            await self.store.delete(key)
            del self._written[key]

    async def revoke(self) -> None:
        """Revoke the lease so this node's records vanish now (the agent is stopping)."""
        lease, self.lease = self.lease, None
        if lease is None:
            return
        try:
            # Stopping must not hang on an etcd that is away; the lease then expires alone.
            await asyncio.wait_for(self.store.revoke_lease(lease), REVOKE_TIMEOUT_S)
            log.info("lease revoked")
        except (StoreError, TimeoutError) as err:
            log.warning("could not revoke the lease; records expire with it: %s", err)
