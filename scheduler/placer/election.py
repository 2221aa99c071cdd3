"""The placer election: one leader among the scheduler processes, through an etcd lease.

A candidate creates the leader key under its own lease in a transaction that succeeds only
while the key is absent. The key's create revision is the leader's fencing token: every
write the leader makes carries ``Compare.created(key, token)``, so a leader that was cut
off, lost its lease and was replaced (its key deleted by the expiry, a new one created by
the successor) can never write again, whatever it still believes. docs/deployments.md has
the failure cases.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from common.records import LeaderRecord, dump
from common.store import Compare, LeaseLost, StoreClosed, StoreError, StoreUnavailable
from common.store_api import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Fence:
    """What a leader writes under: its lease and the token that fences its writes."""

    key: str
    token: int  # the create revision of the leader key this leader made
    lease: int

    @property
    def compare(self) -> Compare:
        return Compare.created(self.key, self.token)


Work = Callable[[Fence], Coroutine[Any, Any, None]]


class Deposed(StoreError):
    """A fenced write failed its compare: another placer leads now."""


class Election:
    """Campaigns forever; runs ``work(fence)`` while this process leads, cancels it on loss.

    ``ttl`` is the lease: a leader that dies is replaced within it (a leader that stops
    cleanly revokes its lease, and a standby takes over at once). The lease is refreshed
    every ``ttl / 3``; a leader that cannot refresh it for ``ttl`` stops its work itself,
    before a successor can have been elected.
    """

    def __init__(self, store: Store, key: str, holder: str, *, ttl: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.key = key
        self.holder = holder
        self.ttl = ttl
        self._clock = clock
        self.leading = False
        self.terms = 0  # how many times this process was elected (metrics, tests)

    async def run(self, work: Work) -> None:
        """The eternal task: campaign, lead, and campaign again after a loss."""
        retry = 0.2
        while True:
            lease: int | None = None
            try:
                lease = await self.store.grant_lease(self.ttl)
                token = await self._campaign(lease)
                retry = 0.2
                await self._lead(Fence(self.key, token, lease), work)
            except (StoreUnavailable, LeaseLost, Deposed) as err:
                log.info("placer election: %s; campaigning again", err)
                await asyncio.sleep(retry)
                retry = min(retry * 2, self.ttl / 3)
            except StoreClosed:
                raise
            except StoreError as err:
                # etcd refused a request (a permission, a size limit): a bug or a
                # misconfiguration to fix, but no reason to take routing down with the
                # placer. Stand down, say why loudly, and try again later.
                log.error("placer stood down, etcd refused its request: %s", err)
                await asyncio.sleep(max(retry, self.ttl))
                retry = min(retry * 2, self.ttl)
            finally:
                self.leading = False
                if lease is not None:
                    await self._resign(lease)

    async def _resign(self, lease: int) -> None:
        # Revoking deletes the leader key at once, so a standby need not wait out the TTL.
        with contextlib.suppress(StoreError, TimeoutError):
            await asyncio.wait_for(self.store.revoke_lease(lease), 2.0)

    async def _campaign(self, lease: int) -> int:
        """Returns the fencing token once this process holds the leader key."""
        period = self.ttl / 3
        record = dump(LeaderRecord(holder=self.holder, since=time.time()))
        while True:
            result = await self.store.txn([Compare.created(self.key, 0)],
                                          puts=[(self.key, record)], lease=lease)
            if result.succeeded:
                self.leading = True
                self.terms += 1
                log.info("elected placer", extra={"holder": self.holder,
                                                  "token": result.revision})
                return result.revision
            await self._until_vacant(result.revision, period)
            await self.store.keep_alive(lease)

    async def _until_vacant(self, revision: int, period: float) -> None:
        """Wait for the leader key to be deleted after ``revision``, at most ``period``."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(period):
                async with contextlib.aclosing(
                        self.store.watch_prefix(self.key, revision + 1)) as events:
                    async for event in events:
                        if event.key == self.key and event.kind == "delete":
                            return

    async def _lead(self, fence: Fence, work: Work) -> None:
        """Run ``work`` while the lease is kept; returns when leadership is lost."""
        task = asyncio.create_task(work(fence), name="placer-work")
        refreshed = self._clock()
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=self.ttl / 3)
                if done:
                    task.result()  # work is eternal: an end is a failure, raised here
                    raise RuntimeError("the placer's work ended")
                try:
                    await self.store.keep_alive(fence.lease)
                    refreshed = self._clock()
                except LeaseLost:
                    log.warning("placer lease lost; standing down")
                    return
                except StoreUnavailable as err:
                    if self._clock() - refreshed >= self.ttl:
                        # Our lease may have expired: a successor can exist. Stop acting.
                        log.warning("placer lease not refreshed for %ss; standing down: %s",
                                    self.ttl, err)
                        return
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
