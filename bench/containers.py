"""Container overhead: the sim engine as a plain process, in a container with host
networking, and in a container behind a published port, measured side by side in one run.

The server gets CPU 1 and the load generator CPU 0 where the machine has two (``taskset`` /
``--cpuset-cpus``). Rounds interleave the three paths in shuffled order, so drift on a shared
machine hits all of them alike. The published-port case needs a Docker engine with a bridge:
this starts a second private engine with one (``--iptables=false`` still, so the port is
served by ``docker-proxy``, Docker's userland proxy); where that cannot work the row says why.
The client talks to 127.0.0.1 only.

    .venv/bin/python -m bench.containers [--rounds 3] [--requests 2000] [--json out.json]

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
from pathlib import Path

import docker

from devtools.image import build_image
from devtools.loadgen import Result, drive
from devtools.services import DockerEngine, free_port, wait_until
from devtools.simproc import SimProcess

ROOT = Path(__file__).resolve().parent.parent

MODEL = "ovh-m"
KNOBS = {"latency_ms": 0, "tokens_per_second": 0, "chunks": 4}
BODY = json.dumps({"model": MODEL, "prompt": "hello", "max_tokens": 4}).encode()
TWO_CPUS = (os.cpu_count() or 1) >= 2
SERVER_CPU = "1" if TWO_CPUS else "0"


class BridgeEngine(DockerEngine):
    """A private dockerd that keeps its default bridge (on a private /24), no iptables."""

    def start(self, timeout: float = 60.0) -> None:
        self.had_bridge = Path("/sys/class/net/docker0").exists()
        log = (self.workdir / "dockerd.log").open("ab")
        self.proc = subprocess.Popen(
            [self.binary, "--bip", "192.168.251.1/24", "--iptables=false", "--ip-masq=false",
             "--userland-proxy=true",
             "--data-root", str(self.workdir / "data"), "--exec-root", str(self.workdir / "exec"),
             "--pidfile", str(self.workdir / "docker.pid"), "--host", self.host,
             "--containerd-namespace", f"aivmm-br-{os.getpid()}"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        wait_until(self.healthy, timeout, f"dockerd on {self.host}", interval=0.2)

    def close(self) -> None:
        super().close()
        if not self.had_bridge:  # dockerd leaves its bridge behind: remove what we created
            subprocess.run(["ip", "link", "delete", "docker0"], check=False,
                           capture_output=True)


def answers(url: str) -> bool:
    with urllib.request.urlopen(url + "/v1/models", timeout=1) as resp:
        return resp.status == 200


def sim_args(host: str, port: int) -> list[str]:
    args = ["--host", host, "--port", str(port), "--model", MODEL, "--log-level", "warning"]
    for key, value in KNOBS.items():
        args += ["--" + key.replace("_", "-"), str(value)]
    return args


def run_container(host: str, image: str, published: bool) -> tuple[str, docker.DockerClient, str]:
    client = docker.DockerClient(base_url=host, version="1.41")
    port = free_port()
    if published:
        c = client.containers.run(image, sim_args("0.0.0.0", 8000), detach=True,
                                  ports={"8000/tcp": ("127.0.0.1", port)},
                                  cpuset_cpus=SERVER_CPU)
    else:
        c = client.containers.run(image, sim_args("127.0.0.1", port), detach=True,
                                  network_mode="host", cpuset_cpus=SERVER_CPU)
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: answers(url), 30, f"sim container on {url}")
    return url, client, c.id


async def run(args: argparse.Namespace) -> dict[str, object]:
    if TWO_CPUS:
        os.sched_setaffinity(0, {0})  # the load generator; servers get CPU 1
    paths: dict[str, str] = {}
    notes: dict[str, str] = {}
    cleanup: list[object] = []
    host_engine = DockerEngine()
    bridge: BridgeEngine | None = None
    sim = SimProcess(MODEL, **KNOBS)
    try:
        sim.command = (lambda orig=sim.command: ["taskset", "-c", SERVER_CPU, *orig()])  # type: ignore[method-assign]
        sim.start()
        paths["process"] = sim.url
        host_engine.start()
        image = await asyncio.to_thread(build_image, host_engine.host, quiet=True)
        url, client, cid = await asyncio.to_thread(run_container, host_engine.host, image, False)
        paths["container, host network"] = url
        cleanup.append((client, cid))
        try:
            bridge = BridgeEngine()
            bridge.start()
            bimage = await asyncio.to_thread(build_image, bridge.host, quiet=True)
            url, bclient, bcid = await asyncio.to_thread(run_container, bridge.host, bimage, True)
            paths["container, published port"] = url
            cleanup.append((bclient, bcid))
        except Exception as err:  # a machine without bridge support: say so in the table
            why = getattr(err, "explanation", None) or str(err)
            notes["container, published port"] = f"not measured: {why}"[:300]

        results: dict[str, dict[str, Result]] = {name: {} for name in paths}
        for _ in range(args.rounds):
            order = list(paths)
            random.shuffle(order)
            for name in order:
                u = paths[name] + "/v1/completions"
                for c in (1, args.concurrency):
                    r = await drive(u, BODY, concurrency=c, requests=args.requests)
                    acc = results[name].setdefault(f"c{c}", Result())
                    acc.latencies += r.latencies
                    acc.errors += r.errors
                    acc.elapsed += r.elapsed
        out: dict[str, object] = {"rounds": args.rounds, "requests": args.requests,
                                  "concurrency": args.concurrency, "notes": notes, "paths": {}}
        for name, by_c in results.items():
            c1, cn = by_c["c1"].row(), by_c[f"c{args.concurrency}"].row()
            out["paths"][name] = {  # type: ignore[index]
                "c1_p50_ms": round(c1[0], 3), "c1_p99_ms": round(c1[1], 3),
                "c1_rps": round(c1[2]), "cN_p50_ms": round(cn[0], 3),
                "cN_p99_ms": round(cn[1], 3), "cN_rps": round(cn[2]), "errors": c1[3] + cn[3]}
        return out
    finally:
        sim.stop()
        for client, cid in cleanup:  # type: ignore[misc]
            try:
                client.containers.get(cid).remove(force=True)
            finally:
                client.close()
        if bridge is not None:
            bridge.close()
        host_engine.close()


def table(r: dict[str, object]) -> str:
    c = r["concurrency"]
    lines = [f"| path | c=1 p50 ms | c=1 p99 ms | c=1 req/s | c={c} p50 ms | c={c} p99 ms | "
             f"c={c} req/s | errors |", "|---|---|---|---|---|---|---|---|"]
    for name, v in r["paths"].items():  # type: ignore[union-attr]
        lines.append(f"| {name} | {v['c1_p50_ms']} | {v['c1_p99_ms']} | {v['c1_rps']} | "
                     f"{v['cN_p50_ms']} | {v['cN_p99_ms']} | {v['cN_rps']} | {v['errors']} |")
    for name, note in r["notes"].items():  # type: ignore[union-attr]
        lines.append(f"| {name} | {note} | | | | | | |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=2000, help="per path, round and concurrency")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    t0 = time.monotonic()
    result = asyncio.run(run(args))
    result["machine"] = (f"{platform.node()} {os.cpu_count()} CPUs, "
                         f"Python {platform.python_version()}")
    result["wall_s"] = round(time.monotonic() - t0, 1)
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
