"""common.store against real etcd servers: keys, leases, watches, resume, resync, failover."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
import urllib.request
from collections.abc import AsyncIterator

import pytest

from common.store import (
    Compacted,
    EtcdStore,
    Event,
    LeaseLost,
    Reset,
    StoreClosed,
    StoreUnavailable,
)
from devtools.services import EtcdServer, free_port, until


def etcd_watchers(server: EtcdServer) -> int:
    """How many watchers etcd itself holds open (its own gauge)."""
    with urllib.request.urlopen(server.url + "/metrics", timeout=2) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith("etcd_debugging_mvcc_watcher_total "):
                return int(float(line.split()[1]))
    raise AssertionError("etcd exposes no watcher gauge")


@pytest.fixture
async def store(etcd_server: EtcdServer) -> AsyncIterator[EtcdStore]:
    async with EtcdStore([etcd_server.url], timeout=3.0) as s:
        yield s


def fast_store(server: EtcdServer, states: list[bool] | None = None) -> EtcdStore:
    """A store whose resume backoff is short, so restart tests stay quick."""
    return EtcdStore([server.url], timeout=3.0, retry_initial=0.05, retry_max=0.5,
                     on_state=states.append if states is not None else None)


# -- keys -----------------------------------------------------------------------------------


async def test_put_get_delete_and_prefix_snapshot(store: EtcdStore, prefix: str) -> None:
    assert await store.get(f"{prefix}/a") is None
    rev_b = await store.put(f"{prefix}/b", b"2")
    rev_a = await store.put(f"{prefix}/a", b"1")
    await store.put(f"{prefix}x/c", b"not under the prefix")
    assert rev_a > rev_b
    assert await store.get(f"{prefix}/a") == b"1"

    snap = await store.get_prefix(f"{prefix}/")
    assert [(kv.key, kv.value, kv.mod_revision) for kv in snap.items] == [
        (f"{prefix}/a", b"1", rev_a), (f"{prefix}/b", b"2", rev_b)]
    assert snap.revision >= rev_a + 1  # the sibling key was written after "a"

    rev_a2 = await store.put(f"{prefix}/a", b"one")
    assert rev_a2 > rev_a
    assert await store.get(f"{prefix}/a") == b"one"
    assert await store.delete(f"{prefix}/a") is True
    assert await store.delete(f"{prefix}/a") is False
    assert await store.get(f"{prefix}/a") is None
    assert [kv.key for kv in (await store.get_prefix(f"{prefix}/")).items] == [f"{prefix}/b"]
    assert store.connected


async def test_put_many_is_one_revision_and_delete_prefix_counts(
        store: EtcdStore, prefix: str) -> None:
    rev = await store.put_many([(f"{prefix}/n", b"node"), (f"{prefix}/b/x", b"backend")])
    snap = await store.get_prefix(prefix)
    assert [(kv.key, kv.mod_revision) for kv in snap.items] == [
        (f"{prefix}/b/x", rev), (f"{prefix}/n", rev)]
    assert await store.delete_prefix(prefix) == 2
    assert (await store.get_prefix(prefix)).items == []


# -- leases ---------------------------------------------------------------------------------


async def test_leased_keys_live_while_refreshed_and_vanish_after(
        store: EtcdStore, prefix: str) -> None:
    ttl = 2
    lease = await store.grant_lease(ttl)
    await store.put_many([(f"{prefix}/n", b"x"), (f"{prefix}/b", b"y")], lease=lease)
    # Refresh for longer than the TTL: the keys must still be there.
    end = time.monotonic() + ttl * 1.5
    while time.monotonic() < end:
        assert 0 < await store.keep_alive(lease) <= ttl
        await asyncio.sleep(ttl / 4)  # pacing the owner's refreshes, not synchronisation
    assert len((await store.get_prefix(prefix)).items) == 2

    # The owner stops refreshing: etcd drops the keys once the TTL runs out.
    await store.keep_alive(lease)

    async def gone() -> bool:
        return not (await store.get_prefix(prefix)).items

    await until(gone, ttl + 1, "leased keys to expire")
    with pytest.raises(LeaseLost):
        await store.keep_alive(lease)


async def test_revoke_deletes_at_once_and_refresh_then_fails(
        store: EtcdStore, prefix: str) -> None:
    lease = await store.grant_lease(30)
    await store.put(f"{prefix}/n", b"x", lease=lease)
    await store.revoke_lease(lease)
    assert await store.get(f"{prefix}/n") is None
    with pytest.raises(LeaseLost):
        await store.keep_alive(lease)
    await store.revoke_lease(lease)  # already gone: not an error


# -- watches --------------------------------------------------------------------------------


async def test_watch_sees_puts_and_deletes_in_order(store: EtcdStore, prefix: str) -> None:
    start = await store.put(f"{prefix}/a", b"1")
    await store.put(f"{prefix}/b", b"2")
    await store.put(f"{prefix}x", b"sibling, not watched")
    await store.delete(f"{prefix}/a")
    seen: list[Event] = []
    async with contextlib.aclosing(store.watch_prefix(f"{prefix}/", start)) as events:
        async for event in events:
            seen.append(event)
            if len(seen) == 3:
                # History replayed from ``start``; now a live change.
                await store.put(f"{prefix}/b", b"3")
            if len(seen) == 4:
                break
    assert [(e.kind, e.key, e.value) for e in seen] == [
        ("put", f"{prefix}/a", b"1"), ("put", f"{prefix}/b", b"2"),
        ("delete", f"{prefix}/a", b""), ("put", f"{prefix}/b", b"3")]
    assert seen[0].revision == start
    assert [e.revision for e in seen] == sorted({e.revision for e in seen})


async def test_watch_is_cancelled_in_etcd_when_consumer_stops(
        etcd_server: EtcdServer, store: EtcdStore, prefix: str) -> None:
    before = etcd_watchers(etcd_server)
    rev = await store.put(f"{prefix}/a", b"1")

    # Closing the iterator ends the watch.
    events = store.watch_prefix(prefix, rev)
    assert (await anext(events)).key == f"{prefix}/a"
    assert etcd_watchers(etcd_server) == before + 1
    await events.aclose()
    await until(lambda: etcd_watchers(etcd_server) == before, 10, "watch to end in etcd")

    # So does cancelling the task that iterates.
    got_one = asyncio.Event()

    async def consume() -> None:
        async for _ in store.watch_prefix(prefix, rev):
            got_one.set()

    task = asyncio.create_task(consume(), name="watch-consumer")
    await asyncio.wait_for(got_one.wait(), 10)
    assert etcd_watchers(etcd_server) == before + 1
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await until(lambda: etcd_watchers(etcd_server) == before, 10, "watch to end in etcd")


async def test_watch_from_compacted_revision_raises_compacted(etcd_own: EtcdServer) -> None:
    async with EtcdStore([etcd_own.url]) as s:
        first = await s.put("/c/a", b"1")
        last = await s.put("/c/a", b"2")
        await s.compact(last)
        with pytest.raises(Compacted) as err:
            async with contextlib.aclosing(s.watch_prefix("/c/", first)) as events:
                async for _ in events:
                    pass
        assert err.value.revision == last


# -- sync_prefix: resume and resync ---------------------------------------------------------


async def test_sync_resumes_after_etcd_restart_without_loss_or_duplicates(
        etcd_own: EtcdServer) -> None:
    states: list[bool] = []
    async with fast_store(etcd_own, states) as s, EtcdStore([etcd_own.url]) as writer:
        await writer.put("/s/old", b"0")
        async with contextlib.aclosing(s.sync_prefix("/s/")) as view:
            first = await anext(view)
            assert isinstance(first, Reset)
            assert [kv.key for kv in first.snapshot.items] == ["/s/old"]
            await writer.put("/s/a", b"1")
            assert (await anext(view)).key == "/s/a"

            # While the view is not reading, etcd goes away and comes back, and the
            # prefix changes before the view has noticed: its stream is dead by then.
            await writer.close()
            etcd_own.stop()
            etcd_own.start()
            async with EtcdStore([etcd_own.url]) as writer2:
                await writer2.put("/s/b", b"2")
                await writer2.delete("/s/a")
                await writer2.put("/s/c", b"3")
                got = [await asyncio.wait_for(anext(view), 15) for _ in range(3)]
                await writer2.put("/s/d", b"4")
                got.append(await asyncio.wait_for(anext(view), 15))

    assert [(type(i).__name__, getattr(i, "kind", ""), getattr(i, "key", "")) for i in got] == [
        ("Event", "put", "/s/b"), ("Event", "delete", "/s/a"),
        ("Event", "put", "/s/c"), ("Event", "put", "/s/d")]
    assert states == [True, False, True]


async def test_sync_reports_disconnected_while_etcd_is_down(etcd_own: EtcdServer) -> None:
    states: list[bool] = []
    view: dict[str, bytes] = {}
    resets = 0

    async def consume(s: EtcdStore) -> None:
        nonlocal resets
        async for item in s.sync_prefix("/r/"):
            if isinstance(item, Reset):
                resets += 1
                view.clear()
                view.update({kv.key: kv.value for kv in item.snapshot.items})
            elif item.kind == "put":
                view[item.key] = item.value
            else:
                view.pop(item.key, None)

    async with fast_store(etcd_own, states) as s:
        task = asyncio.create_task(consume(s), name="sync-consumer")
        try:
            await until(lambda: s.connected, 10, "the view to connect")
            etcd_own.stop()
            await until(lambda: not s.connected, 15, "the store to report etcd down")
            assert s.last_error
            etcd_own.start()
            async with EtcdStore([etcd_own.url]) as writer:
                await writer.put("/r/k", b"v")
                await until(lambda: view == {"/r/k": b"v"}, 15, "the view to catch up")
            assert s.connected
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    assert resets == 1
    assert states[:3] == [True, False, True]


async def test_sync_resyncs_with_a_fresh_reset_after_compaction(etcd_own: EtcdServer) -> None:
    async with fast_store(etcd_own) as s, EtcdStore([etcd_own.url]) as writer:
        await writer.put("/k/a", b"1")
        async with contextlib.aclosing(s.sync_prefix("/k/")) as view:
            assert isinstance(await anext(view), Reset)
            await writer.put("/k/b", b"2")
            assert (await anext(view)).key == "/k/b"

            # The view's stream dies; meanwhile history it has not seen is compacted away.
            await writer.close()
            etcd_own.stop()
            etcd_own.start()
            async with EtcdStore([etcd_own.url]) as writer2:
                await writer2.delete("/k/a")
                await writer2.put("/k/c", b"3")
                rev = await writer2.put("/k/b", b"22")
                await writer2.compact(rev)

                item = await asyncio.wait_for(anext(view), 15)
                assert isinstance(item, Reset)
                truth = await writer2.get_prefix("/k/")
                assert item.snapshot == truth
                assert [(kv.key, kv.value) for kv in item.snapshot.items] == [
                    ("/k/b", b"22"), ("/k/c", b"3")]

                # And it goes on from there.
                await writer2.put("/k/d", b"4")
                after = await asyncio.wait_for(anext(view), 15)
                assert isinstance(after, Event)
                assert (after.key, after.value) == ("/k/d", b"4")


# -- endpoints ------------------------------------------------------------------------------


async def test_dead_first_endpoint_fails_over_to_live_one(
        etcd_server: EtcdServer, prefix: str) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    async with EtcdStore([dead, etcd_server.url], timeout=3.0) as s:
        await s.put(f"{prefix}/k", b"v")
        assert await s.get(f"{prefix}/k") == b"v"
        assert s.endpoint == etcd_server.url


async def test_only_dead_endpoints_raise_unavailable_without_hanging() -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    states: list[bool] = []
    s = EtcdStore([dead], timeout=2.0, on_state=states.append)
    async with asyncio.timeout(2.0):  # a hang fails the test instead of stalling it
        await s.connect()
        with pytest.raises(StoreUnavailable) as err:
            await s.get("/k")
    assert dead in str(err.value)
    assert not s.connected
    assert states == []  # never connected, so never a change to report
    await s.close()
    with pytest.raises(StoreClosed):
        await s.get("/k")


async def test_endpoint_dying_mid_life_fails_over_once_for_concurrent_calls(
        etcd_server: EtcdServer, etcd_own: EtcdServer, prefix: str) -> None:
    async with EtcdStore([etcd_own.url, etcd_server.url], timeout=3.0) as s:
        await s.put(f"{prefix}/k", b"own")
        assert s.endpoint == etcd_own.url
        etcd_own.stop()
        # Ten calls notice together; one failover serves them all (ten would cycle back to
        # the dead endpoint).
        results = await asyncio.gather(*(s.get(f"{prefix}/k") for _ in range(10)))
        assert results == [None] * 10  # the other cluster has no such key
        assert s.endpoint == etcd_server.url
        assert s.connected


async def test_a_keep_alive_whose_channel_another_call_replaces_retries_instead_of_hanging(
        etcd_server: EtcdServer) -> None:
    # grpc.aio's first write on a stream waits for the call's initial metadata to go out;
    # when another caller's failover closed the channel at that moment, nothing ever woke
    # it (the call's deadline does not): an agent's heartbeat hung for good, its lease ran
    # out and its node left etcd while the agent kept running.
    async with EtcdStore([etcd_server.url], timeout=2.0) as s:
        lease = await s.grant_lease(30)
        refresh = asyncio.create_task(s.keep_alive(lease))
        await asyncio.sleep(0)  # the keep-alive now waits for its stream to open
        await s._failover(s._current())  # what a failing concurrent call does
        async with asyncio.timeout(10):  # a hang fails the test instead of stalling it
            assert await refresh > 0
        assert s.connected


async def test_close_ends_a_running_view_with_store_closed(
        etcd_server: EtcdServer, prefix: str) -> None:
    s = EtcdStore([etcd_server.url])
    ready = asyncio.Event()

    async def consume() -> None:
        async for _ in s.sync_prefix(prefix):
            ready.set()

    task = asyncio.create_task(consume(), name="sync-consumer")
    await asyncio.wait_for(ready.wait(), 10)
    await s.close()
    with pytest.raises(StoreClosed):
        await asyncio.wait_for(task, 10)


async def test_frozen_etcd_hits_the_deadline_instead_of_hanging(etcd_own: EtcdServer) -> None:
    async with EtcdStore([etcd_own.url], timeout=1.0) as s:
        await s.put("/f/k", b"v")
        assert etcd_own.proc is not None
        etcd_own.proc.send_signal(signal.SIGSTOP)  # accepts connections, never answers
        try:
            with pytest.raises(StoreUnavailable) as err:
                await s.get("/f/k")
            assert "DEADLINE_EXCEEDED" in str(err.value) or "timed out" in str(err.value)
            assert not s.connected
        finally:
            etcd_own.proc.send_signal(signal.SIGCONT)
        assert await s.get("/f/k") == b"v"
        assert s.connected


async def test_view_notices_a_frozen_etcd_and_resumes_when_it_thaws(
        etcd_own: EtcdServer) -> None:
    """A frozen etcd keeps its connections open; only keepalive pings can tell."""
    states: list[bool] = []
    async with fast_store(etcd_own, states) as s:
        view = s.sync_prefix("/z/")
        assert isinstance(await anext(view), Reset)
        pending = asyncio.ensure_future(anext(view))
        try:
            await until(lambda: etcd_watchers(etcd_own) == 1, 10, "the watch to open")
            assert etcd_own.proc is not None
            etcd_own.proc.send_signal(signal.SIGSTOP)
            try:
                await until(lambda: not s.connected, 30, "the frozen etcd to be noticed")
            finally:
                etcd_own.proc.send_signal(signal.SIGCONT)
            async with EtcdStore([etcd_own.url]) as writer:
                await writer.put("/z/k", b"v")
            item = await asyncio.wait_for(pending, 15)
            assert isinstance(item, Event)
            assert item.key == "/z/k"
        finally:
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await pending
            await view.aclose()
    assert states == [True, False, True]
