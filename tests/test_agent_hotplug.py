"""A GPU that appears or goes is in the node record at once, not a heartbeat later."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from agent.app import build_app
from agent.config import AgentConfig
from agent.inventory import Inventory
from devtools.agentproc import Fleet
from devtools.gpu_trees import SysfsTree
from devtools.services import DockerEngine, EtcdServer, free_port, until

UEVENT = Path("/sys/devices/virtual/mem/null/uevent")


@pytest.fixture
async def fleet(tmp_path: Path, etcd_server: EtcdServer, prefix: str,
                docker_engine: DockerEngine) -> AsyncIterator[Fleet]:
    f = Fleet(tmp_path, etcd_server.url, prefix, docker_engine.host)
    yield f
    await asyncio.to_thread(f.close)


@pytest.mark.skipif(not os.access(UEVENT, os.W_OK),
                    reason="cannot ask the kernel for a uevent (needs root and a writable /sys)")
async def test_gpu_hotplug_reaches_the_node_record_through_a_kernel_uevent(
        fleet: Fleet, tmp_path: Path) -> None:
    tree = SysfsTree(tmp_path / "sys")
    tree.add_amdgpu("0000:03:00.0")
    # A heartbeat far away: only the uevent path can bring the new GPU in within the bound.
    config = AgentConfig(
        node_name=fleet.node, etcd=[fleet.etcd_url], etcd_prefix=fleet.prefix,
        listen=f"127.0.0.1:{free_port()}", docker_host=fleet.docker_host,
        models_dir=str(fleet.models), sysfs_root=str(tree.root), heartbeat_interval=30.0,
        lease_ttl=60)
    # No DRM device can be plugged here, so the watcher follows the "mem" subsystem and the
    # kernel is asked to re-announce /dev/null: a real uevent through the agent's own path.
    inventory = Inventory(str(tree.root), uevent_subsystem="mem")
    runner = web.AppRunner(build_app(config, inventory=inventory))
    await runner.setup()
    try:
        async def gpus() -> int | None:
            node = await fleet.node_record()
            return None if node is None else len(node.gpus)

        assert await until(gpus, 20, "the node record") == 1
        tree.add_amdgpu("0000:04:00.0", unique_id="0x77aa")
        plugged = time.monotonic()

        async def second_gpu() -> bool:
            await asyncio.to_thread(UEVENT.write_text, "change")
            return await gpus() == 2

        await until(second_gpu, 10, "the new GPU in the node record", interval=0.2)
        print(f"hot-plugged GPU in the node record after {time.monotonic() - plugged:.2f} s")
        node = await fleet.node_record()
        assert node is not None
        assert [g.pci_bus_id for g in node.gpus] == ["0000:03:00.0", "0000:04:00.0"]
    finally:
        await runner.cleanup()
