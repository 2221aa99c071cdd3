"""Autoscaling end to end (docs/autoscaling.md): real etcd, Docker, agents, schedulers and
sim engines that take seconds to start (``SIM_STARTUP_DELAY_S``), so cold starts are real.

- a model scaled to zero gets a replica on its first request, which waits and succeeds
  (streamed: its first byte is the engine's), and goes back to zero when idle;
- a queue above the target adds replicas; a square-wave load does not make them flap, and
  the scale-down afterwards drains its replicas without failing a request.

The timings printed here are the figures in docs/benchmarks.md ("Autoscaling"); nothing
asserts them.
"""

from __future__ import annotations

import asyncio
import time

import openai
import pytest

from common.records import AuditEntry, parse_audit
from devtools.services import until
from tests.faults.cluster import SchedulerProcess
from tests.test_deployments import DeployFleet
from tests.test_deployments import fleet as fleet  # the same three-node fleet fixture

pytestmark = pytest.mark.docker


STARTUP_S = 3.0


async def autoscale_entries(fleet: DeployFleet, name: str) -> list[AuditEntry]:
    from common.store import EtcdStore

    async with EtcdStore([fleet.etcd]) as store:
        snap = await store.get_prefix(fleet.keys.audit)
    entries = [parse_audit(kv.value) for kv in snap.items]
    return [e for e in entries if e.verb == "autoscale" and e.source == "placer"
            and e.target == name]


async def placed(fleet: DeployFleet, name: str) -> int:
    assigned, _, _ = await fleet.read()
    return sum(1 for a in assigned if a.deployment == name)


def client(sched: SchedulerProcess, timeout: float = 60) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=sched.url + "/v1", api_key="none", max_retries=0,
                              timeout=timeout)


async def test_a_model_scaled_to_zero_starts_on_its_first_request_and_idles_back_to_zero(
        fleet: DeployFleet) -> None:
    fleet.start_agent("a")
    fleet.start_agent("b")
    sched = fleet.start_scheduler()
    await fleet.registered("a", "b")
    await fleet.ctl("deploy", "cold", "--model", "cold-m", "--engine", "sim", "--gpus", "0",
                    "--replicas", "0", "--env", f"SIM_STARTUP_DELAY_S={STARTUP_S}")
    out = await fleet.ctl("autoscale", "cold", "--min", "0", "--max", "2", "--target", "4",
                          "--scale-down-delay", "3", "--idle", "5")
    assert "autoscaled: 0..2 replicas" in out

    async def reported() -> bool:
        status = (await fleet.read())[2].get("cold")
        return status is not None and status.desired == 0
    await until(reported, 30, "the placer reporting the deployment at zero")
    assert await placed(fleet, "cold") == 0 and not fleet.containers("cold")

    # The first request: nothing runs; it is queued, the placer starts a replica, the
    # sim loads for STARTUP_S, and the request is answered, streamed.
    sent = time.monotonic()
    async with client(sched) as c:
        stream = await c.chat.completions.create(
            model="cold-m", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
            stream=True)
        first_token = None
        text = ""
        async for chunk in stream:
            if first_token is None:
                first_token = time.monotonic() - sent
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
    assert text and first_token is not None
    assert first_token >= STARTUP_S  # it really waited for the engine
    print(f"\ncold start: first token {first_token:.2f}s after the first request "
          f"(sim startup_delay_s {STARTUP_S:g})")
    assert await placed(fleet, "cold") == 1
    # A second request finds it warm.
    async with client(sched) as c:
        answer = await c.chat.completions.create(
            model="cold-m", messages=[{"role": "user", "content": "again"}], max_tokens=2)
    assert answer.choices[0].message.content

    # Idle for 5 s: back to zero, the container removed (the GPU-less replica's slot free).
    idle_from = time.monotonic()

    async def at_zero() -> bool:
        status = (await fleet.read())[2].get("cold")
        return (status is not None and status.desired == 0
                and await placed(fleet, "cold") == 0)
    await until(at_zero, 60, "scaled back to zero when idle")
    await until(lambda: not fleet.containers("cold"), 30, "the idle replica's container gone")
    print(f"scale to zero: {time.monotonic() - idle_from:.1f}s after the last request "
          "(idle 5s)")
    entries = await autoscale_entries(fleet, "cold")
    assert [(e.old, e.new) for e in entries] == [("0", "1"), ("1", "0")], entries
    assert "waiting with no replica" in entries[0].detail
    assert "no request for 5s" in entries[1].detail


async def test_a_queue_adds_replicas_a_square_wave_does_not_flap_and_scale_down_drains(
        fleet: DeployFleet) -> None:
    fleet.start_agent("a")
    fleet.start_agent("b")
    sched = fleet.start_scheduler()
    await fleet.registered("a", "b")
    # One request at a time per engine, 400 ms each: eight clients make a queue.
    await fleet.ctl("deploy", "busy", "--model", "busy-m", "--engine", "sim", "--gpus", "0",
                    "--replicas", "1", "--env", "SIM_MAX_CONCURRENCY=1",
                    "--env", "SIM_LATENCY_MS=400", "--env", "SIM_CHUNKS=2",
                    "--env", f"SIM_STARTUP_DELAY_S={STARTUP_S}")
    await fleet.ctl("autoscale", "busy", "--min", "1", "--max", "3", "--target", "2",
                    "--scale-down-delay", "10", "--idle", "600")
    await fleet.ready("busy", 1)

    outcomes: list[str] = []
    high = asyncio.Event()
    stop = asyncio.Event()

    async def worker() -> None:
        async with client(sched, timeout=120) as c:
            while not stop.is_set():
                if not high.is_set():
                    await asyncio.sleep(0.05)
                    continue
                try:
                    await c.chat.completions.create(
                        model="busy-m", messages=[{"role": "user", "content": "x"}],
                        max_tokens=2)
                    outcomes.append("ok")
                except openai.APIError as err:
                    outcomes.append(f"{type(err).__name__}: {err}")

    workers = [asyncio.create_task(worker(), name=f"load-{i}") for i in range(8)]
    try:
        high.set()
        loaded = time.monotonic()

        async def scaled_up() -> bool:
            status = (await fleet.read())[2].get("busy")
            return status is not None and status.desired == 3
        await until(scaled_up, 30, "the queue above the target scaling to 3")
        decided = time.monotonic() - loaded
        await fleet.ready("busy", 3, within=60)
        print(f"\nqueue above target: scale-up decided {decided:.1f}s after the load began, "
              f"3 replicas ready after {time.monotonic() - loaded:.1f}s "
              f"(sim startup_delay_s {STARTUP_S:g})")

        # Square wave: 4 s of load, 4 s of none, for 40 s. A low phase is shorter than
        # scale_down_delay (10 s), so no scale-down happens inside the wave.
        before = len(await autoscale_entries(fleet, "busy"))
        wave_end = time.monotonic() + 40
        while time.monotonic() < wave_end:
            high.clear()
            await asyncio.sleep(4)
            high.set()
            await asyncio.sleep(4)
        during = (await autoscale_entries(fleet, "busy"))[before:]
        assert during == [], [(e.old, e.new, e.detail) for e in during]
        high.clear()
        quiet = time.monotonic()

        # Quiet now: after scale_down_delay the count drops to min 1; the two replicas
        # scaled away drain (nothing new is routed to them) and are then removed.
        async def scaled_down() -> bool:
            status = (await fleet.read())[2].get("busy")
            return (status is not None and status.desired == 1
                    and await placed(fleet, "busy") == 1)
        await until(scaled_down, 60, "scaled down to one replica, drained and removed")
        print(f"scale down: {time.monotonic() - quiet:.1f}s after the load stopped "
              "(scale_down_delay 10s)")
    finally:
        stop.set()
        high.set()
        await asyncio.gather(*workers)
    failures = [o for o in outcomes if o != "ok"]
    assert not failures, f"{len(failures)} of {len(outcomes)} failed: {failures[:3]}"
    assert len(outcomes) > 50
    entries = await autoscale_entries(fleet, "busy")
    moves = [(int(e.old or 0), int(e.new or 0)) for e in entries]
    # Up once to 3; then only down, to 1. Down may take one step or two: the window it
    # judges on may still hold the wave's last in-flight requests when the delay has passed.
    assert moves[0] == (1, 3), [(e.old, e.new, e.detail) for e in entries]
    assert all(new < old for old, new in moves[1:]) and moves[-1][1] == 1, \
        [(e.old, e.new, e.detail) for e in entries]
    # The scale-down went through "draining" in the audit trail of placements.
    from common.store import EtcdStore

    async with EtcdStore([fleet.etcd]) as store:
        snap = await store.get_prefix(fleet.keys.audit)
    details = [parse_audit(kv.value).detail for kv in snap.items]
    assert any("draining" in d for d in details) and any("drained" in d for d in details)
    # Still serving on the one left.
    async with client(sched) as c:
        answer = await c.chat.completions.create(
            model="busy-m", messages=[{"role": "user", "content": "x"}], max_tokens=2)
    assert answer.choices[0].message.content
