"""Faults of the services around aivmm (etcd, the Docker engine) and of a scheduler replica."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from pathlib import Path

import openai
import pytest

from devtools.services import DockerEngine, EtcdServer, until
from tests.faults.cluster import MESSAGES, MODEL, Load
from tests.faults.conftest import Cluster

pytestmark = pytest.mark.docker

HEARTBEAT = 1.0  # the suite's agents: heartbeat_interval 1 s, lease_ttl 3 s
LEASE_TTL = 3.0


async def test_etcd_away_for_20s_loses_no_request_and_records_return(
        cluster_on: Callable[[str], Cluster], etcd_own: EtcdServer,
        docker_engine: DockerEngine, sim_image: str, figures: Callable[..., None]) -> None:
    cluster = cluster_on(etcd_own.url)
    cluster.add_node("a", docker_engine.host)
    cluster.add_node("b", docker_engine.host)
    await cluster.start()
    cluster.scheduler()
    async with Load(cluster.schedulers[0].url) as load:
        await load.wait_requests(10)
        await asyncio.to_thread(etcd_own.stop)
        stopped = time.monotonic()
        await asyncio.sleep(20)  # the fault itself: etcd stays away this long
        await load.wait_requests(20, since=stopped)  # served from the last view
        await asyncio.to_thread(etcd_own.start)  # returns once etcd answers /health
        back_at, back = time.time(), time.monotonic()

        missing: list[str] = []

        async def every_record_back() -> bool:
            missing.clear()
            for label, node in cluster.nodes.items():
                record, backend = await node.fleet.node_record(), await node.record()
                if record is None or record.heartbeat_at < back_at:
                    missing.append(f"{label}: node record " + (
                        "absent" if record is None
                        else f"written {back_at - record.heartbeat_at:.2f} s before etcd"))
                if backend is None or backend.state != "ready":
                    missing.append(f"{label}: backend "
                                   + ("absent" if backend is None else backend.state))
            return not missing
        # By design the records are back within one interval (an agent cut off retries at
        # most an interval apart); the figure below is that time. The bound only tells a
        # broken agent (a heartbeat hung on a stream that never opened, once) from a loaded
        # machine.
        try:
            await until(every_record_back, LEASE_TTL + 2 * HEARTBEAT,
                        "every record to be back", interval=0.05)
        except TimeoutError as err:
            raise AssertionError(f"{err}; still missing: {'; '.join(missing)}") from err
        returned = time.monotonic() - back
        await load.wait_requests(20, since=time.monotonic())
    assert not load.failures, load.summary()
    for node in cluster.nodes.values():
        assert node.served_as in load.served(stopped)
    figures("4 etcd stopped for 20 s", requests=len(load.outcomes), failed=len(load.failures),
            records_back_after_etcd_s=returned)


async def test_docker_engine_restart_brings_the_nodes_backends_back(
        cluster_on: Callable[[str], Cluster], etcd_server: EtcdServer,
        docker_engine: DockerEngine, sim_image: str, figures: Callable[..., None]) -> None:
    from devtools.image import build_image

    engine = DockerEngine()  # node a's engine alone: restarting it must not touch node b
    cluster: Cluster | None = None
    try:
        await asyncio.to_thread(engine.start)
        await asyncio.to_thread(build_image, engine.host, quiet=True)
        cluster = cluster_on(etcd_server.url)
        a = cluster.add_node("a", engine.host)
        b = cluster.add_node("b", docker_engine.host)
        await cluster.start()
        cluster.scheduler()
        async with Load(cluster.schedulers[0].url) as load:
            await load.wait_requests(10, backend=a.served_as)
            restarted = time.monotonic()
            await asyncio.to_thread(engine.restart)
            engine_back = time.monotonic() - restarted

            async def serving_again() -> bool:
                r = await a.record()
                return r is not None and r.state == "ready" and r.restarts >= 1
            await until(serving_again, 60, "node a's backend to run again")
            await load.wait_requests(10, since=time.monotonic(), backend=a.served_as)
            recovered = time.monotonic() - restarted
        assert a.agent is not None and a.agent.proc is not None
        assert a.agent.proc.poll() is None  # the agent rode it out and reconnected
        assert not load.failures, load.summary()
        assert b.served_as in load.served(restarted)
        figures("5 Docker engine restart", requests=len(load.outcomes),
                failed=len(load.failures), engine_restart_s=engine_back,
                backend_serving_again_s=recovered)
    finally:
        await asyncio.to_thread(_close_before_engine, cluster, engine)


def _close_before_engine(cluster: Cluster | None, engine: DockerEngine) -> None:
    # The agent must go before its engine, or it would restart containers on a dying engine.
    if cluster is not None:
        cluster.close()
    engine.close()


async def test_killed_scheduler_replica_leaves_the_other_serving(
        cluster: Cluster, figures: Callable[..., None], tmp_path: Path) -> None:
    first, second = cluster.schedulers[0], cluster.scheduler()
    async with Load(first.url) as doomed, Load(second.url) as load:
        await doomed.wait_requests(10)
        await load.wait_requests(10)
        assert first.proc is not None
        first.proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(first.proc.wait)
        killed = time.monotonic()
        await doomed.stop()  # its clients would now go to the survivor
        # New connections, as a load balancer would open after taking the dead one out.
        for _ in range(20):
            async with openai.AsyncOpenAI(base_url=second.url + "/v1", api_key="none",
                                          max_retries=0, timeout=15) as fresh:
                answer = await fresh.chat.completions.create(
                    model=MODEL, messages=MESSAGES, max_tokens=4)  # type: ignore[arg-type]
                assert answer.choices[0].message.content
        await load.wait_requests(20, since=killed)
    assert not load.failures, load.summary()
    assert second.running
    figures("6 SIGKILL one of two schedulers", survivor_requests=len(load.outcomes),
            survivor_failed=len(load.failures), new_connections_ok=20,
            cut_on_killed_replica=len([o for o in doomed.failures if o.started < killed]))
