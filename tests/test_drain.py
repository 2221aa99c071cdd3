"""aivmmctl drain / undrain against a real agent process, etcd and Docker engine."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from agent.drain import follow_drain
from common.keys import Keys
from common.records import DrainRecord, dump
from common.store import EtcdStore
from devtools.agentproc import ROOT, Fleet
from devtools.services import DockerEngine, EtcdServer, free_port, until


def ctl(fleet: Fleet, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIVMM_")}
    return subprocess.run([sys.executable, "-m", "ctl.main", "--etcd", fleet.etcd_url,
                           "--prefix", fleet.prefix, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=30, check=False)


@pytest.fixture
async def fleet(tmp_path: Path, etcd_server: EtcdServer, prefix: str,
                docker_engine: DockerEngine, sim_image: str) -> AsyncIterator[Fleet]:
    f = Fleet(tmp_path, etcd_server.url, prefix, docker_engine.host)
    yield f
    await asyncio.to_thread(f.close)


def state_is(fleet: Fleet, name: str, state: str, container: bool | None = None
             ) -> Callable[[], object]:
    """The record of ``name`` once in ``state`` (and with or without a container)."""
    async def check() -> object:
        r = await fleet.backend(name)
        if r is None or r.state != state:
            return None
        return r if container is None or (r.container_id is not None) == container else None
    return check


@pytest.mark.docker
async def test_drain_stops_the_nodes_backends_and_undrain_brings_them_back(
        fleet: Fleet) -> None:
    sims = [{"name": n, "model": "m1", "engine": "sim", "port": free_port()}
            for n in ("s1", "s2")]
    fleet.agent(fleet.config(sims))
    for name in ("s1", "s2"):
        await until(state_is(fleet, name, "ready"), 30, f"{name} ready")

    out = await asyncio.to_thread(ctl, fleet, "drain", fleet.node, "--reason", "maintenance")
    assert out.returncode == 0, out.stderr
    for name in ("s1", "s2"):
        stopped = await until(state_is(fleet, name, "stopped", container=False), 30,
                              f"{name} stopped, its container gone")
        assert stopped.error == "drained by an operator: maintenance"
    assert await until(lambda: _no_containers(fleet), 30, "the containers removed")
    node = await fleet.node_record()
    assert node is not None  # the node stays registered (and heartbeating) while drained

    out = await asyncio.to_thread(ctl, fleet, "undrain", fleet.node)
    assert out.returncode == 0, out.stderr
    for name in ("s1", "s2"):
        back = await until(state_is(fleet, name, "ready"), 30, f"{name} ready again")
        assert back.error is None and back.container_id
    assert len(await fleet.in_thread(fleet.containers)) == 2


@pytest.mark.docker
async def test_an_agent_started_on_a_drained_node_never_starts_its_backends(
        fleet: Fleet) -> None:
    since = int(time.time()) - 1
    assert (await asyncio.to_thread(ctl, fleet, "drain", fleet.node)).returncode == 0
    fleet.agent(fleet.config([{"name": "s1", "model": "m1", "engine": "sim",
                               "port": free_port()}]))
    stopped = await until(state_is(fleet, "s1", "stopped", container=False), 30, "s1 stopped")
    assert stopped.error == "drained by an operator"
    assert await until(lambda: _no_containers(fleet), 30, "no container")
    created = await fleet.in_thread(lambda: list(fleet.docker.events(
        since=since, until=int(time.time()) + 1, decode=True,
        filters={"type": "container", "event": "create",
                 "label": f"aivmm.node={fleet.node}"})))
    assert created == []  # not started and then removed: never started at all
    assert (await asyncio.to_thread(ctl, fleet, "undrain", fleet.node)).returncode == 0
    await until(state_is(fleet, "s1", "ready"), 30, "s1 ready after undrain")


async def _no_containers(fleet: Fleet) -> bool:
    return not await fleet.in_thread(fleet.containers)


async def test_follow_drain_sees_only_its_own_node(etcd_server: EtcdServer,
                                                   prefix: str) -> None:
    keys = Keys(prefix)
    seen: list[str | None] = []
    async with EtcdStore([etcd_server.url]) as store:
        await store.put(keys.drain("n10"), dump(DrainRecord("n10", 1.0)))
        task = asyncio.create_task(follow_drain(store, keys, "n1", seen.append))
        try:
            await until(lambda: _async(seen == [None]), 10, "the initial view")
            await store.put(keys.drain("n1"), dump(DrainRecord("n1", 2.0, "disk")))
            await store.delete(keys.drain("n10"))
            await store.put(keys.drain("n1"), b"not json")
            await store.delete(keys.drain("n1"))
            await until(lambda: _async(len(seen) == 4), 10, "four changes")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    assert seen == [None, "drained by an operator: disk", "drained by an operator", None]


async def _async(value: bool) -> bool:
    return value
