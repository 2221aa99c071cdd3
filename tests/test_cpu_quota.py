"""CPU quotas on the real Docker engine: the container carries them, bad ones are refused."""

from __future__ import annotations

import asyncio
from pathlib import Path

import docker
import pytest

from agent.config import AgentConfig, BackendConfig
from agent.docker.client import DockerAdapter
from agent.docker.spec import build_spec
from common.config import ConfigError, load
from common.records import BackendRecord
from devtools.agentproc import Fleet
from devtools.services import DockerEngine, EtcdServer, free_port, until
from tests.test_ctl import ctl

pytestmark = pytest.mark.docker


async def test_the_container_carries_the_quota(docker_engine: DockerEngine,
                                                sim_image: str) -> None:
    backend = BackendConfig(name="q", model="m", engine="sim", port=18999, cpus=0.5,
                            cpuset="0")
    spec = build_spec("quota-node", backend, [], None, models_dir="/tmp",
                      advertise_host="127.0.0.1")
    adapter = DockerAdapter(docker_engine.host)
    cid = await adapter.create(spec)
    try:
        client = docker.DockerClient(base_url=docker_engine.host, version="auto")
        try:
            host = await asyncio.to_thread(lambda: client.api.inspect_container(cid))
        finally:
            client.close()
        assert host["HostConfig"]["NanoCpus"] == 500_000_000
        assert host["HostConfig"]["CpusetCpus"] == "0"
    finally:
        await adapter.remove(cid, stop_timeout=1)
        await adapter.close()


@pytest.mark.parametrize(("line", "expected"), [
    ("cpus = 0", "a number of cores from 0.01 to 4096"),
    ("cpus = -1", "a number of cores from 0.01 to 4096"),
    ('cpuset = "a-b"', "CPU numbers such as 0-3 or 0,2,4-7"),
])
def test_a_bad_quota_in_agent_toml_names_the_key(tmp_path: Path, line: str,
                                                 expected: str) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('[[backend]]\nname = "b"\nmodel = "m"\nengine = "sim"\nport = 8001\n'
                    + line + "\n")
    with pytest.raises(ConfigError) as info:
        load(AgentConfig, path, explicit=True, environ={})
    assert "backend[0]." + line.split(" ")[0] in str(info.value)
    assert expected in str(info.value)


async def test_deploy_takes_a_cpu_quota_and_refuses_a_bad_one(etcd_server: EtcdServer,
                                                             prefix: str) -> None:
    url = etcd_server.url
    done = await ctl(url, prefix, "deploy", "q", "--model", "m", "--cpus", "2.5")
    assert done.returncode == 0, done.stderr
    listing = await ctl(url, prefix, "deployments", "--json")
    assert '"cpus":2.5' in listing.stdout.replace(" ", "")
    bad = await ctl(url, prefix, "deploy", "q", "--model", "m", "--cpus", "lots")
    assert bad.returncode == 2 and "--cpus" in bad.stderr


async def test_the_agent_refuses_a_quota_beyond_its_cores_and_runs_the_rest(
        tmp_path: Path, etcd_server: EtcdServer, prefix: str, docker_engine: DockerEngine,
        sim_image: str) -> None:
    fleet = Fleet(tmp_path, etcd_server.url, prefix, docker_engine.host)
    try:
        fleet.agent(fleet.config([
            {"name": "greedy", "model": "m", "engine": "sim", "port": free_port(),
             "cpus": 4096},
            {"name": "modest", "model": "m", "engine": "sim", "port": free_port(),
             "cpus": 0.5}]))

        async def refused() -> BackendRecord | None:
            r = await fleet.backend("greedy")
            return r if r is not None and r.error else None
        greedy = await until(refused, 30, "the greedy backend refused")
        assert greedy.state == "stopped" and "exceeds this node's" in (greedy.error or "")

        async def modest_ready() -> bool:
            r = await fleet.backend("modest")
            return r is not None and r.state == "ready"
        await until(modest_ready, 30, "the modest backend ready")
        (container,) = await fleet.in_thread(fleet.containers)
        assert container.attrs["HostConfig"]["NanoCpus"] == 500_000_000
    finally:
        await asyncio.to_thread(fleet.close)
