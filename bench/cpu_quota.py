"""CPU quota: how close Docker's CFS quota holds a CPU-burning engine to its ``cpus``.

A container of the sim image (the project's own, FROM scratch: no registry) runs a busy loop
in ``--burners`` Python processes, enough to take every core; it is created through the
agent's own spec and Docker adapter with ``cpus = Q``. Its
CPU use is read from its cgroup (Docker's stats: ``cpu_usage.total_usage``) over a window and
reported in cores next to the quota, for each quota asked. Nothing here is asserted.

    .venv/bin/python -m bench.cpu_quota [--quotas 0.5,1.0] [--seconds 5] [--burners 2]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import time
from typing import Any

import docker

from agent.config import BackendConfig
from agent.docker.client import DockerAdapter
from agent.docker.spec import build_spec
from devtools.image import PREFIX, PYVER, build_image
from devtools.services import DockerEngine

# Several interpreters, each spinning: together they would take every core without a quota.
BURN = ("import multiprocessing as m\n"
        "def spin():\n    while True: pass\n"
        "if __name__ == '__main__':\n"
        "    ps = [m.Process(target=spin) for _ in range({n})]\n"
        "    [p.start() for p in ps]; [p.join() for p in ps]\n")


def usage_ns(client: docker.DockerClient, cid: str) -> int:
    stats: dict[str, Any] = client.api.stats(cid, stream=False)
    return int(stats["cpu_stats"]["cpu_usage"]["total_usage"])


async def measure(host: str, image: str, quota: float, seconds: float, burners: int) -> float:
    """Cores the burner used over ``seconds`` under ``cpus = quota``."""
    backend = BackendConfig(name=f"burn-{quota:g}".replace(".", "p"), model="burn",
                            engine="custom", port=1, image=image, cpus=quota)
    spec = build_spec("bench-cpu", backend, [], None, models_dir="/tmp",
                      advertise_host="127.0.0.1")
    # The sim image's entrypoint is the interpreter with "-m sim.main": run the burner instead.
    python = str(PREFIX / "bin" / PYVER)
    spec = dataclasses.replace(spec, entrypoint=[python, "-c", BURN.format(n=burners)],
                               command=[])
    adapter = DockerAdapter(host)
    client = docker.DockerClient(base_url=host, version="auto")
    cid = await adapter.create(spec)
    try:
        await adapter.start(cid)
        await asyncio.sleep(1.0)  # let every burner start
        t0, u0 = time.monotonic(), await asyncio.to_thread(usage_ns, client, cid)
        await asyncio.sleep(seconds)
        t1, u1 = time.monotonic(), await asyncio.to_thread(usage_ns, client, cid)
        return (u1 - u0) / 1e9 / (t1 - t0)
    finally:
        await adapter.remove(cid, stop_timeout=1)
        await adapter.close()
        client.close()


async def run(quotas: list[float], seconds: float, burners: int) -> list[tuple[float, float]]:
    engine = DockerEngine()
    engine.start()
    try:
        image = await asyncio.to_thread(build_image, engine.host, quiet=True)
        return [(q, await measure(engine.host, image, q, seconds, burners)) for q in quotas]
    finally:
        engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu_quota", description=__doc__)
    parser.add_argument("--quotas", default="0.5,1.0")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--burners", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    quotas = [float(q) for q in args.quotas.split(",")]
    rows = asyncio.run(run(quotas, args.seconds, args.burners))
    print(f"{args.burners} busy processes, {args.seconds:g} s window, "
          f"{os.cpu_count()} cores on this machine")
    print("| cpus (quota) | cores used | ratio |")
    print("|---|---|---|")
    for quota, used in rows:
        print(f"| {quota:g} | {used:.3f} | {used / quota:.2f} |")


if __name__ == "__main__":
    main()
