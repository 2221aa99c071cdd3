"""The heartbeat writes a backend record when it changes, not when a probe figure jitters."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import pytest
from prometheus_client import CollectorRegistry

from agent.health.heartbeat import Heartbeat, worth_writing
from agent.metrics import AgentMetrics
from common.keys import Keys
from common.records import BackendLoad, BackendRecord, NodeRecord, parse_backend, parse_node
from common.store import EtcdStore
from devtools.services import EtcdServer, until


def record(**changes: object) -> BackendRecord:
    base = BackendRecord(node="n1", name="b0", models=["m"], url="http://127.0.0.1:9",
                         state="ready", engine="sim", probe_latency_ms=10.0,
                         load=BackendLoad(running=8, waiting=0, kv_cache_usage=0.30))
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_first_record_and_steady_fields_are_always_written() -> None:
    assert worth_writing(None, record())
    assert not worth_writing(record(), record())
    assert worth_writing(record(), record(state="unhealthy"))
    assert worth_writing(record(), record(url="http://127.0.0.1:10"))
    assert worth_writing(record(), record(restarts=1))
    assert worth_writing(record(), record(error="crashed"))


def test_probe_latency_written_only_past_its_band() -> None:
    assert not worth_writing(record(), record(probe_latency_ms=12.0))  # +20 %
    assert worth_writing(record(), record(probe_latency_ms=12.5))  # +25 %
    assert worth_writing(record(), record(probe_latency_ms=7.5))  # -25 %
    # Below 4 ms the 1 ms floor applies, so loopback jitter is not a change either.
    assert not worth_writing(record(probe_latency_ms=0.8), record(probe_latency_ms=1.5))
    assert worth_writing(record(probe_latency_ms=None), record(probe_latency_ms=0.8))


def test_engine_queue_is_written_exactly_other_load_within_bands() -> None:
    load = BackendLoad(running=8, waiting=0, kv_cache_usage=0.30)
    assert worth_writing(record(), record(load=dataclasses.replace(load, waiting=1)))
    assert not worth_writing(record(), record(load=dataclasses.replace(load, running=7)))
    assert worth_writing(record(), record(load=dataclasses.replace(load, running=10)))
    assert not worth_writing(record(), record(load=dataclasses.replace(load,
                                                                       kv_cache_usage=0.33)))
    assert worth_writing(record(), record(load=dataclasses.replace(load, kv_cache_usage=0.36)))
    assert worth_writing(record(), record(load=None))


@pytest.fixture
async def store(etcd_server: EtcdServer) -> AsyncIterator[EtcdStore]:
    async with EtcdStore([etcd_server.url]) as s:
        yield s


async def test_jitter_leaves_the_etcd_record_alone_a_state_change_does_not(
        store: EtcdStore, prefix: str) -> None:
    keys = Keys(prefix)
    current = record()

    def node() -> NodeRecord:
        return NodeRecord(node="n1", agent_version="t", started_at=0.0, heartbeat_at=0.0)

    beat = Heartbeat(store, keys, node="n1", interval=0.1, ttl=2, node_record=node,
                     backends=lambda: [current],
                     metrics=AgentMetrics(CollectorRegistry(), "n1"))
    task = asyncio.create_task(beat.run())
    try:
        async def backend_kv():  # type: ignore[no-untyped-def]
            snap = await store.get_prefix(keys.node_backends("n1"))
            return snap.items[0] if snap.items else None

        first = await until(backend_kv)
        # Jitter within the band over several heartbeats: the record's revision stays put.
        for latency in (10.5, 9.2, 11.9, 8.1):
            current = record(probe_latency_ms=latency)
            beat.poke()
            start = parse_node(await store.get(keys.node("n1")) or b"").heartbeat_at

            async def beat_after(start: float = start) -> bool:
                return parse_node(await store.get(keys.node("n1")) or b"").heartbeat_at > start

            await until(beat_after)
        assert (await backend_kv()).mod_revision == first.mod_revision
        assert parse_backend(first.value).probe_latency_ms == 10.0

        current = record(state="unhealthy", probe_latency_ms=8.1)
        beat.poke()

        async def unhealthy() -> bool:
            return parse_backend((await backend_kv()).value).state == "unhealthy"

        await until(unhealthy)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await beat.revoke()
