"""The supervisor outlives a Docker engine that refuses an action or the container listing
(real engine, refusals injected at the adapter boundary, since a 409 or a 500 cannot be
provoked on demand)."""

from __future__ import annotations

import asyncio
import random
import uuid
from pathlib import Path

import docker
import pytest
from prometheus_client import CollectorRegistry

from agent.config import AgentConfig
from agent.docker.client import DockerAdapter, DockerFailed
from agent.docker.observed import ObservedContainer
from agent.docker.spec import LABEL_BACKEND, LABEL_HASH, LABEL_MANAGED, LABEL_NODE
from agent.metrics import AgentMetrics
from agent.supervisor import Supervisor
from devtools.services import DockerEngine, until

pytestmark = pytest.mark.docker


class RefusesFirstRemoval(DockerAdapter):
    """The real adapter, except that the first removal gets Docker's 409."""

    def __init__(self, base_url: str) -> None:
        super().__init__(base_url)
        self.refused = 0

    async def remove(self, container_id: str, *, stop_timeout: int = 10) -> None:
        if not self.refused:
            self.refused += 1
            raise DockerFailed("409 Conflict: removal of container is already in progress")
        await super().remove(container_id, stop_timeout=stop_timeout)


async def test_a_refused_removal_is_retried_and_the_supervisor_lives_on(
        docker_engine: DockerEngine, sim_image: str, tmp_path: Path) -> None:
    node = f"t{uuid.uuid4().hex[:8]}"
    client = docker.DockerClient(base_url=docker_engine.host, version="auto")
    # A container of a backend this node's config no longer has: the supervisor removes it.
    orphan = client.containers.create(sim_image, labels={
        LABEL_MANAGED: "true", LABEL_NODE: node, LABEL_BACKEND: "gone", LABEL_HASH: "0"})
    adapter = RefusesFirstRemoval(docker_engine.host)
    config = AgentConfig(node_name=node, docker_host=docker_engine.host,
                         models_dir=str(tmp_path), sysfs_root=str(tmp_path))
    sup = Supervisor(config, adapter, AgentMetrics(CollectorRegistry(), node),
                     gpus=lambda: ([], []))
    sup.drain_wait = 0.0
    task = asyncio.create_task(sup.run(), name="supervisor")
    try:
        def gone() -> bool:
            return not client.containers.list(all=True, filters={"id": orphan.id})

        await until(lambda: asyncio.to_thread(gone), 30, "the orphan removed on a later pass")
        assert adapter.refused == 1
        assert not task.done()  # the refusal did not end the eternal task
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await adapter.close()
        for c in client.containers.list(all=True, filters={"label": f"{LABEL_NODE}={node}"}):
            c.remove(force=True)
        client.close()


class RefusesFirstListings(DockerAdapter):
    """The real adapter, except that the first ``refusals`` listings get Docker's 500."""

    def __init__(self, base_url: str, refusals: int) -> None:
        super().__init__(base_url)
        self.refusals = refusals
        self.calls = 0
        self.watch: Supervisor | None = None
        # The supervisor's activity as each listing after the first began: what the
        # previous refusal left there.
        self.activity_seen: list[str] = []

    async def list_managed(self, node: str) -> list[ObservedContainer]:
        self.calls += 1
        if self.watch is not None and self.calls > 1:
            self.activity_seen.append(self.watch.activity)
        if self.calls <= self.refusals:
            raise DockerFailed("500 Server Error: Internal Server Error (list containers)")
        return await super().list_managed(node)


async def test_a_refused_listing_is_retried_and_the_supervisor_lives_on(
        docker_engine: DockerEngine, sim_image: str, tmp_path: Path) -> None:
    node = f"t{uuid.uuid4().hex[:8]}"
    client = docker.DockerClient(base_url=docker_engine.host, version="auto")
    # Work that only a successful listing can reveal: an orphan to remove.
    orphan = client.containers.create(sim_image, labels={
        LABEL_MANAGED: "true", LABEL_NODE: node, LABEL_BACKEND: "gone", LABEL_HASH: "0"})
    adapter = RefusesFirstListings(docker_engine.host, refusals=3)
    config = AgentConfig(node_name=node, docker_host=docker_engine.host,
                         models_dir=str(tmp_path), sysfs_root=str(tmp_path))
    sup = Supervisor(config, adapter, AgentMetrics(CollectorRegistry(), node),
                     gpus=lambda: ([], []))
    adapter.watch = sup
    sup.drain_wait = 0.0
    task = asyncio.create_task(sup.run(rng=random.Random(5)), name="supervisor")
    try:
        def gone_or_ended() -> bool:
            # A task that died on a refusal fails the test now, not at the timeout.
            return task.done() or not client.containers.list(
                all=True, filters={"id": orphan.id})

        # Three refusals back off 0.5 + 1 + 2 s at most before the fourth listing.
        await until(lambda: asyncio.to_thread(gone_or_ended), 30,
                    "the orphan removed once Docker lists")
        assert not task.done(), task  # the refusals did not end the eternal task
        assert adapter.calls >= 4
        refused = adapter.activity_seen[:3]
        assert all(a.startswith("docker refused to list containers") for a in refused), refused
        assert "500 Server Error" in refused[0]
        await until(lambda: sup.activity.startswith("supervising"), 5,
                    "the activity back to supervising")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await adapter.close()
        for c in client.containers.list(all=True, filters={"label": f"{LABEL_NODE}={node}"}):
            c.remove(force=True)
        client.close()
