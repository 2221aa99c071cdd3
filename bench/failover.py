"""Failover speed: from ``docker kill`` of a backend, and from SIGKILL of a node, to routing.

Real parts throughout: a private etcd and Docker engine, ``aivmm-agent`` processes running sim
containers, one ``aivmm-scheduler`` process taking a steady client load (errors counted), and
in this process the scheduler's own ``Registry`` + ``Router`` over ``sync_prefix`` (so the
moment a backend leaves the routing table is seen directly, not by polling).

1. Backend kill, ``--kills`` times (round robin over ``--backends`` containers, each killed
   only once it is ready again). Steps, from wall-clock stamps on one machine:
   Docker's ``die`` event time (``timeNano``) minus the kill call; the agent's record
   ``updated_at`` (when it marked the backend not ready) minus the event; the router
   no longer holding it ready minus ``updated_at`` (agent put + etcd + watch + apply).
2. Node death at lease TTLs 3, 5 and 10 s: SIGKILL the agent and kill its containers at once;
   time until its records are deleted from etcd (lease expiry) and until the router drops them.

    .venv/bin/python -m bench.failover [--kills 50] [--ttls 3,5,10] [--json out.json]

Prints Markdown tables. Nothing here is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import aiohttp
import docker

from common.keys import Keys
from common.store import EtcdStore
from devtools.agentproc import AgentProcess, write_config
from devtools.image import build_image
from devtools.services import DockerEngine, EtcdServer, free_port, wait_until
from devtools.stats import percentile
from scheduler.registry import Registry
from scheduler.routing import Router

ROOT = Path(__file__).resolve().parent.parent

PREFIX = "/aivmm/v1"
MODEL = "fo-m"


def step_figures(seconds: list[float]) -> dict[str, float | int | None]:
    """p50/p99 in ms and the count; no percentiles (None) where no kill got this far."""
    if not seconds:
        return {"p50_ms": None, "p99_ms": None, "n": 0}
    return {"p50_ms": round(percentile(seconds, 50) * 1000, 1),
            "p99_ms": round(percentile(seconds, 99) * 1000, 1), "n": len(seconds)}


class Watcher:
    """The scheduler's registry in this process, stamping when each key stops being ready."""

    def __init__(self, keys: Keys) -> None:
        self.router = Router()
        self.registry = Registry(self.router, keys, on_change=self._changed)
        self.ready: dict[str, bool] = {}
        self.left: dict[str, float] = {}  # key -> time it stopped being routable
        self.gone: dict[str, float] = {}  # key -> time its record was deleted
        self.changed = asyncio.Event()

    def _changed(self) -> None:
        now = time.time()
        for key, b in self.router.backends.items():
            if self.ready.get(key) and not b.ready:
                self.left[key] = now
            self.ready[key] = b.ready
        for key in [k for k in self.ready if k not in self.router.backends]:
            if self.ready.pop(key):
                self.left[key] = now
            self.gone[key] = now
        self.changed.set()

    async def wait(self, predicate, within: float) -> None:  # type: ignore[no-untyped-def]
        async with asyncio.timeout(within):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()


class DockerEvents:
    """``die`` events of the engine, with Docker's own nanosecond stamps, read in a thread."""

    def __init__(self, client: docker.DockerClient) -> None:
        self.stream = client.events(decode=True, filters={"event": "die"})
        self.died: dict[str, float] = {}
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        with contextlib.suppress(Exception):
            for event in self.stream:
                self.died[event["id"]] = event["timeNano"] / 1e9

    def close(self) -> None:
        self.stream.close()


class Load:
    """Steady client requests through the scheduler; counts what a user would see fail."""

    def __init__(self, url: str, rate: float) -> None:
        self.url = url
        self.rate = rate
        self.ok = self.errors = 0
        # What each failure was (status code or exception type), so a count can be explained.
        self.why: collections.Counter[str] = collections.Counter()
        self.task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
        async with aiohttp.ClientSession() as session:
            async def one() -> None:
                try:
                    async with session.post(self.url + "/v1/completions", json=body,
                                            timeout=aiohttp.ClientTimeout(total=10)) as r:
                        await r.read()
                        if r.status == 200:
                            self.ok += 1
                        else:
                            self.errors += 1
                            self.why[f"http {r.status}"] += 1
                except (aiohttp.ClientError, TimeoutError) as err:
                    self.errors += 1
                    self.why[type(err).__name__] += 1
            pending: set[asyncio.Task[None]] = set()
            try:
                while True:
                    t = asyncio.create_task(one())
                    pending.add(t)
                    t.add_done_callback(pending.discard)
                    await asyncio.sleep(1 / self.rate)
            finally:
                for t in list(pending):
                    t.cancel()
                await asyncio.gather(*pending, return_exceptions=True)

    def start(self) -> None:
        self.task = asyncio.create_task(self._run())

    def take(self) -> tuple[int, int]:
        out = self.ok, self.errors
        if self.why:
            print(f"  client errors: {dict(self.why)}", file=sys.stderr)
        self.ok = self.errors = 0
        self.why.clear()
        return out

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)


def sim_backend(name: str, image: str) -> dict[str, object]:
    return {"name": name, "model": MODEL, "engine": "sim", "image": image,
            "port": free_port()}


async def run(args: argparse.Namespace) -> dict[str, object]:
    tmp = Path(tempfile.mkdtemp(prefix="aivmm-fo-"))
    etcd, engine = EtcdServer(), DockerEngine()
    agents: list[AgentProcess] = []
    sched: asyncio.subprocess.Process | None = None
    load: Load | None = None
    events: DockerEvents | None = None
    out: dict[str, object] = {}
    keys = Keys(PREFIX)
    try:
        etcd.start()
        engine.start()
        image = await asyncio.to_thread(build_image, engine.host, quiet=True)
        client = docker.DockerClient(base_url=engine.host, version="1.41")
        events = DockerEvents(client)
        (tmp / "sys").mkdir()
        (tmp / "models").mkdir()

        def agent(node: str, backends: list[dict[str, object]], ttl: int) -> AgentProcess:
            config = write_config(tmp / f"{node}.toml", {
                "node_name": node, "etcd": [etcd.url], "etcd_prefix": PREFIX,
                "listen": f"127.0.0.1:{free_port()}", "docker_host": engine.host,
                "models_dir": str(tmp / "models"), "sysfs_root": str(tmp / "sys"),
                "heartbeat_interval": ttl / 3, "lease_ttl": ttl, "probe_interval": 0.3,
                "log_level": "info"}, backends)
            proc = AgentProcess(config).start()
            agents.append(proc)
            return proc

        names = [f"k{i}" for i in range(args.backends)]
        agent("fo-main", [sim_backend(n, image) for n in names], 3)
        watcher = Watcher(keys)
        store = EtcdStore([etcd.url])
        await store.connect()
        follow = asyncio.create_task(watcher.registry.run(store))
        main_keys = [f"fo-main/{n}" for n in names]
        await watcher.wait(lambda: all(watcher.ready.get(k) for k in main_keys), 120)

        port = free_port()
        sched = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "scheduler.main", "--etcd", etcd.url, "--listen",
            f"127.0.0.1:{port}", cwd=ROOT, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL, env={**os.environ, "AIVMM_LOG_LEVEL": "warning"})
        url = f"http://127.0.0.1:{port}"
        await asyncio.to_thread(wait_until, lambda: urllib.request.urlopen(
            url + "/readyz", timeout=1).status == 200, 30, "scheduler ready")
        load = Load(url, args.rate)
        load.start()

        # -- 1. docker kill of one backend -----------------------------------------------------
        steps: dict[str, list[float]] = {"kill→event": [], "event→agent": [],
                                         "agent→router": [], "total": []}
        from common.records import parse_backend
        for i in range(args.kills):
            key = main_keys[i % len(main_keys)]
            # Kill only while every backend is back: killing the next one while earlier ones
            # are still restarting measures an outage of the whole model, not a failover.
            await watcher.wait(lambda: all(watcher.ready.get(k) for k in main_keys), 180)
            record = parse_backend(await store.get(keys.backend(*key.split("/"))) or b"")
            cid = record.container_id or ""
            watcher.left.pop(key, None)
            t_kill = time.time()
            await asyncio.to_thread(lambda cid=cid: client.containers.get(cid).kill())
            await watcher.wait(lambda key=key: key in watcher.left, 30)
            after = parse_backend(await store.get(keys.backend(*key.split("/"))) or b"")
            died = events.died.get(cid)
            for _ in range(50):  # the event thread may trail the router by a moment
                if died is not None:
                    break
                await asyncio.sleep(0.01)
                died = events.died.get(cid)
            if died is None:
                continue
            steps["kill→event"].append(died - t_kill)
            steps["event→agent"].append(after.updated_at - died)
            steps["agent→router"].append(watcher.left[key] - after.updated_at)
            steps["total"].append(watcher.left[key] - t_kill)
        ok, errors = load.take()
        out["kill"] = {k: step_figures(v) for k, v in steps.items()}
        out["kill_requests"] = {"ok": ok, "errors": errors}

        # -- 2. a whole node dies --------------------------------------------------------------
        node_rows = []
        for ttl in args.ttls:
            for rep in range(args.reps):
                node = f"fo-n{ttl}-{rep}"
                backends = [sim_backend(f"d{j}", image) for j in range(2)]
                proc = agent(node, backends, ttl)
                dkeys = [f"{node}/{b['name']}" for b in backends]
                await watcher.wait(lambda dkeys=dkeys: all(watcher.ready.get(k) for k in dkeys),
                                   120)
                load.take()
                cids = [c.id for c in await asyncio.to_thread(
                    client.containers.list, filters={"label": f"aivmm.node={node}"})]
                t_kill = time.time()
                proc.signal(signal.SIGKILL)
                await asyncio.to_thread(
                    lambda cids=cids: [client.containers.get(c).kill() for c in cids])
                await watcher.wait(lambda dkeys=dkeys: all(k in watcher.gone for k in dkeys),
                                   ttl * 3 + 30)
                gone = max(watcher.gone[k] for k in dkeys)
                left = max(watcher.left.get(k, gone) for k in dkeys)
                ok, errors = load.take()
                node_rows.append({"ttl": ttl, "records_gone_s": round(gone - t_kill, 2),
                                  "unroutable_s": round(left - t_kill, 2),
                                  "ok": ok, "errors": errors})
                proc.wait(10)
                await asyncio.to_thread(lambda cids=cids: [
                    client.containers.get(c).remove(force=True) for c in cids])
        out["node"] = node_rows
        follow.cancel()
        await asyncio.gather(follow, return_exceptions=True)
        await store.close()
        client.close()
    finally:
        if load:
            await load.stop()
        if sched:
            sched.terminate()
            await sched.wait()
        for a in agents:
            a.stop()
        if events:
            events.close()
        with contextlib.suppress(Exception):
            c = docker.DockerClient(base_url=engine.host, version="1.41")
            for ctr in c.containers.list(all=True, filters={"label": "aivmm.managed=true"}):
                ctr.remove(force=True)
            c.close()
        engine.close()
        etcd.close()
        shutil.rmtree(tmp, ignore_errors=True)  # configs and agent logs
    return out


def tables(r: dict[str, object]) -> str:
    kill = r["kill"]
    assert isinstance(kill, dict)
    lines = ["| step (docker kill) | p50 ms | p99 ms | n |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['p50_ms'] if v['n'] else '-'} | {v['p99_ms'] if v['n'] else '-'} | "
              f"{v['n']} |" for k, v in kill.items()]
    req = r["kill_requests"]
    assert isinstance(req, dict)
    lines.append(f"\nclient requests during the kills: {req['ok']} ok, {req['errors']} errors\n")
    lines += ["| lease TTL s | records gone after s | unroutable after s | requests ok | errors |",
              "|---|---|---|---|---|"]
    nodes = r["node"]
    assert isinstance(nodes, list)
    lines += [f"| {n['ttl']} | {n['records_gone_s']} | {n['unroutable_s']} | {n['ok']} | "
              f"{n['errors']} |" for n in nodes]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kills", type=int, default=50)
    p.add_argument("--backends", type=int, default=10, help="containers killed in turn")
    p.add_argument("--ttls", type=lambda s: [int(x) for x in s.split(",")], default=[3, 5, 10])
    p.add_argument("--reps", type=int, default=2, help="node deaths per TTL")
    p.add_argument("--rate", type=float, default=50.0, help="client requests per second")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    result = asyncio.run(run(args))
    result["machine"] = (f"{platform.node()} {os.cpu_count()} CPUs, "
                         f"Python {platform.python_version()}")
    print(tables(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
