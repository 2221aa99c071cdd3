"""What aivmm-scheduler costs on the request path, next to a direct call and a minimal proxy.

One run starts a real etcd, one sim backend (no artificial latency), the minimal aiohttp proxy
(bench/minimal_proxy.py) and aivmm-scheduler, each as its own process, then measures the
three paths in interleaved rounds (so drift on a shared machine hits all three alike):

- latency at concurrency 1 (p50/p99; "added" = minus the direct path's figure),
- throughput and p99 at concurrency 64,
- streaming time to first token at concurrency 1,
- CPU seconds per 1,000 requests of the proxy process (from /proc/PID/stat).

    .venv/bin/python -m bench.bench_scheduler [--rounds 3] [--json out.json] [--keys]

``--keys`` adds a fourth path: a second scheduler process whose etcd prefix holds 1,000 API
keys (docs/keys.md), every one with rpm, tpm and max_parallel limits set (high enough never to
refuse, so every check runs), driven with one of those keys; its added p50 is reported against
the keys-off scheduler's.

Prints a Markdown table (docs/benchmarks.md keeps a copy). Nothing here is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from common.keys import Keys
from common.records import BackendRecord, KeyRecord, dump
from common.store import EtcdStore
from devtools.services import EtcdServer, free_port, wait_until
from devtools.simproc import SimProcess
from devtools.stats import percentile
from scheduler.apikeys import hash_key, new_key

ROOT = Path(__file__).resolve().parent.parent

MODEL = "bench-m"
BODY = json.dumps({"model": MODEL, "prompt": "hello", "max_tokens": 4}).encode()
STREAM_BODY = json.dumps({"model": MODEL, "prompt": "hello", "max_tokens": 4,
                          "stream": True}).encode()
HEADERS = {"Content-Type": "application/json"}
PATH = "/v1/completions"
KEYS_PREFIX = "/aivmm-keys/v1"
N_KEYS = 1000


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Path_:
    name: str
    url: str
    pid: int | None
    c1: list[float] = field(default_factory=list)
    c64: list[float] = field(default_factory=list)
    c64_rps: list[float] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    cpu: float = 0.0
    requests: int = 0
    headers: dict[str, str] = field(default_factory=lambda: dict(HEADERS))


async def load(session: aiohttp.ClientSession, url: str, concurrency: int, n: int,
               stream: bool = False, headers: dict[str, str] = HEADERS
               ) -> tuple[list[float], float]:
    """``n`` requests over ``concurrency`` workers: (latencies or TTFTs, elapsed)."""
    latencies: list[float] = []
    left = n

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            t0 = time.perf_counter()
            async with session.post(url + PATH, data=STREAM_BODY if stream else BODY,
                                    headers=headers) as r:
                if r.status != 200:
                    raise RuntimeError(f"{url}: status {r.status}")
                if stream:
                    await r.content.readany()
                    latencies.append(time.perf_counter() - t0)
                    await r.read()
                else:
                    await r.read()
                    latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, time.perf_counter() - start


async def measure(paths: list[Path_], rounds: int, n1: int, n64: int, nstream: int) -> None:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        for p in paths:  # warm every path (pools, caches, EWMA)
            await load(session, p.url, 8, 200, headers=p.headers)
        for rnd in range(rounds):
            order = paths[:]
            random.shuffle(order)
            for p in order:
                cpu0 = cpu_seconds(p.pid) if p.pid else 0.0
                lat, _ = await load(session, p.url, 1, n1, headers=p.headers)
                p.c1 += lat
                lat, elapsed = await load(session, p.url, 64, n64, headers=p.headers)
                p.c64 += lat
                p.c64_rps.append(n64 / elapsed)
                lat, _ = await load(session, p.url, 1, nstream, stream=True, headers=p.headers)
                p.ttft += lat
                if p.pid:
                    p.cpu += cpu_seconds(p.pid) - cpu0
                p.requests += n1 + n64 + nstream
            print(f"round {rnd + 1}/{rounds} done", file=sys.stderr)


def report(paths: list[Path_]) -> tuple[str, dict[str, dict[str, float]]]:
    direct = paths[0]
    d50, d99 = percentile(direct.c1, 50), percentile(direct.c1, 99)
    rows = ["| path | c=1 p50 ms | c=1 p99 ms | added p50 ms | added p99 ms | "
            "c=64 req/s | c=64 p99 ms | stream TTFT p50 ms | CPU s / 1k req |",
            "|---|---|---|---|---|---|---|---|---|"]
    data: dict[str, dict[str, float]] = {}
    for p in paths:
        p50, p99 = percentile(p.c1, 50), percentile(p.c1, 99)
        fig = {
            "c1_p50_ms": p50 * 1e3, "c1_p99_ms": p99 * 1e3,
            "added_p50_ms": (p50 - d50) * 1e3, "added_p99_ms": (p99 - d99) * 1e3,
            "c64_rps": statistics.median(p.c64_rps), "c64_p99_ms": percentile(p.c64, 99) * 1e3,
            "ttft_p50_ms": percentile(p.ttft, 50) * 1e3,
            "cpu_s_per_1k": p.cpu / p.requests * 1000 if p.pid else float("nan"),
        }
        data[p.name] = fig
        rows.append(
            f"| {p.name} | {fig['c1_p50_ms']:.2f} | {fig['c1_p99_ms']:.2f} | "
            f"{fig['added_p50_ms']:.2f} | {fig['added_p99_ms']:.2f} | {fig['c64_rps']:.0f} | "
            f"{fig['c64_p99_ms']:.1f} | {fig['ttft_p50_ms']:.2f} | "
            + (f"{fig['cpu_s_per_1k']:.2f} |" if p.pid else "- |"))
    mp, sc = data["minimal proxy"], data["aivmm-scheduler"]
    rows.append("")
    rows.append(f"scheduler throughput = {sc['c64_rps'] / mp['c64_rps'] * 100:.0f}% of the "
                f"minimal proxy's (target ≥ 90%); added p50 at c=1 is "
                f"{sc['added_p50_ms'] - mp['added_p50_ms']:+.3f} ms over the minimal proxy's "
                f"(target ≤ +0.25 ms).")
    if "aivmm-scheduler, 1,000 keys" in data:
        ks = data["aivmm-scheduler, 1,000 keys"]
        rows.append(f"1,000 keys loaded, limits on: added p50 at c=1 is "
                    f"{ks['added_p50_ms'] - sc['added_p50_ms']:+.3f} ms over keys off "
                    f"(goal ≤ +0.05 ms); stream TTFT p50 "
                    f"{ks['ttft_p50_ms'] - sc['ttft_p50_ms']:+.3f} ms; throughput "
                    f"{ks['c64_rps'] / sc['c64_rps'] * 100:.0f}% of keys off.")
    return "\n".join(rows), data


async def publish(etcd: EtcdServer, sim: SimProcess) -> None:
    async with EtcdStore([etcd.url]) as store:
        record = BackendRecord(node="bench", name="sim", models=[MODEL], url=sim.url,
                               state="ready", engine="sim", probe_latency_ms=1.0,
                               updated_at=time.time())
        for prefix in ("/aivmm/v1", KEYS_PREFIX):
            await store.put(Keys(prefix).backend("bench", "sim"), dump(record))


async def load_keys(etcd: EtcdServer) -> str:
    """N_KEYS keys under KEYS_PREFIX, each with every limit on; returns one of them."""
    keys = Keys(KEYS_PREFIX)
    chosen = ""
    async with EtcdStore([etcd.url]) as store:
        batch: list[tuple[str, bytes]] = []
        for i in range(N_KEYS):
            secret = new_key()
            chosen = chosen or secret
            record = KeyRecord(name=f"team-{i:04d}", hash=hash_key(secret), prefix=secret[:12],
                               models=[MODEL, f"other-{i}"], rpm=10**9, tpm=10**12,
                               max_parallel=10**6, created_at=time.time())
            batch.append((keys.api_key(record.name), dump(record)))
            if len(batch) == 100:
                await store.put_many(batch)
                batch = []
    return chosen


def start(cmd: list[str], url: str, what: str,
          env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env)

    def ready() -> bool:
        with urllib.request.urlopen(url, timeout=1) as r:
            return r.status == 200
    wait_until(ready, 30, what)
    return proc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--n1", type=int, default=500, help="requests per round at c=1")
    parser.add_argument("--n64", type=int, default=3000, help="requests per round at c=64")
    parser.add_argument("--nstream", type=int, default=200, help="streams per round")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--keys", action="store_true",
                        help="also a scheduler with 1,000 keys loaded and limits on")
    args = parser.parse_args()

    etcd = EtcdServer()
    sim = SimProcess(MODEL, name="sim", latency_ms=0, tokens_per_second=0, chunks=4)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        etcd.start()
        sim.start()
        asyncio.run(publish(etcd, sim))
        mport, sport = free_port(), free_port()
        minimal = start([sys.executable, "-m", "bench.minimal_proxy", "--listen",
                         f"127.0.0.1:{mport}", "--upstream", sim.url],
                        f"http://127.0.0.1:{mport}/v1/models", "minimal proxy")
        procs.append(minimal)
        sched = start([sys.executable, "-m", "scheduler.main", "--etcd", etcd.url, "--listen",
                       f"127.0.0.1:{sport}", "--log-level", "warning"],
                      f"http://127.0.0.1:{sport}/readyz", "scheduler")
        procs.append(sched)
        wait_until(lambda: MODEL.encode() in urllib.request.urlopen(
            f"http://127.0.0.1:{sport}/v1/models", timeout=1).read(), 30, "scheduler routes")
        assert sim.proc is not None
        paths = [Path_("direct", sim.url, None),
                 Path_("minimal proxy", f"http://127.0.0.1:{mport}", minimal.pid),
                 Path_("aivmm-scheduler", f"http://127.0.0.1:{sport}", sched.pid)]
        if args.keys:
            secret = asyncio.run(load_keys(etcd))
            kport = free_port()
            keyed = start([sys.executable, "-m", "scheduler.main", "--etcd", etcd.url,
                           "--listen", f"127.0.0.1:{kport}", "--log-level", "warning"],
                          f"http://127.0.0.1:{kport}/readyz", "scheduler with keys",
                          env={**os.environ, "AIVMM_ETCD_PREFIX": KEYS_PREFIX})
            procs.append(keyed)
            auth = {**HEADERS, "Authorization": f"Bearer {secret}"}
            wait_until(lambda: MODEL.encode() in urllib.request.urlopen(urllib.request.Request(
                f"http://127.0.0.1:{kport}/v1/models", headers=auth), timeout=1).read(),
                30, "scheduler with keys routes")
            paths.append(Path_("aivmm-scheduler, 1,000 keys", f"http://127.0.0.1:{kport}",
                               keyed.pid, headers=auth))
        asyncio.run(measure(paths, args.rounds, args.n1, args.n64, args.nstream))
        table, data = report(paths)
        print(f"{platform.node()}: {os.cpu_count()} CPUs, Python {platform.python_version()}, "
              f"aiohttp {aiohttp.__version__}; {args.rounds} interleaved rounds\n")
        print(table)
        if args.json:
            Path(args.json).write_text(json.dumps(data, indent=2))
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)
        sim.stop()
        etcd.close()


if __name__ == "__main__":
    main()
