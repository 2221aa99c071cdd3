"""The agent in-process: its HTTP surface (/healthz, /v1/state, /metrics) and sd_notify."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from agent.app import build_app
from agent.config import AgentConfig, BackendConfig
from common.contexts import NOTIFIER
from common.daemon import LISTENING
from common.sdnotify import Notifier
from common.tasks import GUARD
from devtools.agentproc import Fleet
from devtools.services import DockerEngine, EtcdServer, free_port, until

pytestmark = pytest.mark.docker


@pytest.fixture
def fleet(tmp_path: Path, etcd_server: EtcdServer, prefix: str, docker_engine: DockerEngine,
          sim_image: str) -> Iterator[Fleet]:
    f = Fleet(tmp_path, etcd_server.url, prefix, docker_engine.host)
    yield f
    f.close()


async def test_state_metrics_health_and_readiness_notification(fleet: Fleet,
                                                               tmp_path: Path) -> None:
    (tmp_path / "sys").mkdir()
    listen = f"127.0.0.1:{free_port()}"
    config = AgentConfig(
        node_name=fleet.node, etcd=[fleet.etcd_url], etcd_prefix=fleet.prefix, listen=listen,
        docker_host=fleet.docker_host, models_dir=str(fleet.models),
        sysfs_root=str(tmp_path / "sys"), heartbeat_interval=1.0, lease_ttl=3,
        probe_interval=0.3,
        backend=[BackendConfig(name="s1", model="m1", engine="sim", port=free_port())])
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.setblocking(False)
    app = build_app(config)
    app[NOTIFIER] = Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify.sock")})
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", int(listen.rpartition(":")[2]))
    await site.start()
    app[LISTENING].set()  # what common.daemon.serve does once the socket is open
    base = f"http://{listen}"
    try:
        async def ready_sent() -> bool:
            try:
                return b"READY=1" in notify.recv(4096)
            except BlockingIOError:
                return False
        await until(ready_sent, 10, "READY=1 on the notify socket")
        async with aiohttp.ClientSession() as http:
            async def state_ready() -> dict | None:
                async with http.get(base + "/v1/state") as resp:
                    body = await resp.json()
                states = [b["state"] for b in body["backends"]]
                return body if states == ["ready"] else None
            state = await until(state_ready, 30, "the backend to be ready in /v1/state")
            assert state["node"] == fleet.node and state["gpus"] == []
            assert state["backends"][0]["models"] == ["m1"]

            async with http.get(base + "/healthz") as resp:
                assert resp.status == 200
                assert (await resp.json())["stopping"] is False

            async def metrics() -> str | None:
                async with http.get(base + "/metrics") as resp:
                    text = await resp.text()
                return text if "aivmm_agent_heartbeats_total{" in text else None
            text = await until(metrics, 10, "a heartbeat in /metrics")
            labels = f'backend="s1",model="m1",node="{fleet.node}"'
            assert f"aivmm_backend_up{{{labels}}} 1.0" in text
            assert f'aivmm_backend_state{{{labels},state="ready"}} 1.0' in text
            assert f"aivmm_backend_restarts_total{{{labels}}} 0.0" in text
            assert "aivmm_backend_probe_latency_seconds{" in text
        record = await fleet.backend("s1")
        assert record is not None and record.state == "ready"
    finally:
        await runner.cleanup()
        await app[GUARD].stop()
        notify.close()
    # Stopping leaves the record to the next process (a restart is not an outage).
    left = await fleet.backend("s1")
    assert left is not None and left.state == "ready"
