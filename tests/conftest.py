"""Session-wide real services and the checks every test gets."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from common.store import EtcdStore
from devtools.services import DockerEngine, EtcdServer


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[EtcdServer]:
    """One etcd for the session; tests keep apart by prefix. Do not stop it in a test."""
    server = EtcdServer()
    server.start()
    yield server
    server.close()


@pytest.fixture
def etcd_own() -> Iterator[EtcdServer]:
    """An etcd of this test alone, for tests that stop, restart or compact it."""
    server = EtcdServer()
    server.start()
    yield server
    server.close()


@pytest.fixture
async def writer(etcd_server: EtcdServer) -> AsyncIterator[EtcdStore]:
    """A store on the session etcd, for tests that write records as an agent would."""
    async with EtcdStore([etcd_server.url]) as store:
        yield store


@pytest.fixture
def prefix() -> str:
    """A fresh etcd key prefix, so tests sharing one etcd never see each other's keys."""
    return f"/aivmm-test/{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[DockerEngine]:
    """A private Docker engine for the session (root only; see devtools/services.py)."""
    engine = DockerEngine()
    engine.start()
    yield engine
    engine.close()


@pytest.fixture(autouse=True)
async def no_task_left_behind() -> AsyncIterator[None]:
    """Fail a test that leaves an asyncio task running: a leaked loop is a bug (kopf's rule)."""
    before = asyncio.all_tasks()
    yield
    # Give tasks cancelled in teardown one turn of the loop to finish.
    await asyncio.sleep(0)
    left = [t for t in asyncio.all_tasks() - before
            if t is not asyncio.current_task() and not t.done()]
    if left:
        names = ", ".join(sorted(t.get_name() for t in left))
        for task in left:
            task.cancel()
        await asyncio.gather(*left, return_exceptions=True)
        pytest.fail(f"tasks left running after the test: {names}")


@pytest.fixture(scope="session")
def sim_image(docker_engine: DockerEngine) -> str:
    """The sim engine's image, built FROM scratch on the session's Docker engine."""
    from devtools.image import build_image

    return build_image(docker_engine.host, quiet=True)
