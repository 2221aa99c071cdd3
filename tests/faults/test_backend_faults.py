"""Faults of backends and agents under steady load: nothing the client sends may fail."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable

import pytest

from devtools.services import until
from tests.faults.cluster import Load
from tests.faults.conftest import Cluster

pytestmark = pytest.mark.docker


async def test_killed_backend_container_fails_over_and_comes_back(
        cluster: Cluster, figures: Callable[..., None]) -> None:
    a, b = cluster.nodes["a"], cluster.nodes["b"]
    before = await a.ready()
    async with Load(cluster.schedulers[0].url) as load:
        await load.wait_requests(10, backend=a.served_as)
        killed = time.monotonic()
        await asyncio.to_thread(lambda: a.container().kill())

        async def noticed() -> bool:
            r = await a.record()
            return r is not None and (r.state != "ready" or r.restarts > 0)
        await until(noticed, 20, "the agent to notice the dead container")
        detected = time.monotonic() - killed
        again = await a.ready()

        async def restarted() -> bool:
            r = await a.record()
            return r is not None and r.state == "ready" and r.restarts == 1
        await until(restarted, 30, "the container to be restarted and ready")
        await load.wait_requests(5, since=time.monotonic(), backend=a.served_as)
        recovered = time.monotonic() - killed
    assert not load.failures, load.summary()
    assert again.container_id == before.container_id  # restarted, not replaced
    assert b.served_as in load.served(killed)  # the other node carried the traffic
    figures("1 docker kill a backend", requests=len(load.outcomes),
            failed=len(load.failures), detect_s=detected, recover_s=recovered)


async def test_sigkilled_agent_leaves_its_backend_serving_and_is_adopted_on_restart(
        cluster: Cluster, figures: Callable[..., None]) -> None:
    a = cluster.nodes["a"]
    before = await a.ready()
    first = await a.fleet.node_record()
    assert first is not None
    container = await asyncio.to_thread(a.container)
    started_at = container.attrs["State"]["StartedAt"]
    async with Load(cluster.schedulers[0].url) as load:
        await load.wait_requests(10, backend=a.served_as)
        assert a.agent is not None
        a.agent.signal(signal.SIGKILL)
        await asyncio.to_thread(a.agent.wait)  # the load keeps running meanwhile
        killed = time.monotonic()
        # Without its agent the engine keeps answering: the scheduler still routes to it.
        await load.wait_requests(10, since=killed, backend=a.served_as)
        orphaned = time.monotonic() - killed
        a.start()  # as systemd's Restart= would

        async def adopted() -> bool:
            node = await a.fleet.node_record()
            r = await a.record()
            return node is not None and node.started_at > first.started_at and \
                r is not None and r.state == "ready"
        await until(adopted, 30, "the restarted agent to publish its backend again")
        await load.wait_requests(10, since=time.monotonic(), backend=a.served_as)
        recovered = time.monotonic() - killed
    assert not load.failures, load.summary()
    after = await a.record()
    assert after is not None and after.container_id == before.container_id
    assert after.restarts == 0
    (same,) = await asyncio.to_thread(a.fleet.containers)
    assert same.attrs["State"]["StartedAt"] == started_at  # adopted, never restarted
    figures("2 SIGKILL an agent", requests=len(load.outcomes), failed=len(load.failures),
            served_while_orphaned_s=orphaned, republished_s=recovered)


async def test_lost_node_is_routed_around_and_its_records_expire(
        cluster: Cluster, figures: Callable[..., None]) -> None:
    a, b = cluster.nodes["a"], cluster.nodes["b"]
    async with Load(cluster.schedulers[0].url) as load:
        await load.wait_requests(10, backend=a.served_as)
        assert a.agent is not None
        a.agent.signal(signal.SIGKILL)
        await asyncio.to_thread(lambda: a.container().kill())
        lost = time.monotonic()
        await asyncio.to_thread(a.agent.wait)

        async def gone() -> bool:
            return not [k for k in await a.fleet.node_keys() if f"/{a.name}" in k]
        # lease_ttl is 3 s: the whole node vanishes from etcd within TTL + 1 s.
        await until(gone, 4, "the lost node's records to expire")
        expired = time.monotonic() - lost
        await load.wait_requests(20, since=time.monotonic(), backend=b.served_as)
    assert not load.failures, load.summary()
    assert a.served_as not in load.served(lost + expired)
    figures("3 lose a whole node", requests=len(load.outcomes), failed=len(load.failures),
            records_gone_s=expired)


async def test_slowed_backend_loses_its_share_of_traffic(
        cluster: Cluster, figures: Callable[..., None]) -> None:
    a, b = cluster.nodes["a"], cluster.nodes["b"]
    async with Load(cluster.schedulers[0].url, workers=2, pause=0.01) as load:
        await load.wait_requests(40)
        even = load.served()[-40:].count(a.served_as) / 40
        await asyncio.to_thread(a.set_knobs, latency_ms=300)
        slowed = time.monotonic()
        await load.wait_requests(200, since=slowed, within=90)
    after = load.served(slowed)[:200]
    share = after.count(a.served_as) / len(after)
    tail = after[100:].count(a.served_as) / len(after[100:])
    assert not load.failures, load.summary()
    assert share < 0.2, f"{a.served_as} still had {share:.0%} of 200 requests"
    assert b.served_as in after
    figures("7 one backend slowed 10 -> 300 ms", requests=len(load.outcomes),
            failed=len(load.failures), share_before=even, share_in_200=share,
            share_in_last_100=tail)
