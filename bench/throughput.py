"""Scheduler throughput ceiling: requests/s at concurrency 256, one scheduler process, then
several on one port (SO_REUSEPORT: the kernel spreads connections over the processes).

A real etcd holds one ready backend record for one sim engine (no artificial latency, 4
tokens); the load generator (devtools/loadgen.py) drives non-streaming and streaming
completions through 1..``--max-procs`` scheduler processes, and straight to the sim for
reference. Each scheduler process is ``build_app`` + ``common.daemon.serve(reuse_port=True)``
(what ``aivmm-scheduler`` runs, plus the socket option; the console script has no switch for
it yet). On a 2-core machine the load generator, the sim and the schedulers share the cores,
so the figures bound the proxy from below.

    .venv/bin/python -m bench.throughput [--requests 20000] [--max-procs 3] [--json out.json]

Prints a Markdown table. Nothing here is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import urllib.request
from pathlib import Path

from common.keys import Keys
from common.records import BackendRecord, dump
from common.store import EtcdStore
from devtools.loadgen import drive
from devtools.services import EtcdServer, free_port, wait_until
from devtools.simproc import SimProcess

ROOT = Path(__file__).resolve().parent.parent

MODEL = "tp-m"
BODY = json.dumps({"model": MODEL, "prompt": "hello", "max_tokens": 4}).encode()
STREAM = json.dumps({"model": MODEL, "prompt": "hello", "max_tokens": 4,
                     "stream": True}).encode()


def serve_one(etcd_url: str, listen: str) -> int:
    """Child: one scheduler process sharing ``listen`` with its siblings."""
    from common.daemon import serve
    from scheduler.app import build_app
    from scheduler.config import SchedulerConfig

    config = SchedulerConfig(etcd=[etcd_url], listen=listen, log_level="warning")
    return asyncio.run(serve(build_app(config), listen, reuse_port=True,
                             handler_cancellation=True))


def ready(url: str) -> bool:
    with urllib.request.urlopen(url + "/readyz", timeout=1) as resp:
        return resp.status == 200


async def run(args: argparse.Namespace) -> dict[str, object]:
    etcd = EtcdServer()
    sim = SimProcess(MODEL, latency_ms=0, tokens_per_second=0, chunks=4)
    rows: list[dict[str, object]] = []
    try:
        etcd.start()
        sim.start()
        async with EtcdStore([etcd.url]) as store:
            rec = BackendRecord(node="tp", name="sim", models=[MODEL], url=sim.url,
                                state="ready", engine="sim")
            await store.put(Keys().backend("tp", "sim"), dump(rec))

        async def measure(name: str, base: str) -> None:
            for stream, body in ((False, BODY), (True, STREAM)):
                await drive(base + "/v1/completions", body, concurrency=args.concurrency,
                            requests=min(2000, args.requests))  # warm-up
                r = await drive(base + "/v1/completions", body, concurrency=args.concurrency,
                                requests=args.requests, stream=stream)
                p50, p99, rps, errors = r.row()
                rows.append({"path": name, "stream": stream, "rps": round(rps),
                             "p50_ms": round(p50, 2), "p99_ms": round(p99, 2),
                             "errors": errors})

        await measure("sim direct", sim.url)
        for n in range(1, args.max_procs + 1):
            port = free_port()
            listen = f"127.0.0.1:{port}"
            procs = [await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bench.throughput", "--serve", etcd.url, listen, cwd=ROOT)
                for _ in range(n)]
            try:
                url = f"http://{listen}"
                await asyncio.to_thread(wait_until, lambda url=url: ready(url), 30,
                                        "schedulers ready")
                await asyncio.sleep(1.0)  # let every sibling finish loading its table
                await measure(f"{n} scheduler process{'es' if n > 1 else ''}", url)
            finally:
                for p in procs:
                    p.terminate()
                for p in procs:
                    await p.wait()
    finally:
        sim.stop()
        etcd.close()
    return {"concurrency": args.concurrency, "requests": args.requests, "rows": rows}


def table(r: dict[str, object]) -> str:
    lines = ["| path | mode | req/s | p50 ms | p99 ms | errors |", "|---|---|---|---|---|---|"]
    for row in r["rows"]:  # type: ignore[union-attr]
        lines.append(f"| {row['path']} | {'stream' if row['stream'] else 'plain'} | "
                     f"{row['rps']} | {row['p50_ms']} | {row['p99_ms']} | {row['errors']} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--concurrency", type=int, default=256)
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--max-procs", type=int, default=3)
    p.add_argument("--json", type=Path)
    p.add_argument("--serve", nargs=2, metavar=("ETCD_URL", "LISTEN"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        return serve_one(*args.serve)
    result = asyncio.run(run(args))
    result["machine"] = (f"{platform.node()} {os.cpu_count()} CPUs, "
                         f"Python {platform.python_version()}")
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
