"""A running agent and scheduler to observe, and the metric names their /metrics expose.

Used by the Prometheus and Grafana tests: rules and dashboards must name metrics that exist,
so they are checked against live daemons rather than against a list kept by hand.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from common.store import EtcdStore
from devtools.agentproc import Fleet
from devtools.gpu_trees import SysfsTree
from devtools.schedharness import Scheduler, publish
from devtools.services import free_port, until
from devtools.simproc import SimProcess

# Suffixes a family's samples carry in the text format, by the family's type.
_SAMPLE_SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum",
                    "_count", "_created"), "summary": ("_sum", "_count", "_created")}
_METRIC_IN_EXPR = re.compile(r"\baivmm_[a-zA-Z0-9_]+")


def exposed_names(text: str) -> set[str]:
    """Every series name a Prometheus exposition can produce, from its ``# TYPE`` lines
    (prometheus_client writes them for labelled families that have no sample yet)."""
    names = set()
    for line in text.splitlines():
        if not line.startswith("# TYPE "):
            continue
        _, _, name, kind = line.split(maxsplit=3)
        base = name.removesuffix("_total") if kind == "counter" else name
        names.add(name)
        names.update(base + s for s in _SAMPLE_SUFFIXES.get(kind, ()))
    return names


def expr_names(expr: str) -> set[str]:
    """The aivmm metric names a PromQL expression reads."""
    return set(_METRIC_IN_EXPR.findall(expr))


@dataclass
class Stack:
    agent_url: str
    scheduler_url: str

    async def metrics(self, base: str) -> str:
        async with aiohttp.ClientSession() as s, s.get(base + "/metrics") as r:
            assert r.status == 200
            return await r.text()


@contextlib.asynccontextmanager
async def running_stack(tmp: Path, etcd_url: str, prefix: str, docker_host: str
                        ) -> AsyncIterator[Stack]:
    """An agent process (one fake AMD GPU, one sim container) and an in-process scheduler
    routing to a sim process, both on loopback, with one request served."""
    fleet = Fleet(tmp, etcd_url, prefix, docker_host)
    SysfsTree(tmp / "sys").add_amdgpu()
    port = free_port()
    fleet.agent(fleet.config([{"name": "s1", "model": "m1", "engine": "sim",
                               "port": free_port()}], listen=f"127.0.0.1:{port}"))
    try:
        with SimProcess("m2", name="p1") as sim:
            async with Scheduler(etcd_url, prefix) as sched:
                async with EtcdStore([etcd_url]) as store:
                    await publish(store, prefix, sim)
                await sched.wait_models("m2")
                client = sched.client()
                await client.chat.completions.create(
                    model="m2", messages=[{"role": "user", "content": "hi"}])
                await client.close()

                async def agent_ready() -> bool:
                    r = await fleet.backend("s1")
                    return r is not None and r.state == "ready"
                await until(agent_ready, 30, "the agent's sim backend to be ready")
                yield Stack(f"http://127.0.0.1:{port}", sched.url)
    finally:
        fleet.close()
