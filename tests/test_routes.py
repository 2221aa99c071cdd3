"""Routes (docs/routes.md): the pure choice, token counting, and end to end with real etcd,
two in-process scheduler replicas, sim backends as processes and aivmmctl."""

from __future__ import annotations

import asyncio
import collections
import random
import time
from collections.abc import AsyncIterator, Iterator

import aiohttp
import orjson
import pytest

from common.keys import Keys
from common.records import (
    BackendFigures,
    BackendRecord,
    GpuRecord,
    GuardTrip,
    NodeRecord,
    RouteGuard,
    RouteRecord,
    RouteStats,
    RouteTarget,
    TargetFigures,
    dump,
    parse_route,
)
from common.routeview import backend_costs, route_views
from common.store import EtcdStore
from devtools.schedharness import Scheduler, metric_value
from devtools.services import EtcdServer, until
from devtools.simproc import SimProcess
from scheduler.app import ROUTES
from scheduler.routes import p95, pick
from scheduler.tap import Tap
from tests.test_ctl import ctl

pytestmark = pytest.mark.timeout(180)


def route(*targets: tuple[str, int], fallback: list[str] | None = None,
          tripped: list[str] | None = None) -> RouteRecord:
    return RouteRecord("r", [RouteTarget(t, w) for t, w in targets], fallback=fallback or [],
                       tripped=[GuardTrip(t, 0.0, "x", "why") for t in tripped or []])


# -- pure ---------------------------------------------------------------------------------------

def test_pick_splits_by_weight_among_ready_targets() -> None:
    rng = random.Random(7)
    r = route(("a", 90), ("b", 10), ("c", 0))
    got = collections.Counter(pick(r, lambda t: True, rng) for _ in range(100_000))
    assert set(got) == {("a", False), ("b", False)}  # weight 0 is never drawn
    assert abs(got[("a", False)] / 100_000 - 0.9) < 0.005
    # A target without a ready backend gives its share to the others, by weight.
    r = route(("a", 60), ("b", 30), ("c", 10))
    got = collections.Counter(pick(r, lambda t: t != "a", rng)[0]  # type: ignore[index]
                              for _ in range(40_000))
    assert set(got) == {"b", "c"} and abs(got["b"] / 40_000 - 0.75) < 0.01


def test_pick_falls_back_in_order_and_skips_tripped_targets() -> None:
    rng = random.Random(1)
    r = route(("a", 1), ("b", 1), fallback=["x", "y"], tripped=["b"])
    assert pick(r, lambda t: t == "a" or t == "b", rng) == ("a", False)
    assert pick(r, lambda t: t in ("b", "y"), rng) == ("y", True)  # b tripped, x not ready
    assert pick(r, lambda t: t in ("x", "y"), rng) == ("x", True)
    # Nothing ready anywhere: the weighted draw over live targets (the request queues).
    assert pick(r, lambda t: False, rng) == ("a", False)
    # Everything tripped and no fallback: nothing to send to.
    assert pick(route(("a", 1), tripped=["a"]), lambda t: True, rng) is None


def test_p95_and_tap_token_counting() -> None:
    assert p95([]) is None and p95([1.0]) == 1.0
    assert p95([float(i) for i in range(1, 101)]) == 95.0
    plain = Tap(0.0)
    plain.first_byte(0.1, "n/a")
    plain.chunk(b'{"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 12}}')
    assert plain.output_tokens() == 12
    stream = Tap(0.0)
    for piece in (b'data: {"delta": {"role": "assistant", "content": "a"}}\n\n',
                  b'data: {"c": "b"}\n\ndata: {"c": "c"}\n\n', b'data: {"finish": "stop"}\n\n',
                  b"data: [DONE]\n\n"):
        stream.chunk(piece)
    assert stream.output_tokens() == 3  # four events less the closing one
    stream.chunk(b'data: {"choices": [], "usage": {"completion_tokens": 9}}\n\n')
    assert stream.output_tokens() == 9  # usage wins over the estimate


def test_route_views_sum_replicas_and_costs() -> None:
    r = route(("a", 90), ("b", 10), fallback=["c"], tripped=["b"])
    stats = [RouteStats("s1", 0, 0, targets=[
        TargetFigures("r", "a", requests=90, errors=9, ttft_sum_s=9.0, ttft_count=90,
                      p95_ttft_ms=150, output_tokens=900, generation_s=9.0)]),
             RouteStats("s2", 0, 0, targets=[
                 TargetFigures("r", "a", requests=10, ttft_sum_s=1.0, ttft_count=10,
                               p95_ttft_ms=200, output_tokens=100, generation_s=1.0),
                 TargetFigures("r", "c", requests=100, fallbacks=100)],
                 backends=[BackendFigures("n1/x", 36_000, 3600.0)])]
    (view,) = route_views([r], stats)
    a, b, c = view["targets"]
    assert (a["requests"], a["errors"], a["ttft_ms"], a["p95_ttft_ms"], a["tokens_per_s"]) == \
        (100, 9, 100.0, 200, 100.0)
    assert (a["split_pct"], b["split_pct"], b["effective_weight"]) == (100.0, 0.0, 0)
    assert b["tripped"]["target"] == "b" and c["fallback_rank"] == 1
    assert a["served_pct"] == 50.0 and c["served_pct"] == 50.0
    node = NodeRecord("n1", "v", 0, 0, cost_per_hour=4.0, gpus=[
        GpuRecord(i, "nvidia", "H200", f"u{i}", f"0:{i}") for i in range(2)])
    backends = [BackendRecord("n1", "x", ["m"], "http://x", "ready", "sim", gpus=["u0", "u1"]),
                BackendRecord("n1", "y", ["m"], "http://y", "ready", "sim", gpus=[])]
    costs = {c["backend"]: c for c in backend_costs([node], backends, stats)}
    # x holds 2 of the 3 weights: 2/3 of 4.0 per hour, 10 tokens/s -> 36,000 tokens an hour.
    assert costs["n1/x"]["cost_per_hour"] == pytest.approx(8 / 3, abs=1e-3)
    assert costs["n1/x"]["cost_per_mtok"] == pytest.approx(8 / 3 / 0.036, rel=1e-3)
    assert costs["n1/y"]["cost_per_mtok"] is None  # served nothing


# -- end to end ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sims() -> Iterator[dict[str, SimProcess]]:
    """Two replicas of one model in two deployments (the A/B), a fallback, a spare."""
    started = {name: SimProcess(["llama"], name=name, latency_ms=0, tokens_per_second=0,
                                chunks=2)
               for name in ("arc", "h200", "cpu")}
    try:
        for sim in started.values():
            sim.start()
        yield started
    finally:
        for sim in started.values():
            sim.stop()


async def publish(store: EtcdStore, prefix: str, sim: SimProcess, deployment: str,
                  state: str = "ready") -> None:
    record = BackendRecord(node="n1", name=sim.name, models=list(sim.models), url=sim.url,
                           state=state, engine="sim", probe_latency_ms=1.0,  # type: ignore[arg-type]
                           updated_at=time.time(), deployment=deployment)
    await store.put(Keys(prefix).backend("n1", sim.name), dump(record))


@pytest.fixture
async def pair(etcd_server: EtcdServer, prefix: str, writer: EtcdStore,
               sims: dict[str, SimProcess]) -> AsyncIterator[tuple[Scheduler, Scheduler]]:
    for sim in sims.values():
        sim.set(fail_mode="none")
        await publish(writer, prefix, sim, f"llama-{sim.name}")
    async with Scheduler(etcd_server.url, prefix, queue_timeout=0.5, placer=False) as s1, \
            Scheduler(etcd_server.url, prefix, queue_timeout=0.5, placer=False) as s2:
        for s in (s1, s2):
            s.app[ROUTES].publish_every = 0.2
        await s1.wait_models("llama")
        await s2.wait_models("llama")
        yield s1, s2


async def route_cmd(etcd: str, prefix: str, *args: str) -> str:
    done = await ctl(etcd, prefix, *args)
    assert done.returncode == 0, done.stderr
    return done.stdout


async def wait_route(scheds: tuple[Scheduler, ...], name: str) -> None:
    for s in scheds:
        await s.wait_models(name)


async def fire(session: aiohttp.ClientSession, scheds: tuple[Scheduler, ...], model: str,
               n: int, concurrency: int = 48) -> collections.Counter[tuple[int, str]]:
    """``n`` chat completions, alternating over ``scheds``; (status, route header) counts."""
    tally: collections.Counter[tuple[int, str]] = collections.Counter()
    body = orjson.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}],
                         "max_tokens": 2})
    queue = iter(range(n))

    async def worker() -> None:
        for i in queue:
            url = scheds[i % len(scheds)].url + "/v1/chat/completions"
            async with session.post(url, data=body,
                                    headers={"Content-Type": "application/json"}) as r:
                await r.read()
                tally[(r.status, r.headers.get("x-aivmm-route", ""))] += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return tally


async def test_split_holds_over_10000_requests_on_two_replicas(
        etcd_server: EtcdServer, prefix: str, pair: tuple[Scheduler, Scheduler]) -> None:
    out = await route_cmd(etcd_server.url, prefix, "route", "chat", "--to", "llama-arc=90",
                          "--to", "llama-h200=10", "--fallback", "llama-cpu")
    assert "route chat created: llama-arc 90%, llama-h200 10%; fallback llama-cpu" in out
    await wait_route(pair, "chat")
    started = time.monotonic()
    async with aiohttp.ClientSession() as session:
        tally = await fire(session, pair, "chat", 10_000)
    took = time.monotonic() - started
    assert sum(tally.values()) == 10_000
    arc, h200 = tally[(200, "chat/llama-arc")], tally[(200, "chat/llama-h200")]
    assert arc + h200 == 10_000, tally
    assert abs(arc / 100 - 90) <= 2 and abs(h200 / 100 - 10) <= 2, (arc, h200, took)
    # Each replica split on its own, per request: both hold the split, not only the sum.
    for s in pair:
        text = await s.metrics()
        mine_arc = metric_value(text, "aivmm_route_requests_total", route="chat",
                                target="llama-arc")
        mine_h200 = metric_value(text, "aivmm_route_requests_total", route="chat",
                                 target="llama-h200")
        assert mine_arc + mine_h200 == 5000
        assert abs(mine_arc / 50 - 90) <= 3
        assert metric_value(text, "aivmm_route_output_tokens_total", route="chat") > 0
    # aivmmctl sums what both replicas publish.

    async def summed() -> dict | None:
        view = orjson.loads(await route_cmd(etcd_server.url, prefix, "routes", "--json"))
        (chat,) = view["routes"]
        done = sum(t["requests"] for t in chat["targets"]) == 10_000
        return chat if done and chat["replicas"] == 2 else None
    chat = await until(summed, 10, "both replicas' figures in etcd")
    figures = {t["target"]: t for t in chat["targets"]}
    assert figures["llama-arc"]["requests"] == arc
    assert figures["llama-arc"]["output_tokens"] == 2 * arc  # from the answers' usage
    assert figures["llama-arc"]["ttft_ms"] is not None
    assert figures["llama-arc"]["split_pct"] == 90.0
    # The status page shows the split and the figures side by side, as aivmmctl does.
    async with aiohttp.ClientSession() as session, session.get(
            pair[0].url + "/v1/cluster") as r:
        page = await r.json()
    (shown,) = page["routes"]
    assert {t["target"]: t["requests"] for t in shown["targets"]}["llama-arc"] == arc
    status = await route_cmd(etcd_server.url, prefix, "status")
    assert "ROUTES (1)" in status and "llama-h200" in status
    print(f"10,000 requests over two replicas in {took:.1f}s: arc {arc}, h200 {h200}")


async def test_fallback_when_no_target_has_a_ready_backend(
        etcd_server: EtcdServer, prefix: str, writer: EtcdStore,
        pair: tuple[Scheduler, Scheduler], sims: dict[str, SimProcess]) -> None:
    await route_cmd(etcd_server.url, prefix, "route", "chat", "--to", "llama-arc=50",
                    "--to", "llama-h200=50", "--fallback", "llama-cpu")
    await wait_route(pair, "chat")
    await publish(writer, prefix, sims["arc"], "llama-arc", state="starting")

    async def only_h200() -> bool:
        async with aiohttp.ClientSession() as session:
            t = await fire(session, pair, "chat", 20, concurrency=4)
        return t == {(200, "chat/llama-h200"): 20}
    await until(only_h200, 10, "arc out of the split")
    await publish(writer, prefix, sims["h200"], "llama-h200", state="unhealthy")

    async def fallback() -> bool:
        async with aiohttp.ClientSession() as session:
            t = await fire(session, pair, "chat", 20, concurrency=4)
        return t == {(200, "chat/llama-cpu"): 20}
    await until(fallback, 10, "the fallback to take every request")
    text = await pair[0].metrics()
    assert metric_value(text, "aivmm_route_fallbacks_total", route="chat",
                        target="llama-cpu") >= 10
    # The client asked for the route; the upstream got the target's model, and the answer
    # says which model served it.
    async with aiohttp.ClientSession() as session, session.post(
            pair[0].url + "/v1/chat/completions",
            json={"model": "chat", "messages": [{"role": "user", "content": "x"}]}) as r:
        assert r.status == 200 and (await r.json())["model"] == "llama"
    assert "chat" in await pair[0].models()


async def test_guard_zeroes_a_failing_target_until_restored(
        etcd_server: EtcdServer, prefix: str, pair: tuple[Scheduler, Scheduler],
        sims: dict[str, SimProcess]) -> None:
    sims["h200"].set(fail_mode="status", fail_status=500, fail_rate=1.0)
    await route_cmd(etcd_server.url, prefix, "route", "chat", "--to", "llama-arc=50",
                    "--to", "llama-h200=50", "--guard-error-rate", "0.2",
                    "--guard-window", "30", "--guard-min-requests", "4")
    await wait_route(pair, "chat")
    async with aiohttp.ClientSession() as session:
        first = await fire(session, pair, "chat", 200, concurrency=4)
    assert first[(500, "chat/llama-h200")] >= 4  # the failures the guard judged

    keys = Keys(prefix)

    async def tripped() -> RouteRecord | None:
        async with EtcdStore([etcd_server.url]) as store:
            r = parse_route(await store.get(keys.route("chat")) or b"")
        return r if r.tripped else None
    record = await until(tripped, 10, "the trip in the route record")
    (trip,) = record.tripped
    assert trip.target == "llama-h200" and trip.errors >= 4 and trip.requests >= 4
    assert "error rate" in trip.reason and trip.by
    # Both replicas send nothing more to it, once each has the trip (the other one from the
    # record's watch).

    async def both_tripped() -> bool:
        return all(any(t.target == "llama-h200"
                       for t in s.app[ROUTES].table.routes["chat"].tripped) for s in pair)
    await until(both_tripped, 10, "the trip on both replicas")
    async with aiohttp.ClientSession() as session:
        after = await fire(session, pair, "chat", 100, concurrency=4)
    assert after == {(200, "chat/llama-arc"): 100}
    view = orjson.loads(await route_cmd(etcd_server.url, prefix, "routes", "--json"))
    h200 = next(t for t in view["routes"][0]["targets"] if t["target"] == "llama-h200")
    assert h200["effective_weight"] == 0 and h200["tripped"]["reason"] == trip.reason
    text = await route_cmd(etcd_server.url, prefix, "routes")
    assert "TRIPPED error rate" in text
    trail = orjson.loads(await route_cmd(etcd_server.url, prefix, "audit", "--target", "chat",
                                         "--json"))
    trips = [e for e in trail["entries"] if e["verb"] == "trip"]
    assert len(trips) == 1 and trips[0]["source"] == "scheduler"
    assert "llama-h200 weight -> 0" in trips[0]["detail"]

    # The operator fixes it and restores the target: it takes its share again.
    sims["h200"].set(fail_mode="none")
    out = await route_cmd(etcd_server.url, prefix, "route", "chat", "--restore", "llama-h200")
    assert "restored" in out

    async def both() -> bool:
        async with aiohttp.ClientSession() as session:
            t = await fire(session, pair, "chat", 60, concurrency=4)
        return t[(200, "chat/llama-h200")] > 0 and sum(t.values()) == t[(200, "chat/llama-h200")] \
            + t[(200, "chat/llama-arc")]
    await until(both, 10, "the restored target to take requests")
    async with EtcdStore([etcd_server.url]) as store:
        assert not parse_route(await store.get(keys.route("chat")) or b"").tripped
    out = await route_cmd(etcd_server.url, prefix, "unroute", "chat")
    assert "deleted" in out


async def test_route_flags_are_checked(etcd_server: EtcdServer, prefix: str) -> None:
    for args, message in (
            (["route", "r"], "--to"),
            (["route", "r", "--to", "a=x"], "TARGET=WEIGHT"),
            (["route", "r", "--to", "a=0"], "more than 0"),
            (["route", "r", "--to", "a=1", "--to", "a=2"], "distinct"),
            (["route", "r", "--to", "a=1", "--guard-error-rate", "2"], "0 to 1"),
            (["route", "r", "--restore", "a"], "no route r"),
            (["unroute", "r"], "no route r")):
        done = await ctl(etcd_server.url, prefix, *args)
        assert done.returncode == 2 and message in done.stderr, (args, done.stderr)
    assert RouteGuard().window_s == 60.0


# -- cost ----------------------------------------------------------------------------------------

def test_cost_policy_prefers_the_cheapest_nodes_that_fit_and_spreads_among_equals() -> None:
    from common.records import DeploymentRecord
    from scheduler.placer.placement import place as place_replicas

    def node(name: str, cost: float | None, gpus: int) -> NodeRecord:
        return NodeRecord(name, "v", 0, 0, cost_per_hour=cost, gpus=[
            GpuRecord(i, "nvidia", "H200", f"{name}-{i}", f"0:{i}") for i in range(gpus)])

    nodes = [node("dear", 9.0, 4), node("cheap-a", 1.0, 1), node("cheap-b", 1.0, 1),
             node("unknown", None, 4)]
    d = DeploymentRecord("d", "m", engine="vllm", replicas=5, placement="cost")
    result = place_replicas([d], nodes, [], reserved={}, now=0.0)
    where = collections.Counter(a.node for a in result.assignments)
    # Both cheap nodes first (one each: spread among equals), then the dear one; a node whose
    # cost is unknown comes last.
    assert where == {"cheap-a": 1, "cheap-b": 1, "dear": 3}
    d.replicas = 8
    where = collections.Counter(a.node for a in place_replicas(
        [d], nodes, [], reserved={}, now=0.0).assignments)
    assert where == {"cheap-a": 1, "cheap-b": 1, "dear": 4, "unknown": 2}


def test_agent_config_takes_cost_per_hour(tmp_path: object) -> None:
    from agent.config import AgentConfig

    assert AgentConfig(cost_per_hour=2.5).cost_per_hour == 2.5
    assert AgentConfig().cost_per_hour is None
