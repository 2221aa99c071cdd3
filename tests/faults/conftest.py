"""Fixtures of the fault suite: a two-node cluster of real processes, and its figures.

Each test records what it measured (requests, failures, time to detect, time to recover)
with the ``figures`` fixture; they are printed at the end of the run (never asserted on
timing) and are what docs/reliability.md reports.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from devtools.agentproc import Fleet
from devtools.services import DockerEngine, EtcdServer
from tests.faults.cluster import Node, SchedulerProcess, sim_backend

pytestmark = pytest.mark.docker

FIGURES = pytest.StashKey[list[tuple[str, dict[str, Any]]]]()


class Cluster:
    """Nodes ``a`` and ``b`` (each an agent with one sim container) and scheduler replicas."""

    def __init__(self, tmp: Path, etcd_url: str, prefix: str) -> None:
        self.tmp, self.etcd_url, self.prefix = tmp, etcd_url, prefix
        self.nodes: dict[str, Node] = {}
        self.schedulers: list[SchedulerProcess] = []

    def add_node(self, label: str, docker_host: str, **knobs: object) -> Node:
        fleet = Fleet(self.tmp, self.etcd_url, self.prefix, docker_host)
        node = Node(label, fleet, sim_backend(**knobs))
        self.nodes[label] = node
        return node

    async def start(self) -> None:
        """Start every agent and wait until every backend is ready."""
        for node in self.nodes.values():
            node.start()
        for node in self.nodes.values():
            await node.ready()

    def scheduler(self, **settings: Any) -> SchedulerProcess:
        name = f"scheduler-{len(self.schedulers)}"
        proc = SchedulerProcess(self.tmp, self.etcd_url, self.prefix, name, **settings)
        self.schedulers.append(proc.start())
        proc.wait_serving()
        return proc

    def close(self) -> None:
        for proc in self.schedulers:
            proc.kill()
        for node in self.nodes.values():
            node.fleet.close()


@pytest.fixture
async def cluster_on(tmp_path: Path, prefix: str) -> AsyncIterator[Callable[[str], Cluster]]:
    """A factory: ``cluster_on(etcd_url)`` gives an empty Cluster, closed after the test."""
    made: list[Cluster] = []

    def make(etcd_url: str) -> Cluster:
        made.append(Cluster(tmp_path, etcd_url, prefix))
        return made[-1]
    yield make
    for c in made:
        c.close()


@pytest.fixture
async def cluster(cluster_on: Callable[[str], Cluster], etcd_server: EtcdServer,
                  docker_engine: DockerEngine, sim_image: str) -> Cluster:
    """Two ready nodes on the session's etcd and Docker engine, and one scheduler."""
    c = cluster_on(etcd_server.url)
    c.add_node("a", docker_engine.host)
    c.add_node("b", docker_engine.host)
    await c.start()
    c.scheduler()
    return c


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Iterator[Callable[..., None]]:
    """``figures(fault, **measured)`` keeps one row for the run's closing summary."""
    rows = request.config.stash.setdefault(FIGURES, [])

    def keep(fault: str, **measured: Any) -> None:
        rows.append((fault, measured))
        print(f"[fault] {fault}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in measured.items()))
    yield keep


def _fmt(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


LOG_TAIL_LINES = 15


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a process log above debug level, each cut to 240 chars."""
    kept = [line[:240] for line in path.read_text(errors="replace").splitlines()
            if "level=debug" not in line]
    return "\n".join(kept[-lines:])


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) \
        -> Generator[None, Any, None]:
    """A failed fault test shows the tail of each agent's and scheduler's log.

    CI keeps only the run's output, not the test's tmp dir: without these tails a failure
    that does not reproduce here cannot be read.
    """
    outcome = yield
    report = outcome.get_result()
    tmp = getattr(item, "funcargs", {}).get("tmp_path")
    if report.when != "call" or not report.failed or not isinstance(tmp, Path):
        return
    for log in sorted(tmp.glob("*.log")):
        report.sections.append((f"tail of {log.name}", log_tail(log)))


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    rows = config.stash.get(FIGURES, [])
    if not rows:
        return
    terminalreporter.section("fault suite figures (measured, not asserted)")
    for fault, measured in rows:
        terminalreporter.write_line(
            f"{fault}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in measured.items()))
