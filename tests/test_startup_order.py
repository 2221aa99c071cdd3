"""Start-up and shutdown order of the daemons, with the real apps, etcd and Docker.

Binding comes before start-up: an agent whose port is taken exits 1 having written nothing
to etcd and created no container. Stopping flips readiness first: a scheduler answers 503
on ``/readyz`` while its requests in flight still finish.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from agent.app import DOCKER, HEARTBEAT, INVENTORY, SUPERVISOR
from agent.app import build_app as agent_app
from agent.config import AgentConfig
from common.contexts import STORE
from common.daemon import EXIT_OK, serve
from common.store import EtcdStore
from devtools.agentproc import Fleet
from devtools.schedharness import publish
from devtools.services import DockerEngine, EtcdServer, free_port, until
from devtools.simproc import SimProcess
from scheduler.app import build_app
from scheduler.config import SchedulerConfig

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def fleet(tmp_path: Path, etcd_own: EtcdServer, prefix: str, docker_engine: DockerEngine,
          sim_image: str) -> Iterator[Fleet]:
    # A private etcd: its revision not moving proves that nothing at all was written.
    f = Fleet(tmp_path, etcd_own.url, prefix, docker_engine.host)
    yield f
    f.close()


async def etcd_revision(url: str) -> int:
    async with EtcdStore([url]) as store:
        return (await store.get_prefix("/")).revision


# Every call an agent makes to register or follow anything; the test itself only reads.
AGENT_CALLS = ("Put", "Txn", "DeleteRange", "LeaseGrant", "LeaseRevoke", "LeaseKeepAlive",
               "Watch")


def etcd_agent_calls(url: str) -> float:
    """How many such calls etcd has seen, from its own metrics."""
    with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return sum(float(line.rpartition(" ")[2]) for line in text.splitlines()
               if line.startswith("grpc_server_started_total{")
               and any(f'grpc_method="{m}"' in line for m in AGENT_CALLS))


@pytest.mark.docker
async def test_agent_on_a_taken_port_exits_1_without_touching_etcd_or_docker(
        fleet: Fleet) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = fleet.config([{"name": "s1", "model": "m1", "engine": "sim",
                                "port": free_port()}], listen=f"127.0.0.1:{port}")
        before = await etcd_revision(fleet.etcd_url)
        calls = etcd_agent_calls(fleet.etcd_url)
        since = int(time.time()) - 1
        agent = fleet.agent(config)
        code = await fleet.in_thread(agent.wait, 30)
    assert code == 1, agent.output()
    assert "cannot listen" in agent.output()
    assert await etcd_revision(fleet.etcd_url) == before, await fleet.node_keys()
    # Not even a lease granted or a watch opened (a write could have lost the race).
    assert etcd_agent_calls(fleet.etcd_url) == calls
    assert await fleet.in_thread(fleet.containers) == []
    # Not even created and removed again in between.
    events = await fleet.in_thread(lambda: list(fleet.docker.events(
        since=since, until=int(time.time()) + 1, decode=True,
        filters={"type": "container", "label": f"aivmm.node={fleet.node}"})))
    assert events == []


async def test_scheduler_readiness_fails_as_soon_as_stopping_begins(
        etcd_server: EtcdServer, prefix: str, writer: EtcdStore) -> None:
    with SimProcess(["m"], name="slow", latency_ms=4000) as sim:
        await publish(writer, prefix, sim)
        listen = f"127.0.0.1:{free_port()}"
        config = SchedulerConfig(etcd=[etcd_server.url], etcd_prefix=prefix, listen=listen)
        served = asyncio.create_task(serve(build_app(config), listen, handler_cancellation=True))
        base = f"http://{listen}"
        async with aiohttp.ClientSession() as http:
            async def readyz() -> tuple[int, dict] | None:
                try:
                    async with http.get(base + "/readyz") as resp:
                        return resp.status, await resp.json()
                except aiohttp.ClientConnectionError:
                    return None

            async def has_model() -> bool:
                try:
                    async with http.get(base + "/v1/models") as resp:
                        return '"m"' in await resp.text()
                except aiohttp.ClientConnectionError:
                    return False

            await until(has_model, 20, "the scheduler to see the backend")
            status, body = await readyz() or (0, {})
            assert status == 200 and body["stopping"] is False

            async def complete() -> int:
                async with http.post(base + "/v1/completions",
                                     json={"model": "m", "prompt": "hi"}) as resp:
                    await resp.read()
                    return resp.status

            in_flight = asyncio.create_task(complete())

            async def sim_busy() -> bool:
                async with http.get(sim.url + "/metrics") as resp:
                    text = await resp.text()
                return any(line.startswith("vllm:num_requests_running")
                           and float(line.rpartition(" ")[2]) >= 1 for line in text.splitlines())

            await until(sim_busy, 5, "the backend working on the request")
            os.kill(os.getpid(), signal.SIGTERM)

            async def not_ready() -> dict | None:
                got = await readyz()
                return got[1] if got is not None and got[0] == 503 else None

            body = await until(not_ready, 2, "/readyz to answer 503")
            assert body["ready"] is False and body["stopping"] is True
            assert not in_flight.done()  # it was still being served when readiness went
            assert await asyncio.wait_for(in_flight, 15) == 200
            assert await asyncio.wait_for(served, 10) == EXIT_OK


async def test_agent_app_on_a_taken_port_starts_none_of_its_contexts(
        tmp_path: Path, etcd_own: EtcdServer) -> None:
    # In-process, so it does not depend on who wins a race: not one context may have run.
    (tmp_path / "sys").mkdir()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        listen = f"127.0.0.1:{taken.getsockname()[1]}"
        config = AgentConfig(node_name="taken", etcd=[etcd_own.url], listen=listen,
                             sysfs_root=str(tmp_path / "sys"), models_dir=str(tmp_path))
        app = agent_app(config)
        assert await asyncio.wait_for(serve(app, listen), 10) == 1
    assert not any(key in app for key in (DOCKER, INVENTORY, SUPERVISOR, STORE, HEARTBEAT))
