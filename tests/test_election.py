"""The placer election on a real etcd: one leader, a standby that takes over, fenced writes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from common.records import parse_leader
from common.store import EtcdStore
from devtools.services import EtcdServer, holds, until
from scheduler.placer.election import Election, Fence


class Worker:
    """Work that records its terms and writes one fenced key per term."""

    def __init__(self, store: EtcdStore, name: str, target: str) -> None:
        self.store = store
        self.name = name
        self.target = target
        self.fences: list[Fence] = []
        self.running = False

    async def __call__(self, fence: Fence) -> None:
        self.fences.append(fence)
        self.running = True
        try:
            await self.store.txn([fence.compare], puts=[(self.target, self.name.encode())])
            await asyncio.Event().wait()
        finally:
            self.running = False


@contextlib.asynccontextmanager
async def candidate(url: str, prefix: str, name: str, ttl: int = 2
                    ) -> AsyncIterator[tuple[Election, Worker, asyncio.Task[None]]]:
    async with EtcdStore([url], timeout=2.0) as store:
        election = Election(store, f"{prefix}/placer/leader", name, ttl=ttl)
        worker = Worker(store, name, f"{prefix}/written-by")
        task = asyncio.create_task(election.run(worker), name=f"election-{name}")
        try:
            yield election, worker, task
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_one_leader_and_a_standby_that_takes_over_when_it_resigns(
        etcd_server: EtcdServer, prefix: str, writer: EtcdStore) -> None:
    # a's lease outlives the wait for b by far: b elected in time means a's revoke freed
    # the seat, not its lease's expiry.
    async with candidate(etcd_server.url, prefix, "a", ttl=15) as (a, wa, ta):
        await until(lambda: wa.running, 5, "a elected")
        async with candidate(etcd_server.url, prefix, "b") as (b, wb, _tb):
            # b campaigns meanwhile; at no moment may it lead beside a.
            await holds(lambda: a.leading and not b.leading and not wb.running, 0.5,
                        "a leading alone")
            leader = await writer.get(f"{prefix}/placer/leader")
            assert leader is not None and parse_leader(leader).holder == "a"
            ta.cancel()  # a stops cleanly: it revokes its lease, b need not wait out the TTL
            with contextlib.suppress(asyncio.CancelledError):
                await ta
            await until(lambda: wb.running, 7, "b elected")
            assert b.leading
            assert await writer.get(f"{prefix}/written-by") == b"b"


async def test_a_deposed_leader_stands_down_and_its_fence_no_longer_writes(
        etcd_server: EtcdServer, prefix: str, writer: EtcdStore) -> None:
    async with candidate(etcd_server.url, prefix, "a") as (_a, wa, _):
        await until(lambda: wa.running, 5, "a elected")
        stale = wa.fences[-1]
        async with candidate(etcd_server.url, prefix, "b") as (b, wb, _):
            # a's lease ends (as if it expired while a was cut off): its key goes with it.
            await writer.revoke_lease(stale.lease)
            await until(lambda: wb.running, 5, "b elected")
            await until(lambda: not wa.running, 5, "a standing down")
            late = await writer.txn([stale.compare], puts=[(f"{prefix}/late", b"x")])
            assert not late.succeeded  # the old term's fence never writes again
            assert await writer.get(f"{prefix}/late") is None
            assert b.leading and wb.fences[-1].token > stale.token


@pytest.mark.parametrize("racers", [4])
async def test_racing_candidates_elect_exactly_one(etcd_server: EtcdServer, prefix: str,
                                                   racers: int) -> None:
    async with contextlib.AsyncExitStack() as stack:
        found = [await stack.enter_async_context(candidate(etcd_server.url, prefix, f"c{i}"))
                 for i in range(racers)]
        await until(lambda: any(w.running for _, w, _ in found), 5, "a leader")
        # The others keep racing a while: never a second leader, at any moment.
        await holds(lambda: sum(e.leading for e, _, _ in found) == 1
                    and sum(w.running for _, w, _ in found) == 1, 0.5, "exactly one leader")


async def test_a_refused_request_stands_the_placer_down_without_ending_it(
        etcd_server: EtcdServer, prefix: str) -> None:
    # etcd refusing the placer's work (here: its transaction exceeds etcd's limits) must not
    # end the eternal task, which would stop the scheduler and its routing with it.
    async with EtcdStore([etcd_server.url], timeout=2.0) as store:
        election = Election(store, f"{prefix}/placer/leader", "r", ttl=2)
        calls = 0

        async def refused(fence: Fence) -> None:
            nonlocal calls
            calls += 1
            too_many = [(f"{prefix}/k{i}", b"x") for i in range(1000)]  # > --max-txn-ops
            await store.txn([fence.compare], puts=too_many)

        task = asyncio.create_task(election.run(refused), name="election-refused")
        try:
            await until(lambda: calls >= 2, 15, "the placer trying again after the refusal")
            assert not task.done()
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
