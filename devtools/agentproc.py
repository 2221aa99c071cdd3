"""Running ``aivmm-agent`` as a real child process in tests, and reading what it publishes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import docker

from common.keys import Keys
from common.records import BackendRecord, NodeRecord, parse_backend, parse_node
from common.store import EtcdStore
from devtools.services import free_port

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + "}"
    return str(v)


def write_config(path: Path, settings: dict[str, Any], backends: list[dict[str, Any]]) -> Path:
    lines = [f"{k} = {toml_value(v)}" for k, v in settings.items()]
    for b in backends:
        lines.append("[[backend]]")
        lines.extend(f"{k} = {toml_value(v)}" for k, v in b.items())
    path.write_text("\n".join(lines) + "\n")
    return path


class AgentProcess:
    """``python -m agent.main --config PATH`` with its log in the test's tmp dir."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.log = config.with_suffix(".log")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *extra: str) -> AgentProcess:
        out = self.log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent.main", "--config", str(self.config), *extra],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            env={k: v for k, v in os.environ.items() if not k.startswith("AIVMM_")})
        out.close()
        return self

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class Fleet:
    """One test's view: its node name, etcd prefix, Docker engine and helpers over them."""

    def __init__(self, tmp: Path, etcd_url: str, prefix: str, docker_host: str) -> None:
        self.tmp = tmp
        self.etcd_url = etcd_url
        self.prefix = prefix
        self.keys = Keys(prefix)
        self.docker_host = docker_host
        self.node = f"t{uuid.uuid4().hex[:8]}"
        self.models = tmp / "models"
        self.models.mkdir(exist_ok=True)
        self.agents: list[AgentProcess] = []
        self.docker = docker.DockerClient(base_url=docker_host, version="auto")

    def config(self, backends: list[dict[str, Any]], name: str = "agent",
               **settings: Any) -> Path:
        base: dict[str, Any] = {
            "node_name": self.node, "etcd": [self.etcd_url], "etcd_prefix": self.prefix,
            "listen": f"127.0.0.1:{free_port()}", "docker_host": self.docker_host,
            "models_dir": str(self.models), "sysfs_root": str(self.tmp / "sys"),
            "heartbeat_interval": 1.0, "lease_ttl": 3, "probe_interval": 0.3,
            "log_level": "debug"}
        (self.tmp / "sys").mkdir(exist_ok=True)
        base.update(settings)
        return write_config(self.tmp / f"{name}.toml", base, backends)

    def agent(self, config: Path, *extra: str) -> AgentProcess:
        proc = AgentProcess(config).start(*extra)
        self.agents.append(proc)
        return proc

    async def backend(self, name: str) -> BackendRecord | None:
        async with EtcdStore([self.etcd_url]) as store:
            raw = await store.get(self.keys.backend(self.node, name))
        return None if raw is None else parse_backend(raw)

    async def node_record(self) -> NodeRecord | None:
        async with EtcdStore([self.etcd_url]) as store:
            raw = await store.get(self.keys.node(self.node))
        return None if raw is None else parse_node(raw)

    async def node_keys(self) -> list[str]:
        async with EtcdStore([self.etcd_url]) as store:
            snap = await store.get_prefix(self.prefix + "/")
        return [kv.key for kv in snap.items]

    def containers(self) -> list[Any]:
        return self.docker.containers.list(all=True,
                                           filters={"label": f"aivmm.node={self.node}"})

    async def in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(fn, *args)

    def close(self) -> None:
        for agent in self.agents:
            agent.stop()
        with contextlib.suppress(Exception):
            for c in self.containers():
                c.remove(force=True)
        self.docker.close()


def kill(agent: AgentProcess) -> None:
    agent.signal(signal.SIGKILL)
    agent.wait()
