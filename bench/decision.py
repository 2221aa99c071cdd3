"""Decision cost: ``Router.choose`` in-process, the way the proxy calls it per request.

A table of ``--models`` x ``--per-model`` backends (16,000 by default, every backend with
time-to-first-byte, decode and floor samples, random in-flight and waiting counts), then
``--decisions`` choices per case:

- a large pool (power of d choices), no hint;
- a large pool with a chat request's hint (its prefix key: the ring walk and up to two more
  costs), the hint taken from the body already parsed once on admission (``hint_of``), as the
  proxy does, and counted in the decision;
- the same, counting the parse of the body as well (what every request pays once anyway);
- a small pool (6 backends, weighed in full) with the hint.

    .venv/bin/python -m bench.decision [--models 50] [--per-model 320] [--decisions 200000]

Prints a Markdown table of p50 and p99 in µs. Nothing here is asserted.
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable

import orjson

from common.records import BackendLoad, BackendRecord
from devtools.stats import percentile
from scheduler.routing import Router
from scheduler.score import hint_of


def table_of(models: int, per_model: int, rng: random.Random) -> Router:
    router = Router(random.Random(1))
    now = time.monotonic()
    for m in range(models):
        for i in range(per_model):
            rec = BackendRecord(node=f"node{i}", name=f"m{m}-b{i}", models=[f"model-{m}"],
                                url=f"http://10.0.{i // 250}.{i % 250 + 1}:{8000 + m}",
                                state="ready", engine="vllm", probe_latency_ms=20.0,
                                load=BackendLoad(running=rng.randint(0, 30),
                                                 waiting=rng.choice((0, 0, 0, 1, 4)),
                                                 kv_cache_usage=rng.random()))
            b = router.upsert(f"{rec.node}/{rec.name}", rec)
            for _ in range(3):
                b.observe(rng.uniform(0.02, 0.5), now, size=rng.randint(500, 20_000))
            b.observe_decode(rng.uniform(0.005, 0.05), now)
            b.inflight = rng.randint(0, 8)
            b.pending = rng.randint(0, b.inflight)
    return router


def timed(n: int, call: Callable[[int], object]) -> tuple[float, float]:
    clock = time.perf_counter_ns
    times: list[float] = []
    for i in range(n):
        t = clock()
        call(i)
        times.append(clock() - t)
    return percentile(times, 50) / 1000, percentile(times, 99) / 1000


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", type=int, default=50)
    p.add_argument("--per-model", type=int, default=320)
    p.add_argument("--decisions", type=int, default=200_000)
    args = p.parse_args()
    rng = random.Random(7)
    router = table_of(args.models, args.per_model, rng)
    small = table_of(1, 6, rng)
    system = "You are a careful assistant for the fleet team. " * 50  # ~2.5 kB
    bodies = [orjson.dumps({"model": f"model-{i % args.models}", "stream": True,
                            "max_tokens": 128,
                            "messages": [{"role": "system", "content": system},
                                         {"role": "user", "content": f"question {i}"}]})
              for i in range(1000)]
    parsed = [orjson.loads(b) for b in bodies]
    now = time.monotonic()
    m = args.models

    def plain(i: int) -> object:
        return router.choose(f"model-{i % m}", now)

    def hinted(i: int) -> object:
        j = i % 1000
        return router.choose(f"model-{i % m}", now, hint=hint_of(parsed[j], len(bodies[j])))

    def with_parse(i: int) -> object:
        j = i % 1000
        data = orjson.loads(bodies[j])
        return router.choose(f"model-{i % m}", now, hint=hint_of(data, len(bodies[j])))

    def small_pool(i: int) -> object:
        j = i % 1000
        return small.choose("model-0", now, hint=hint_of(parsed[j], len(bodies[j])))

    print(f"{len(router.backends):,} backends ({m} models x {args.per_model}); "
          f"{args.decisions:,} decisions per case; body {len(bodies[0]):,} bytes\n")
    print("| case | p50 µs | p99 µs |\n|---|---|---|")
    for name, call in (("large pool, no hint", plain),
                       ("large pool, prefix hint from the parsed body", hinted),
                       ("large pool, hint and the body's parse", with_parse),
                       ("pool of 6 weighed in full, prefix hint", small_pool)):
        p50, p99 = timed(args.decisions, call)
        print(f"| {name} | {p50:.1f} | {p99:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
