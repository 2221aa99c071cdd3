"""The agent as a real process against a real etcd and Docker engine, with sim backends."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from devtools.agentproc import ROOT, Fleet, kill
from devtools.services import DockerEngine, EtcdServer, free_port, until

pytestmark = pytest.mark.docker


@pytest.fixture
def fleet(tmp_path: Path, etcd_server: EtcdServer, prefix: str, docker_engine: DockerEngine,
          sim_image: str) -> Iterator[Fleet]:
    f = Fleet(tmp_path, etcd_server.url, prefix, docker_engine.host)
    yield f
    f.close()


def sim(name: str = "s1", model: str = "m1", **extra: object) -> dict[str, object]:
    return {"name": name, "model": model, "engine": "sim", "port": free_port(), **extra}


def models_of(url: str) -> list[str]:
    with urllib.request.urlopen(url + "/v1/models", timeout=2) as resp:
        return [m["id"] for m in orjson.loads(resp.read())["data"]]


async def ready(fleet: Fleet, name: str = "s1", within: float = 30):
    async def check():
        r = await fleet.backend(name)
        return r if r is not None and r.state == "ready" else None
    return await until(check, within, f"backend {name} ready")


async def test_sigkilled_agent_records_expire_and_restart_adopts_the_running_container(
        fleet: Fleet) -> None:
    config = fleet.config([sim()])
    agent = fleet.agent(config)
    first = await ready(fleet)
    assert first.container_id and first.url.startswith("http://127.0.0.1:")
    assert models_of(first.url) == ["m1"]
    started = (await fleet.in_thread(fleet.containers))[0].attrs["State"]["StartedAt"]

    kill(agent)
    # lease_ttl is 3 s: every record of the node is gone within TTL + 1 s.
    await until(lambda: _no_keys(fleet), 4, "records to expire with the lease")
    assert models_of(first.url) == ["m1"]  # the engine kept serving without its agent

    fleet.agent(config)
    again = await ready(fleet)
    assert again.container_id == first.container_id
    assert again.restarts == 0
    (container,) = await fleet.in_thread(fleet.containers)
    assert container.attrs["State"]["StartedAt"] == started  # adopted, never restarted


async def _no_keys(fleet: Fleet) -> bool:
    return not [k for k in await fleet.node_keys() if fleet.node in k]


async def test_crashed_container_is_restarted_and_counted(fleet: Fleet) -> None:
    fleet.agent(fleet.config([sim()]))
    first = await ready(fleet)
    await fleet.in_thread(lambda: fleet.docker.containers.get(first.container_id).kill())

    async def restarted():
        r = await fleet.backend("s1")
        return r if r and r.restarts == 1 and r.state == "ready" else None
    again = await until(restarted, 30, "the crashed backend to be restarted")
    assert again.container_id == first.container_id
    assert again.error is None
    assert models_of(again.url) == ["m1"]


async def test_a_restart_is_not_an_outage_records_stay_ready_throughout(fleet: Fleet) -> None:
    config = fleet.config([sim()])
    agent = fleet.agent(config)
    first = await ready(fleet)
    agent.signal(signal.SIGTERM)
    assert agent.wait() == 0
    # The lease is left to the next process: the record is still there, still ready.
    record = await fleet.backend("s1")
    assert record is not None and record.state == "ready"
    (container,) = await fleet.in_thread(fleet.containers)
    assert container.status == "running"

    fleet.agent(config)
    seen: list[str] = []
    deadline = time.monotonic() + 5  # well past the old lease's 3 s TTL
    while time.monotonic() < deadline:
        r = await fleet.backend("s1")
        seen.append("absent" if r is None else r.state)
        await asyncio.sleep(0.05)
    assert set(seen) == {"ready"}, f"left routing during the restart: {sorted(set(seen))}"
    again = await fleet.backend("s1")
    assert again is not None and again.container_id == first.container_id
    assert models_of(first.url) == ["m1"]


async def test_a_stopped_agent_s_records_expire_with_its_lease(fleet: Fleet) -> None:
    agent = fleet.agent(fleet.config([sim()]))
    first = await ready(fleet)
    agent.signal(signal.SIGTERM)
    assert agent.wait() == 0
    # No process took over: the records go with the lease (TTL 3 s), the engine still runs.
    await until(lambda: _no_keys(fleet), 5, "records to expire with the lease")
    assert models_of(first.url) == ["m1"]


async def test_config_change_recreates_and_removed_backend_is_removed(fleet: Fleet) -> None:
    keep, gone = sim("keep"), sim("gone", "m2")
    agent = fleet.agent(fleet.config([keep, gone]))
    old = await ready(fleet, "keep")
    await ready(fleet, "gone")
    agent.signal(signal.SIGTERM)
    agent.wait()

    changed = {**keep, "args": ["--latency-ms", "1"]}
    fleet.agent(fleet.config([changed], name="agent2"))

    async def recreated():
        r = await fleet.backend("keep")
        ok = r is not None and r.state == "ready" and r.container_id != old.container_id
        return r if ok else None
    await until(recreated, 30, "the changed backend recreated and ready")

    async def only_keep():
        names = [c.labels["aivmm.backend"] for c in await fleet.in_thread(fleet.containers)]
        return names == ["keep"]
    await until(only_keep, 20, "the removed backend's container to go")
    await until(lambda: _absent(fleet, "gone"), 10, "the removed backend's record to go")


async def _absent(fleet: Fleet, name: str) -> bool:
    return await fleet.backend(name) is None


async def test_missing_image_is_reported_and_retried_while_others_run(fleet: Fleet) -> None:
    fleet.agent(fleet.config([sim("ok"), sim("bad", image="aivmm-no-such-image:1")]))
    await ready(fleet, "ok")

    async def reported():
        r = await fleet.backend("bad")
        return r if r and r.error and "retrying" in r.error else None
    bad = await until(reported, 20, "the missing image to be reported")
    assert bad.state == "stopped"
    assert "not found" in bad.error
    assert bad.container_id is None

    async def retried():
        r = await fleet.backend("bad")
        return r if r and r.error != bad.error else None
    # The retry delay grows (1 s, 2 s, ...), so the message changes as attempts go on.
    again = await until(retried, 20, "another attempt")
    assert again.state == "stopped"


async def test_drain_stops_this_nodes_backends_and_deletes_records(fleet: Fleet) -> None:
    config = fleet.config([sim()])
    agent = fleet.agent(config)
    await ready(fleet)
    agent.signal(signal.SIGTERM)
    agent.wait()
    drain = fleet.agent(config, "--drain")
    assert drain.wait() == 0, drain.output()
    assert await fleet.in_thread(fleet.containers) == []
    assert await _no_keys(fleet)


def test_bad_config_value_exits_2_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('lease_ttl = "ten"\n')
    proc = subprocess.run([sys.executable, "-m", "agent.main", "--config", str(config)],
                          cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "lease_ttl" in proc.stderr and "Traceback" not in proc.stderr
    config.write_text('[[backend]]\nname = "a"\nmodel = "m"\nengine = "tgi"\nport = 1\n')
    proc = subprocess.run([sys.executable, "-m", "agent.main", "--config", str(config)],
                          cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "backend[0].engine" in proc.stderr


async def test_etcd_restart_keeps_backends_running_and_re_registers(
        tmp_path: Path, etcd_own: EtcdServer, prefix: str, docker_engine: DockerEngine,
        sim_image: str) -> None:
    fleet = Fleet(tmp_path, etcd_own.url, prefix, docker_engine.host)
    try:
        agent = fleet.agent(fleet.config([sim()]))
        first = await ready(fleet)
        etcd_own.stop()
        assert models_of(first.url) == ["m1"]  # etcd away: the engine is untouched
        etcd_own.start()
        restarted_at = time.time()

        async def fresh():
            node = await fleet.node_record()
            backend = await fleet.backend("s1")
            return node is not None and node.heartbeat_at > restarted_at and \
                backend is not None and backend.state == "ready"
        await until(fresh, 15, "the agent to heartbeat again after etcd's restart")
        assert agent.proc is not None and agent.proc.poll() is None
        assert (await fleet.backend("s1")).container_id == first.container_id
    finally:
        fleet.close()


async def test_docker_engine_restart_restarts_the_backends(
        tmp_path: Path, etcd_server: EtcdServer, prefix: str) -> None:
    from devtools.image import build_image

    engine = DockerEngine()
    engine.start()
    fleet = None
    try:
        await asyncio.to_thread(build_image, engine.host, quiet=True)
        fleet = Fleet(tmp_path, etcd_server.url, prefix, engine.host)
        agent = fleet.agent(fleet.config([sim()]))
        await ready(fleet)
        await fleet.in_thread(engine.restart)

        async def back():
            r = await fleet.backend("s1")
            return r if r and r.state == "ready" and r.restarts >= 1 else None
        again = await until(back, 60, "the backend to run again after the engine restart")
        assert models_of(again.url) == ["m1"]
        assert agent.proc is not None and agent.proc.poll() is None
    finally:
        if fleet is not None:
            fleet.close()
        engine.close()
