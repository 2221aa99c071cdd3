"""Routing quality on a mixed fleet of engine-model sims: aivmm against the usual balancers.

Six sim engines with device profiles (sim/profiles.py: H200, MI300X, 2 x RX 7900 XTX,
Arc B580, Arc A770; ``--scale`` slows every engine duration down so that two shared cores keep
up) serve one model. The fleet's capacity in requests/s is measured first for each workload
(closed loop, straight to each engine, sessions pinned to one engine each: the best case);
then open-loop Poisson arrivals from ``--seed`` at 50, 80 and 95 % of it go, the same arrival
sequence for each, through: round robin and least-in-flight (minimal aiohttp proxies on
uvloop, ``--serve-proxy``), nginx ``least_conn``, the SGLang router (``round_robin`` and
``cache_aware``), aivmm as it was (``--old-rev``, run from ``git archive``) and aivmm now, in
one interleaved run: per load level and workload, every router's segment in shuffled order,
with the engines' prefix caches reset and idle before each. Workloads, all streamed chat:

- ``independent``: unique prompts of 64..2,048 words (log-uniform), answers of 16..96 tokens;
- ``sessions``: 4-turn conversations sending a shared 1,024-word system prompt and the whole
  history each turn (user turns of 40..120 words, answers of 32..96 tokens, think time
  exponential with mean 1 s x scale).

An etcd holds the backend records for both aivmm schedulers; a loop scrapes each engine's
/metrics every 3 s (the agent's heartbeat) and publishes its load, as the agent would.
Goodput: share of requests with time to first token <= 2 s and time per output token
<= 100 ms; strict goodput: <= 0.5 s and <= 50 ms (an interactive chat turn); all times
``--scale`` (device time). Prints Markdown; nothing is asserted.

    .venv/bin/python -m bench.routing [--scale 1] [--segment 5] [--json out.json]

Needs nginx (``apt-get install nginx-light``) and ``pip install sglang-router``; a router
whose program is missing is left out and said so.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from agent.health.load import parse_load
from common.keys import Keys
from common.records import BackendRecord, dump
from common.store import EtcdStore
from devtools.services import EtcdServer, free_port, wait_until
from devtools.simproc import SimProcess
from devtools.stats import percentile
from sim.profiles import PROFILES

ROOT = Path(__file__).resolve().parent.parent
MODEL = "bench-8b"
FLEET = ["h200", "mi300x", "rx7900xtx", "rx7900xtx", "arc-b580", "arc-a770"]
OLD_REV = "71c0d30^"  # the commit before the new score: aivmm as it was
TTFT_SLO_S = 2.0
TPOT_SLO_S = 0.100
# A second, interactive SLO (a chat turn that feels immediate), reported beside the first.
STRICT_TTFT_SLO_S = 0.5
STRICT_TPOT_SLO_S = 0.050
TURNS = 4
VOCAB = [f"w{i}" for i in range(5000)]


# --- the baseline proxies (a child process each) ------------------------------------------------

def serve_proxy(policy: str, port: int, upstreams: list[str]) -> None:
    """A minimal aiohttp proxy choosing by ``rr`` (round robin) or ``lif`` (least in flight)."""
    import uvloop

    inflight = dict.fromkeys(upstreams, 0)
    turn = [0]
    session_key: web.AppKey[aiohttp.ClientSession] = web.AppKey("s", aiohttp.ClientSession)

    def pick() -> str:
        if policy == "rr":
            turn[0] += 1
            return upstreams[turn[0] % len(upstreams)]
        low = min(inflight.values())
        return random.choice([u for u, n in inflight.items() if n == low])

    async def forward(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        up_url = pick()
        inflight[up_url] += 1
        try:
            async with request.app[session_key].post(
                    up_url + request.path_qs, data=body,
                    headers={"Content-Type": "application/json"}) as up:
                resp = web.StreamResponse(status=up.status)
                resp.content_type = up.content_type
                await resp.prepare(request)
                async for chunk in up.content.iter_any():
                    await resp.write(chunk)
                await resp.write_eof()
                return resp
        finally:
            inflight[up_url] -= 1

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        app[session_key] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        yield
        await app[session_key].close()

    app = web.Application(client_max_size=64 << 20)
    app.cleanup_ctx.append(ctx)
    app.router.add_route("*", "/{tail:.*}", forward)
    uvloop.install()
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


# --- workloads ----------------------------------------------------------------------------------

@dataclass
class Turn:
    user: str
    max_tokens: int


@dataclass
class Job:
    """One arrival: a single request, or a session of turns."""

    at: float
    system: str | None
    turns: list[Turn]
    think: list[float] = field(default_factory=list)


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(VOCAB) for _ in range(n))


def make_jobs(workload: str, rps: float, duration: float, seed: int,
              scale: float) -> list[Job]:
    rng = random.Random(f"{seed}/{workload}")
    system = words(random.Random(seed), 1024)
    jobs: list[Job] = []
    t = 0.0
    rate = rps if workload == "independent" else rps / TURNS
    while True:
        t += rng.expovariate(rate)
        if t >= duration:
            return jobs
        if workload == "independent":
            n = int(math.exp(rng.uniform(math.log(64), math.log(2048))))
            jobs.append(Job(t, None, [Turn(words(rng, n), rng.randint(16, 96))]))
        else:
            turns = [Turn(words(rng, rng.randint(40, 120)), rng.randint(32, 96))
                     for _ in range(TURNS)]
            jobs.append(Job(t, system, turns,
                            [rng.expovariate(1.0 / scale) for _ in range(TURNS)]))


@dataclass
class Sample:
    ttft: float
    e2e: float
    tokens: int
    ok: bool


async def one_request(http: aiohttp.ClientSession, url: str, messages: list[dict[str, str]],
                      max_tokens: int, limit_s: float) -> tuple[Sample, str]:
    body = orjson.dumps({"model": MODEL, "messages": messages, "max_tokens": max_tokens,
                         "stream": True})
    t0 = time.perf_counter()
    ttft = math.inf
    parts: list[str] = []
    try:
        async with asyncio.timeout(limit_s), http.post(
                url + "/v1/chat/completions", data=body,
                headers={"Content-Type": "application/json"}) as resp:
            if resp.status != 200:
                await resp.read()
                return Sample(math.inf, math.inf, 0, False), ""
            async for line in resp.content:
                if not line.startswith(b"data: {"):
                    continue
                choices = orjson.loads(line[6:]).get("choices") or [{}]
                text = (choices[0].get("delta") or {}).get("content")
                if text:
                    if not parts:
                        ttft = time.perf_counter() - t0
                    parts.append(text)
    except (TimeoutError, aiohttp.ClientError, ValueError):
        return Sample(ttft, math.inf, len(parts), False), ""
    return Sample(ttft, time.perf_counter() - t0, len(parts), bool(parts)), "".join(parts)


async def run_job(http: aiohttp.ClientSession, url: str, job: Job, out: list[Sample],
                  limit_s: float) -> None:
    history: list[dict[str, str]] = [{"role": "system", "content": job.system}] \
        if job.system else []
    for i, turn in enumerate(job.turns):
        history.append({"role": "user", "content": turn.user})
        sample, answer = await one_request(http, url, history, turn.max_tokens, limit_s)
        out.append(sample)
        if not sample.ok:
            return
        history.append({"role": "assistant", "content": answer})
        if i < len(job.turns) - 1:
            await asyncio.sleep(job.think[i])


async def drive(url: str, jobs: list[Job], limit_s: float) -> list[Sample]:
    out: list[Sample] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        t0 = time.perf_counter()
        tasks = []
        for job in jobs:
            delay = job.at - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(run_job(http, url, job, out, limit_s)))
        await asyncio.gather(*tasks)
    return out


class _Stamped(list[Sample]):
    """Samples that remember when each one came."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []

    def append(self, sample: Sample) -> None:
        super().append(sample)
        if sample.ok:
            self.times.append(time.perf_counter())


async def capacity(sims: list[SimProcess], workload: str, seconds: float, seed: int,
                   scale: float, warm: float = 4.0) -> float:
    """Completed requests/s of the fleet, each engine driven straight and closed-loop at its
    batch size (sessions without think time), counted over ``seconds`` after ``warm``."""
    t0 = time.perf_counter()
    stop = t0 + warm + seconds
    # The same kind of jobs as the measured runs, the same shared system prompt included
    # (sessions that each had their own system prompt made the fleet look slower than it is).
    jobs = iter(make_jobs(workload, 20.0, 300.0, seed, scale))
    done = _Stamped()

    async def loop(http: aiohttp.ClientSession, sim: SimProcess) -> None:
        while time.perf_counter() < stop:
            job = next(jobs)
            job.think = [0.0] * len(job.turns)
            await run_job(http, sim.url, job, done, max(1.0, stop - time.perf_counter()))

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        loops = []
        for sim in sims:
            batch = min(PROFILES[sim.knobs["profile"]]["max_batch"], 48)
            loops += [loop(http, sim) for _ in range(batch)]
        await asyncio.gather(*loops)
    return sum(1 for t in done.times if t0 + warm <= t <= stop) / seconds


# --- the routers --------------------------------------------------------------------------------

NGINX_CONF = """worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  client_max_body_size 64m;
  upstream fleet {{
    least_conn;
{servers}
    keepalive 256;
  }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://fleet;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_read_timeout 600s;
    }}
  }}
}}
"""


class Routers:
    """Starts every router in front of the fleet; ``urls`` maps name to base URL."""

    def __init__(self, sims: list[SimProcess], etcd: EtcdServer, old_rev: str) -> None:
        self.sims, self.etcd, self.old_rev = sims, etcd, old_rev
        self.procs: list[subprocess.Popen[bytes]] = []
        self.urls: dict[str, str] = {}
        self.missing: list[str] = []
        self.tmp = Path(tempfile.mkdtemp(prefix="aivmm-bench-routing-"))

    def _spawn(self, name: str, argv: list[str], cwd: Path = ROOT,
               env: dict[str, str] | None = None) -> None:
        log = (self.tmp / f"{name}.log").open("ab")
        self.procs.append(subprocess.Popen(argv, cwd=cwd, stdout=log, stderr=log,
                                           env=env or dict(os.environ),
                                           start_new_session=True))

    def start(self) -> None:
        ups = [s.url for s in self.sims]
        for policy, name in (("rr", "round robin"), ("lif", "least in flight")):
            port = free_port()
            self._spawn(policy, [sys.executable, "-m", "bench.routing", "--serve-proxy", policy,
                                 str(port), *ups])
            self.urls[name] = f"http://127.0.0.1:{port}"
        nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists()
                                          else None)
        if nginx:
            port = free_port()
            conf = self.tmp / "nginx.conf"
            conf.write_text(NGINX_CONF.format(dir=self.tmp, port=port, servers="\n".join(
                f"    server {u.removeprefix('http://')};" for u in ups)))
            self._spawn("nginx", [nginx, "-p", str(self.tmp), "-c", str(conf),
                                  "-g", "daemon off;"])
            self.urls["nginx least_conn"] = f"http://127.0.0.1:{port}"
        else:
            self.missing.append("nginx least_conn (no nginx)")
        sgl = shutil.which("sglang-router") or str(Path(sys.executable).parent / "sglang-router")
        if Path(sgl).exists():
            for policy in ("round_robin", "cache_aware"):
                port = free_port()
                self._spawn(f"sglang-{policy}", [sgl, "launch", "--host", "127.0.0.1",
                                                 "--port", str(port), "--policy", policy,
                                                 "--log-level", "warn",
                                                 "--prometheus-port", str(free_port()),
                                                 "--worker-urls", *ups])
                self.urls[f"SGLang {policy}"] = f"http://127.0.0.1:{port}"
        else:
            self.missing.append("SGLang router (pip install sglang-router)")
        old = self.tmp / "old"
        old.mkdir()
        archive = subprocess.run(["git", "archive", self.old_rev, "scheduler", "common"],
                                 cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
        for name, cwd in (("aivmm before", old), ("aivmm now", ROOT)):
            port = free_port()
            env = {**os.environ, "PYTHONPATH": str(cwd)}
            conf = self.tmp / f"{port}.toml"
            conf.write_text(f'etcd = ["{self.etcd.url}"]\nlisten = "127.0.0.1:{port}"\n'
                            'log_level = "warning"\n')
            self._spawn(name.replace(" ", "-"), [sys.executable, "-m", "scheduler.main",
                                                 "--config", str(conf)], cwd=cwd, env=env)
            self.urls[name] = f"http://127.0.0.1:{port}"

    def ready(self) -> None:
        def answers(url: str) -> bool:
            body = json.dumps({"model": MODEL, "max_tokens": 1,
                               "messages": [{"role": "user", "content": "hi"}]}).encode()
            req = urllib.request.Request(url + "/v1/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=5) as resp:
                    return resp.status == 200
            except OSError:
                return False
        for name, url in self.urls.items():
            try:
                wait_until(lambda url=url: answers(url), 60, f"router {name}")
            except TimeoutError:
                log = self.tmp / f"{name.replace(' ', '-')}.log"
                print(f"{name} log:", *(p.read_text()[-2000:] for p in self.tmp.glob("*.log")
                                        if p.name.startswith(log.stem[:6])), file=sys.stderr)
                raise

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(self.tmp, ignore_errors=True)


async def publish_loads(store: EtcdStore, sims: list[SimProcess], scale: float,
                        stop: asyncio.Event) -> None:
    """Write each engine's record, its load refreshed every 3 s, as the agent does."""
    keys = Keys()
    async with aiohttp.ClientSession() as http:
        while not stop.is_set():
            for i, sim in enumerate(sims):
                try:
                    async with http.get(sim.url + "/metrics") as resp:
                        load = parse_load(await resp.text())
                except aiohttp.ClientError:
                    load = None
                probe_ms = PROFILES[sim.knobs["profile"]]["decode_ms"] * scale
                rec = BackendRecord(node=f"node{i}", name=sim.name, models=[MODEL],
                                    url=sim.url, state="ready", engine="sim",
                                    probe_latency_ms=probe_ms, load=load,
                                    updated_at=time.time())
                await store.put(keys.backend(rec.node, rec.name), dump(rec))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 3.0)


async def idle_and_cold(sims: list[SimProcess]) -> None:
    async with aiohttp.ClientSession() as http:
        for _ in range(600):
            busy = 0.0
            for sim in sims:
                async with http.get(sim.url + "/metrics") as resp:
                    load = parse_load(await resp.text())
                busy += (load.running or 0) + (load.waiting or 0) if load else 0
            if not busy:
                break
            await asyncio.sleep(0.1)
        for sim in sims:
            async with http.post(sim.url + "/reset_prefix_cache") as resp:
                await resp.read()


async def served(sims: list[SimProcess]) -> dict[str, int]:
    """Requests each engine has answered so far (its vllm:request_success_total)."""
    out: dict[str, int] = {}
    async with aiohttp.ClientSession() as http:
        for sim in sims:
            async with http.get(sim.url + "/metrics") as resp:
                text = await resp.text()
            out[sim.name] = int(sum(float(line.rpartition(" ")[2]) for line in text.splitlines()
                                    if line.startswith("vllm:request_success_total{")))
    return out


def summarise(samples: list[Sample], scale: float) -> dict[str, float]:
    ttft = [s.ttft for s in samples]
    e2e = [s.e2e for s in samples]
    def good(ttft_s: float, tpot_s: float) -> float:
        n = sum(1 for s in samples if s.ok and s.ttft <= ttft_s * scale
                and (s.e2e - s.ttft) / max(s.tokens - 1, 1) <= tpot_s * scale)
        return 100.0 * n / len(samples) if samples else 0.0

    return {"n": len(samples), "errors": sum(not s.ok for s in samples),
            "ttft_p50": percentile(ttft, 50), "ttft_p99": percentile(ttft, 99),
            "e2e_p50": percentile(e2e, 50), "e2e_p99": percentile(e2e, 99),
            "goodput": good(TTFT_SLO_S, TPOT_SLO_S),
            "goodput_strict": good(STRICT_TTFT_SLO_S, STRICT_TPOT_SLO_S),
            "ttft_miss": sum(1 for s in samples if not s.ttft <= TTFT_SLO_S * scale),
            "tpot_miss": sum(1 for s in samples if s.ok and
                             (s.e2e - s.ttft) / max(s.tokens - 1, 1) > TPOT_SLO_S * scale)}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.perf_counter()
    etcd = EtcdServer()
    sims = [SimProcess(MODEL, name=f"{p}-{i}", profile=p, time_scale=args.scale, chunks=4096)
            for i, p in enumerate(FLEET)]
    routers = Routers(sims, etcd, args.old_rev)
    stop = asyncio.Event()
    results: list[dict[str, Any]] = []
    caps: dict[str, float] = {}
    try:
        etcd.start()
        for sim in sims:
            sim.start()
        async with EtcdStore([etcd.url]) as store:
            loads = asyncio.create_task(publish_loads(store, sims, args.scale, stop))
            routers.start()
            await asyncio.to_thread(routers.ready)
            for workload in args.workloads:
                await idle_and_cold(sims)
                caps[workload] = args.capacity.get(workload) or await capacity(
                    sims, workload, args.capacity_seconds, args.seed, args.scale)
                print(f"capacity {workload}: {caps[workload]:.2f} req/s", file=sys.stderr)
            rng = random.Random(args.seed)
            for level in args.loads:
                for workload in args.workloads:
                    jobs = make_jobs(workload, caps[workload] * level, args.segment, args.seed,
                                     args.scale)
                    order = [r for r in routers.urls
                             if not args.routers or r in args.routers]
                    rng.shuffle(order)
                    for name in order:
                        await idle_and_cold(sims)
                        before = await served(sims)
                        samples = await drive(routers.urls[name], jobs, args.timeout)
                        after = await served(sims)
                        row = {"load": level, "workload": workload, "router": name,
                               **summarise(samples, args.scale),
                               "per_engine": {k: after[k] - before[k] for k in after}}
                        results.append(row)
                        print(json.dumps(row), file=sys.stderr)
            stop.set()
            await loads
    finally:
        stop.set()
        routers.stop()
        for sim in sims:
            sim.stop()
        etcd.close()
    return {"scale": args.scale, "segment_s": args.segment, "seed": args.seed,
            "capacity_rps": caps, "rows": results, "missing": routers.missing,
            "wall_s": round(time.perf_counter() - t_start),
            "machine": f"{platform.node()} {os.cpu_count()} CPUs, "
                       f"Python {platform.python_version()}"}


def table(r: dict[str, Any]) -> str:
    out = ["capacity (req/s): " + ", ".join(f"{k} {v:.2f}"
                                             for k, v in r["capacity_rps"].items()), ""]
    for workload in dict.fromkeys(row["workload"] for row in r["rows"]):
        out += [f"**{workload}**", "",
                "| load | router | n | TTFT p50 ms | TTFT p99 ms | E2E p50 ms | E2E p99 ms "
                "| goodput % | strict goodput % | errors |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for row in r["rows"]:
            if row["workload"] != workload:
                continue
            ms = {k: ("∞" if not math.isfinite(row[k]) else f"{row[k] * 1000:.0f}")
                  for k in ("ttft_p50", "ttft_p99", "e2e_p50", "e2e_p99")}
            out.append(f"| {row['load']:.0%} | {row['router']} | {row['n']} | "
                       f"{ms['ttft_p50']} | {ms['ttft_p99']} | {ms['e2e_p50']} | "
                       f"{ms['e2e_p99']} | {row['goodput']:.1f} | "
                       f"{row.get('goodput_strict', math.nan):.1f} | {row['errors']} |")
        out.append("")
    if r["missing"]:
        out.append("left out: " + "; ".join(r["missing"]))
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--segment", type=float, default=5.0, help="seconds of arrivals per router")
    p.add_argument("--capacity-seconds", type=float, default=8.0)
    p.add_argument("--loads", type=lambda s: [float(x) for x in s.split(",")],
                   default=[0.5, 0.8, 0.95])
    p.add_argument("--workloads", type=lambda s: s.split(","),
                   default=["independent", "sessions"])
    p.add_argument("--timeout", type=float, default=30.0, help="per request")
    p.add_argument("--seed", type=int, default=13)
    p.add_argument("--capacity", type=lambda s: {k: float(v) for k, v in
                                                 (x.split("=") for x in s.split(","))},
                   default={}, help="workload=req/s,... instead of measuring")
    p.add_argument("--routers", type=lambda s: s.split(","), default=[],
                   help="only these (names as in the table)")
    p.add_argument("--old-rev", default=OLD_REV)
    p.add_argument("--json", type=Path)
    p.add_argument("--serve-proxy", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve_proxy:
        policy, port, *ups = args.serve_proxy
        serve_proxy(policy, int(port), ups)
        return 0
    result = asyncio.run(run(args))
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
