"""Publishing this node and its backends in etcd under a lease, through etcd outages.

The node record (with ``heartbeat_at`` and the GPU figures) is rewritten and the lease kept
alive every ``heartbeat_interval``; a backend record is written as soon as it changes and
deleted when its backend goes. While etcd is away the containers keep running; the loop
retries with jittered backoff capped at one interval and, once etcd answers, puts every
record again (under a new lease if the old one expired).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable

from agent.metrics import AgentMetrics
from common.keys import Keys
from common.records import BackendRecord, NodeRecord, dump
from common.store import EtcdStore, StoreError, StoreUnavailable

log = logging.getLogger(__name__)
REVOKE_TIMEOUT_S = 3.0


def jittered(delay: float, rng: random.Random) -> float:
    """``delay`` spread over [delay/2, delay] so agents do not retry in lockstep."""
    return delay * (0.5 + rng.random() / 2)


class Heartbeat:
    """Owns the agent's lease and the records bound to it."""

    def __init__(self, store: EtcdStore, keys: Keys, *, node: str, interval: float, ttl: int,
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
        self._written: dict[str, bytes] = {}
        self.connected = False
        self.activity = "registering in etcd"

    def poke(self) -> None:
        """A backend changed: write it now rather than at the next heartbeat."""
        self._changed.set()

    async def run(self) -> None:
        """Forever: keep the lease, publish changes, survive etcd going away."""
        retry = 0.2
        next_beat = 0.0
        while True:
            now = time.monotonic()
            beat = now >= next_beat
            self._changed.clear()
            try:
                await self._once(beat)
            except StoreUnavailable as err:
                self._lost_contact(str(err))
                await asyncio.sleep(jittered(retry, self._rng))
                retry = min(retry * 2, self.interval)
                continue
            except StoreError as err:
                # The lease is gone (expired while we were cut off, or revoked by hand):
                # start over with a new one and every record re-put.
                log.warning("etcd refused the heartbeat, registering anew: %s", err)
                self.metrics.etcd_errors.labels(self.node).inc()
                self.lease = None
                self._written.clear()
                await asyncio.sleep(jittered(retry, self._rng))
                retry = min(retry * 2, self.interval)
                continue
            retry = 0.2
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
        if beat:
            record = self._node_record()
            record.heartbeat_at = time.time()
            await self.store.put(self.keys.node(self.node), dump(record), lease=self.lease)
            self.metrics.heartbeats.labels(self.node).inc()
        await self._publish_backends()

    async def _publish_backends(self) -> None:
        current = {self.keys.backend(self.node, r.name): dump(r) for r in self._backends()}
        for key, value in current.items():
            if self._written.get(key) != value:
                await self.store.put(key, value, lease=self.lease)
                self._written[key] = value
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

    async def deregister(self) -> int:
        """Delete this node's records outright (``--drain``); returns how many went."""
        count = await self.store.delete_prefix(self.keys.node_backends(self.node))
        return count + int(await self.store.delete(self.keys.node(self.node)))
