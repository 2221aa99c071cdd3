"""Fleet scale: many simulated nodes heartbeating into one etcd, and what a scheduler pays.

The fleet is the agent's own ``agent.health.heartbeat.Heartbeat``, one instance per simulated
node, all in this process over one shared ``EtcdStore``; each node has ``--gpus`` GPUs and
``--per-gpu`` backends per GPU whose probe latency moves the way the agent's EWMA does (one
probe sample per heartbeat). With the fleet running it measures:

- etcd writes per second and bytes written per heartbeat (counted at the store, checked
  against etcd's own counters),
- a real ``aivmm-scheduler`` process: time from spawn to ``/readyz`` 200 and its RSS, with the
  whole fleet and with an empty prefix (the fixed cost of the process),
- in a separate watcher process using ``scheduler.registry`` + ``scheduler.routing`` over the
  real ``sync_prefix``: load time, ``Router.choose`` time p50/p99, and the delay from a put
  (timestamp in the record) to the record applied in the router, p50/p99.

    .venv/bin/python -m bench.fleet [--nodes 1000] [--duration 20] [--json out.json]

Prints a Markdown table. Nothing here is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry

from agent.health.heartbeat import Heartbeat
from agent.health.probe import Ewma
from agent.metrics import AgentMetrics
from common.keys import Keys
from common.records import BackendLoad, BackendRecord, GpuRecord, NodeRecord, dump
from common.store import EtcdStore, Event, Reset
from devtools.services import EtcdServer, free_port, wait_until
from devtools.stats import percentile

ROOT = Path(__file__).resolve().parent.parent

PREFIX = "/aivmm/v1"
PROBE_NODE = "zz-probe"


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class CountingStore(EtcdStore):
    """The real store, counting what the fleet sends to etcd."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.puts = self.put_bytes = self.keepalives = self.deletes = self.txns = 0
        self.node_puts = self.backend_puts = 0

    def reset_counts(self) -> None:
        self.puts = self.put_bytes = self.keepalives = self.deletes = self.txns = 0
        self.node_puts = self.backend_puts = 0

    async def put(self, key: str, value: bytes, *, lease: int | None = None) -> int:
        self.puts += 1
        self.put_bytes += len(key) + len(value)
        if "/nodes/" in key:
            self.node_puts += 1
        else:
            self.backend_puts += 1
        return await super().put(key, value, lease=lease)

    async def put_many(self, items: list[tuple[str, bytes]], *, lease: int | None = None) -> int:
        self.puts += len(items)
        self.txns += 1
        self.put_bytes += sum(len(k) + len(v) for k, v in items)
        self.backend_puts += sum("/nodes/" not in k for k, _ in items)
        self.node_puts += sum("/nodes/" in k for k, _ in items)
        return await super().put_many(items, lease=lease)

    async def keep_alive(self, lease_id: int) -> int:
        self.keepalives += 1
        return await super().keep_alive(lease_id)

    async def delete(self, key: str) -> bool:
        self.deletes += 1
        return await super().delete(key)


class SimNode:
    """One simulated machine: its node record and backend records, as an agent makes them."""

    def __init__(self, index: int, gpus: int, per_gpu: int, models: int,
                 rng: random.Random) -> None:
        self.name = f"node-{index:04d}"
        self.rng = rng
        self.gpus = [GpuRecord(index=g, vendor="nvidia", name="NVIDIA H200",
                               uuid=f"GPU-{index:04d}{g:02d}-0000-0000-0000-000000000000",
                               pci_bus_id=f"0000:{g + 3:02x}:00.0", memory_total_bytes=150 << 30,
                               memory_used_bytes=0, utilization=0.0, temperature_c=35.0,
                               power_w=80.0, driver="nvidia", driver_version="570.86.15")
                     for g in range(gpus)]
        self.started = time.time()
        self.backends: list[BackendRecord] = []
        self.latency: list[Ewma] = []
        self.base_ms: list[float] = []
        for g in range(gpus):
            for b in range(per_gpu):
                i = g * per_gpu + b
                self.backends.append(BackendRecord(
                    node=self.name, name=f"b{i}", models=[f"model-{(index * 7 + i) % models}"],
                    url=f"http://10.{index // 250}.{index % 250}.1:{8000 + i}", state="ready",
                    engine="vllm", vendor="nvidia", gpus=[self.gpus[g].uuid],
                    container_id=f"{index:08x}{i:056x}", load=BackendLoad(0, 0, 0.0),
                    updated_at=self.started))
                self.latency.append(Ewma())
                self.base_ms.append(rng.uniform(2.0, 20.0))

    def node_record(self) -> NodeRecord:
        # GPU figures move between heartbeats, as NVML's do.
        for g in self.gpus:
            g.memory_used_bytes = int(self.rng.uniform(60, 140)) << 30
            g.utilization = round(self.rng.random(), 2)
            g.temperature_c = float(self.rng.randint(40, 80))
            g.power_w = round(self.rng.uniform(100, 700), 1)
        return NodeRecord(node=self.name, agent_version="0.1.0", started_at=self.started,
                          heartbeat_at=time.time(), gpus=self.gpus)

    def backend_records(self) -> list[BackendRecord]:
        # One probe per call: the supervisor's EWMA of a noisy health-request latency.
        for rec, ewma, base in zip(self.backends, self.latency, self.base_ms, strict=True):
            value = ewma.add(base * self.rng.uniform(0.8, 1.25) / 1000)
            rec.probe_latency_ms = round(value * 1000, 3)
        return self.backends


def etcd_metrics(url: str) -> dict[str, float]:
    out: dict[str, float] = {}
    with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith("#") or " " not in line:
                continue
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def etcd_writes(m: dict[str, float]) -> float:
    return m.get("etcd_mvcc_put_total", m.get("etcd_debugging_mvcc_put_total", 0.0))


def etcd_rx_bytes(m: dict[str, float]) -> float:
    return sum(v for k, v in m.items() if k.startswith("etcd_network_client_grpc_received_bytes"))


@dataclass
class SchedulerStart:
    ready_s: float
    rss: int
    backends: int


def start_scheduler(etcd_url: str, prefix: str, timeout: float) -> SchedulerStart:
    """Spawn ``python -m scheduler.main``; time to /readyz 200 and its RSS then."""
    port = free_port()
    env = {**os.environ, "AIVMM_ETCD_PREFIX": prefix, "AIVMM_LOG_LEVEL": "warning"}
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "scheduler.main", "--etcd", etcd_url,
                             "--listen", f"127.0.0.1:{port}"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    body: dict[str, object] = {}

    def ready() -> bool:
        nonlocal body
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as resp:
            body = json.loads(resp.read())
            return resp.status == 200

    try:
        wait_until(ready, timeout, "aivmm-scheduler ready", interval=0.01)
        ready_s = time.monotonic() - t0
        rss = rss_bytes(proc.pid)
    finally:
        proc.terminate()
        proc.wait(10)
    counts = body.get("backends") or {}
    return SchedulerStart(ready_s, rss, sum(counts.values()) if isinstance(counts, dict) else 0)


# -- the watcher process ---------------------------------------------------------------------

async def watcher(etcd_url: str, probes: int, decisions: int) -> None:
    """Child process: load the table, time decisions, then report propagation delays."""
    from scheduler.registry import Registry
    from scheduler.routing import Router

    keys = Keys(PREFIX)
    router = Router()
    registry = Registry(router, keys)
    probe_prefix = keys.node_backends(PROBE_NODE)
    async with EtcdStore([etcd_url]) as store:
        t0 = time.perf_counter()
        sync = store.sync_prefix(keys.backends)
        first = await anext(sync)
        assert isinstance(first, Reset)
        registry.apply(first)
        load_s = time.perf_counter() - t0
        # Decision time over the loaded table, all models in turn.
        models = sorted(router._by_model)
        now = time.monotonic()
        times: list[float] = []
        clock = time.perf_counter_ns
        for i in range(decisions):
            model = models[i % len(models)]
            t = clock()
            router.choose(model, now)
            times.append(clock() - t)
        print(json.dumps({"loaded": len(router.backends), "load_s": load_s,
                          "decision_p50_us": percentile(times, 50) / 1000,
                          "decision_p99_us": percentile(times, 99) / 1000,
                          "models": len(models)}), flush=True)
        # Catch up with what the fleet wrote meanwhile before timing anything: put a marker
        # and apply events until it comes back.
        marker = keys.backend(PROBE_NODE, "marker")
        await store.put(marker, dump(BackendRecord(
            node=PROBE_NODE, name="marker", models=["model-0"], url="http://127.0.0.2:1",
            state="stopped", engine="sim")))
        async for item in sync:
            registry.apply(item)
            if isinstance(item, Event) and item.key == marker:
                break
        print(json.dumps({"caught_up": True}), flush=True)
        delays: list[float] = []
        async for item in sync:
            registry.apply(item)
            if isinstance(item, Event) and item.kind == "put" and item.key.startswith(
                    probe_prefix):
                delays.append(time.time() - json.loads(item.value)["updated_at"])
                if len(delays) >= probes:
                    break
        print(json.dumps({"prop_p50_ms": percentile(delays, 50) * 1000,
                          "prop_p99_ms": percentile(delays, 99) * 1000,
                          "prop_max_ms": max(delays) * 1000, "probes": len(delays)}), flush=True)


# -- the fleet ---------------------------------------------------------------------------------

async def run(args: argparse.Namespace) -> dict[str, object]:
    rng = random.Random(7)
    etcd = EtcdServer()
    etcd.start()
    out: dict[str, object] = {"nodes": args.nodes,
                              "backends": args.nodes * args.gpus * args.per_gpu,
                              "interval_s": args.interval, "ttl_s": args.ttl}
    tasks: list[asyncio.Task[None]] = []
    try:
        keys = Keys(PREFIX)
        store = CountingStore([etcd.url], timeout=30.0)
        await store.connect()
        metrics = AgentMetrics(CollectorRegistry(), "fleet")
        nodes = [SimNode(i, args.gpus, args.per_gpu, args.models, rng) for i in range(args.nodes)]
        beats = [Heartbeat(store, keys, node=n.name, interval=args.interval, ttl=args.ttl,
                           node_record=n.node_record, backends=n.backend_records,
                           metrics=metrics, rng=random.Random(i)) for i, n in enumerate(nodes)]
        t0 = time.monotonic()
        # Agents start at different moments: spread the first registrations over the ramp.
        ramp = args.ramp if args.ramp is not None else max(args.interval, args.nodes / 100)
        for beat in beats:
            tasks.append(asyncio.create_task(beat.run()))
            await asyncio.sleep(ramp / len(beats))
        deadline = time.monotonic() + 60 + 2 * args.interval
        # Heartbeat has no "registered" event to wait on: poll, bounded.
        while not all(b.connected for b in beats):
            if time.monotonic() > deadline:
                raise TimeoutError("the fleet did not register within a minute")
            await asyncio.sleep(0.1)
        out["register_s"] = round(time.monotonic() - t0, 2)
        out["ramp_s"] = ramp
        out["lease_losses"] = int(sum(
            s.value for m in metrics.etcd_errors.collect() for s in m.samples
            if s.name.endswith("_total")))
        await asyncio.sleep(args.interval)  # one full round past the first writes

        store.reset_counts()
        m0 = await asyncio.to_thread(etcd_metrics, etcd.url)
        t0 = time.monotonic()
        await asyncio.sleep(args.duration)
        elapsed = time.monotonic() - t0
        m1 = await asyncio.to_thread(etcd_metrics, etcd.url)
        heartbeats = store.node_puts  # every heartbeat rewrites the node record, once
        out["heartbeats_per_s"] = round(heartbeats / elapsed, 1)
        out["expected_heartbeats_per_s"] = round(args.nodes / args.interval, 1)
        out["puts_per_s"] = round(store.puts / elapsed, 1)
        out["node_puts_per_s"] = round(store.node_puts / elapsed, 1)
        out["backend_puts_per_s"] = round(store.backend_puts / elapsed, 1)
        out["keepalives_per_s"] = round(store.keepalives / elapsed, 1)
        out["etcd_puts_per_s"] = round((etcd_writes(m1) - etcd_writes(m0)) / elapsed, 1)
        out["bytes_per_heartbeat"] = round(store.put_bytes / max(1, heartbeats))
        out["etcd_rx_bytes_per_heartbeat"] = round(
            (etcd_rx_bytes(m1) - etcd_rx_bytes(m0)) / max(1, heartbeats))
        out["node_record_bytes"] = len(dump(nodes[0].node_record()))
        out["backend_record_bytes"] = len(dump(nodes[0].backends[0]))
        out["etcd_rss_mb"] = round(rss_bytes(etcd.proc.pid) / 2**20, 1) if etcd.proc else 0

        # A new scheduler replica, as a user would start it, while the fleet heartbeats.
        empty = await asyncio.to_thread(start_scheduler, etcd.url, "/aivmm/empty", 60)
        full = await asyncio.to_thread(start_scheduler, etcd.url, PREFIX, 120)
        out["sched_empty_ready_s"] = round(empty.ready_s, 3)
        out["sched_empty_rss_mb"] = round(empty.rss / 2**20, 1)
        out["sched_ready_s"] = round(full.ready_s, 3)
        out["sched_rss_mb"] = round(full.rss / 2**20, 1)
        out["sched_backends_seen"] = full.backends

        # Registry + router in their own process; puts from this one, under the fleet's load.
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.fleet", "--watch", etcd.url, "--probes",
            str(args.probes), "--decisions", str(args.decisions), stdout=asyncio.subprocess.PIPE,
            cwd=ROOT)
        assert proc.stdout is not None
        first = json.loads(await asyncio.wait_for(proc.stdout.readline(), 300))
        out.update({k: round(v, 3) if isinstance(v, float) else v for k, v in first.items()})
        await asyncio.wait_for(proc.stdout.readline(), 300)  # caught up with the fleet
        writer = EtcdStore([etcd.url], timeout=30.0)
        await writer.connect()
        try:
            pending = asyncio.ensure_future(proc.stdout.readline())
            i = 0
            deadline = time.monotonic() + 120 + 2 * args.probes / args.probe_rate
            while not pending.done():
                if time.monotonic() > deadline:
                    proc.kill()
                    raise TimeoutError("the watcher did not see the probe puts in time")
                rec = BackendRecord(node=PROBE_NODE, name=f"p{i % 16}", models=["model-0"],
                                    url="http://127.0.0.2:1", state="ready", engine="sim",
                                    updated_at=time.time())
                await writer.put(keys.backend(PROBE_NODE, rec.name), dump(rec))
                i += 1
                await asyncio.sleep(1 / args.probe_rate)
            second = json.loads(pending.result())
        finally:
            await writer.close()
        await proc.wait()
        out.update({k: round(v, 3) if isinstance(v, float) else v for k, v in second.items()})
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if tasks:
            await store.close()
        etcd.close()
    return out


def table(r: dict[str, object]) -> str:
    rows = [
        ("fleet", f"{r['nodes']} nodes, {r['backends']} backends, heartbeat {r['interval_s']} s, "
                  f"lease TTL {r['ttl_s']} s"),
        ("all nodes registered after (starts spread over)",
         f"{r['register_s']} s ({r['ramp_s']} s)"),
        ("etcd errors during registration (lease lost, re-registered)", r["lease_losses"]),
        ("heartbeats/s (expected)", f"{r['heartbeats_per_s']} ({r['expected_heartbeats_per_s']})"),
        ("etcd puts/s (client count / etcd's count)",
         f"{r['puts_per_s']} / {r['etcd_puts_per_s']}"),
        ("  of which node / backend records",
         f"{r['node_puts_per_s']} / {r['backend_puts_per_s']}"),
        ("lease keep-alives/s", r["keepalives_per_s"]),
        ("bytes put per heartbeat (key+value; etcd gRPC rx)",
         f"{r['bytes_per_heartbeat']} ({r['etcd_rx_bytes_per_heartbeat']})"),
        ("node record / backend record size", f"{r['node_record_bytes']} B / "
                                              f"{r['backend_record_bytes']} B"),
        ("etcd RSS", f"{r['etcd_rss_mb']} MB"),
        ("scheduler process: spawn to /readyz, empty / full",
         f"{r['sched_empty_ready_s']} s / {r['sched_ready_s']} s "
         f"({r['sched_backends_seen']} backends)"),
        ("scheduler process RSS, empty / full",
         f"{r['sched_empty_rss_mb']} MB / {r['sched_rss_mb']} MB"),
        ("registry load in-process (range + parse + index)", f"{r['load_s']} s"),
        (f"Router.choose p50 / p99 ({r['models']} models)",
         f"{r['decision_p50_us']} µs / {r['decision_p99_us']} µs"),
        (f"put → applied in router p50 / p99 / max ({r['probes']} puts)",
         f"{r['prop_p50_ms']} ms / {r['prop_p99_ms']} ms / {r['prop_max_ms']} ms"),
    ]
    return "| measure | value |\n|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nodes", type=int, default=1000)
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--per-gpu", type=int, default=2)
    p.add_argument("--models", type=int, default=50)
    p.add_argument("--interval", type=float, default=3.0, help="heartbeat interval (agent default)")
    p.add_argument("--ttl", type=int, default=10)
    p.add_argument("--ramp", type=float, help="seconds over which the nodes start "
                   "(default: nodes/100, at least one interval)")
    p.add_argument("--duration", type=float, default=20.0, help="steady-state window, seconds")
    p.add_argument("--decisions", type=int, default=200_000)
    p.add_argument("--probes", type=int, default=300)
    p.add_argument("--probe-rate", type=float, default=50.0, help="probe puts per second")
    p.add_argument("--json", type=Path)
    p.add_argument("--watch", metavar="ETCD_URL", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.watch:
        asyncio.run(watcher(args.watch, args.probes, args.decisions))
        return 0
    result = asyncio.run(run(args))
    result["machine"] = (f"{platform.node()} {os.cpu_count()} CPUs, "
                         f"Python {platform.python_version()}")
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
