"""Running real schedulers for the tests: in-process apps on loopback, fed by a real etcd."""

from __future__ import annotations

import time
from typing import Any

import aiohttp
import openai
from aiohttp import web

from common.keys import Keys
from common.records import BackendRecord, dump
from common.store import EtcdStore
from devtools.services import free_port, until
from devtools.simproc import SimProcess
from scheduler.app import build_app
from scheduler.config import SchedulerConfig


def record_for(sim: SimProcess, *, node: str = "n1", state: str = "ready",
               latency_ms: float | None = 1.0) -> BackendRecord:
    # The probe seed sits below the sim's own time to first byte (~3 ms), as a real engine's
    # probe sits far below its TTFB: a backend not yet measured looks worth a try, so tests
    # that expect every backend to take traffic do not depend on timing noise.
    return BackendRecord(node=node, name=sim.name, models=list(sim.models), url=sim.url,
                         state=state, engine="sim", probe_latency_ms=latency_ms,  # type: ignore[arg-type]
                         updated_at=time.time())


async def publish(store: EtcdStore, prefix: str, sim: SimProcess, **kw: Any) -> None:
    """Write the backend record an agent would write for ``sim``."""
    record = record_for(sim, **kw)
    await store.put(Keys(prefix).backend(record.node, record.name), dump(record))


class Scheduler:
    """One scheduler replica serving on a free 127.0.0.1 port in this event loop."""

    def __init__(self, etcd_url: str, prefix: str, **settings: Any) -> None:
        self.config = SchedulerConfig(etcd=[etcd_url], etcd_prefix=prefix,
                                      listen=f"127.0.0.1:{free_port()}", **settings)
        self.app = build_app(self.config)
        self.url = f"http://{self.config.listen}"
        self.runner: web.AppRunner | None = None

    async def __aenter__(self) -> Scheduler:
        self.runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None)
        await self.runner.setup()
        host, port = self.config.listen.split(":")
        await web.TCPSite(self.runner, host, int(port)).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()

    def client(self, api_key: str = "none", **kw: Any) -> openai.AsyncOpenAI:
        """The official client pointed at this replica; no client-side retries."""
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0,
                                  timeout=kw.pop("timeout", 30.0), **kw)

    async def models(self, api_key: str | None = None) -> list[str]:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        async with aiohttp.ClientSession() as s, s.get(self.url + "/v1/models",
                                                       headers=headers) as r:
            return [m["id"] for m in (await r.json())["data"]]

    async def wait_models(self, *models: str, within: float = 10.0,
                          api_key: str | None = None) -> None:
        async def seen() -> bool:
            return set(models) <= set(await self.models(api_key))
        await until(seen, within, f"models {models} on {self.url}")

    async def metrics(self) -> str:
        async with aiohttp.ClientSession() as s, s.get(self.url + "/metrics") as r:
            return await r.text()


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        head, _, rest = series.partition("{")
        if head != name:
            continue
        if all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += float(value)
    return total
