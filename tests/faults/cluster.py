"""A whole aivmm cluster of real processes for the fault suite, and steady load through it.

Two nodes (``a`` and ``b``), each an ``aivmm-agent`` process running one sim container of the
same model; scheduler replicas as ``python -m scheduler.main`` processes; the load is the
official ``openai`` client sending requests in a loop, recording every failure with its
exception so that a test can assert there were none.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import openai

from common.records import BackendRecord
from devtools.agentproc import ROOT, AgentProcess, Fleet, write_config
from devtools.services import free_port, until, wait_until

MODEL = "fault-model"
MESSAGES = [{"role": "user", "content": "steady"}]


def sim_backend(**env: object) -> dict[str, Any]:
    """One sim backend of the suite's model; ``env`` sets its knobs (SIM_LATENCY_MS=...)."""
    return {"name": "sim", "model": MODEL, "engine": "sim", "port": free_port(),
            "env": {"SIM_LATENCY_MS": "10", "SIM_TOKENS_PER_SECOND": "0",
                    **{f"SIM_{k.upper()}": str(v) for k, v in env.items()}}}


class Node:
    """One node: its Fleet (node name, records, containers) and its agent process."""

    def __init__(self, label: str, fleet: Fleet, backend: dict[str, Any]) -> None:
        self.label = label
        self.fleet = fleet
        self.backend_config = backend
        self.config = fleet.config([backend], name=f"agent-{label}")
        self.agent: AgentProcess | None = None

    @property
    def name(self) -> str:
        return self.fleet.node

    @property
    def served_as(self) -> str:
        """The ``x-aivmm-backend`` value of this node's backend."""
        return f"{self.name}/sim"

    def start(self) -> AgentProcess:
        self.agent = self.fleet.agent(self.config)
        return self.agent

    async def record(self) -> BackendRecord | None:
        return await self.fleet.backend("sim")

    async def ready(self, within: float = 60) -> BackendRecord:
        async def check() -> BackendRecord | None:
            r = await self.record()
            return r if r is not None and r.state == "ready" else None
        return await until(check, within, f"node {self.label}'s backend to be ready")

    def container(self) -> Any:
        (container,) = self.fleet.containers()
        return container

    def set_knobs(self, **knobs: Any) -> None:
        """Change the sim's knobs live (POST /sim/config on its host port)."""
        import json

        request = urllib.request.Request(
            f"http://127.0.0.1:{self.backend_config['port']}/sim/config",
            data=json.dumps(knobs).encode(), method="POST",
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=5) as resp:
            resp.read()


class SchedulerProcess:
    """``python -m scheduler.main`` on a free loopback port, with its own config file."""

    def __init__(self, tmp: Path, etcd_url: str, prefix: str, name: str = "scheduler",
                 **settings: Any) -> None:
        self.listen = f"127.0.0.1:{free_port()}"
        self.url = f"http://{self.listen}"
        base = {"etcd": [etcd_url], "etcd_prefix": prefix, "listen": self.listen,
                "log_level": "info", **settings}
        self.config = write_config(tmp / f"{name}.toml", base, [])
        self.log = tmp / f"{name}.log"
        self.api_key = (settings.get("api_keys") or ["none"])[0]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> SchedulerProcess:
        out = self.log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "scheduler.main", "--config", str(self.config)],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            env={k: v for k, v in os.environ.items() if not k.startswith("AIVMM_")})
        out.close()
        return self

    def models(self) -> list[str]:
        import json

        request = urllib.request.Request(self.url + "/v1/models",
                                         headers={"Authorization": f"Bearer {self.api_key}"})
        with urllib.request.urlopen(request, timeout=2) as resp:
            return [m["id"] for m in json.loads(resp.read())["data"]]

    def wait_serving(self, within: float = 30) -> None:
        def serving() -> bool:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"scheduler exited: {self.output()[-2000:]}")
            return MODEL in self.models()
        wait_until(serving, within, f"the scheduler on {self.url} to serve {MODEL}")

    def metrics(self) -> str:
        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as resp:
            return resp.read().decode()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclasses.dataclass
class Outcome:
    """One request of the load: when it ran, who served it, or what went wrong."""

    started: float
    ended: float
    backend: str | None
    error: str | None


class Load:
    """Steady traffic: ``workers`` loops of openai requests, each followed by ``pause`` s.

    Runs until :meth:`stop` (or ``limit`` requests / ``max_seconds``, whichever first, so a
    forgotten load always ends). Every outcome is kept; ``failures`` lists the errors.
    """

    def __init__(self, base_url: str, *, workers: int = 2, pause: float = 0.02,
                 api_key: str = "none", stream: bool = False, limit: int = 20000,
                 max_seconds: float = 240) -> None:
        self.client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key=api_key,
                                         max_retries=0, timeout=15.0)
        self.workers, self.pause, self.stream = workers, pause, stream
        self.limit, self.max_seconds = limit, max_seconds
        self.outcomes: list[Outcome] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    async def __aenter__(self) -> Load:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def start(self) -> None:
        self._deadline = time.monotonic() + self.max_seconds
        self._tasks = [asyncio.create_task(self._loop(), name=f"load-{i}")
                       for i in range(self.workers)]

    async def stop(self) -> None:
        self._stopping = True
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._tasks)
        await self.client.close()

    async def _loop(self) -> None:
        while not self._stopping and len(self.outcomes) < self.limit \
                and time.monotonic() < self._deadline:
            self.outcomes.append(await self.one())
            await asyncio.sleep(self.pause)

    async def one(self) -> Outcome:
        started = time.monotonic()
        backend = None
        try:
            raw = await self.client.chat.completions.with_raw_response.create(
                model=MODEL, messages=MESSAGES, max_tokens=4, stream=self.stream)  # type: ignore[arg-type]
            backend = raw.headers.get("x-aivmm-backend")
            answer = raw.parse()
            if self.stream:
                text = "".join([c.choices[0].delta.content or "" async for c in answer
                                if c.choices])
            else:
                text = answer.choices[0].message.content or ""
            error = None if text else "empty answer"
        except Exception as err:  # every failure is the finding: keep it whole
            error = f"{type(err).__name__}: {err}"
        return Outcome(started, time.monotonic(), backend, error)

    @property
    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.error is not None]

    def served(self, since: float = 0.0) -> list[str | None]:
        """The backends that answered the requests started at or after ``since``."""
        return [o.backend for o in self.outcomes if o.error is None and o.started >= since]

    async def wait_requests(self, count: int, since: float = 0.0, within: float = 60,
                            backend: str | None = None) -> None:
        """Wait until ``count`` requests started at or after ``since`` succeeded (on
        ``backend`` when given)."""
        async def enough() -> bool:
            served = self.served(since)
            return len([b for b in served if backend is None or b == backend]) >= count
        try:
            await until(enough, within, f"{count} answered requests"
                        + (f" from {backend}" if backend else ""))
        except TimeoutError as err:
            raise TimeoutError(f"{err}; served since: {Counter(self.served(since))}; "
                               f"{self.summary()}") from None

    def summary(self) -> str:
        return f"{len(self.outcomes)} requests, {len(self.failures)} failed" + (
            f"; first failures: {[o.error for o in self.failures[:3]]}" if self.failures else "")
