"""Failover, ejection, load-awareness and static stability, with real processes dying."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator

import aiohttp
import openai
import pytest

from common.store import EtcdStore
from devtools.schedharness import Scheduler, metric_value, publish
from devtools.services import EtcdServer, until
from devtools.simproc import SimProcess

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def pair() -> Iterator[list[SimProcess]]:
    """Two fresh backends of model "m" that a test may break or kill."""
    sims = [SimProcess(["m"], name="a", latency_ms=2), SimProcess(["m"], name="b", latency_ms=2)]
    try:
        for sim in sims:
            sim.start()
        yield sims
    finally:
        for sim in sims:
            sim.stop()


async def complete(client: openai.AsyncOpenAI, model: str = "m") -> str:
    """One non-streaming completion; returns the backend that answered."""
    raw = await client.completions.with_raw_response.create(model=model, prompt="hi")
    assert raw.parse().choices[0].text
    return raw.headers["x-aivmm-backend"]


async def test_backend_killed_between_requests(etcd_server: EtcdServer, prefix: str,
                                               writer: EtcdStore,
                                               pair: list[SimProcess]) -> None:
    for sim in pair:
        await publish(writer, prefix, sim)
    async with Scheduler(etcd_server.url, prefix) as s:
        await s.wait_models("m")
        client = s.client()
        try:
            assert {await complete(client) for _ in range(20)} == {"n1/a", "n1/b"}
            pair[0].kill()  # its record still says ready: the agent has not noticed yet
            answered = [await complete(client) for _ in range(20)]
        finally:
            await client.close()
        assert set(answered) == {"n1/b"}
        text = await s.metrics()
        # The refused connection ejected it at once: one failover, not one per request.
        assert metric_value(text, "aivmm_scheduler_failovers_total", backend="n1/a") == 1
        assert metric_value(text, "aivmm_scheduler_ejections_total", backend="n1/a") == 1
        assert metric_value(text, "aivmm_scheduler_backends", state="ejected") == 1


async def test_backend_killed_under_concurrent_load(etcd_server: EtcdServer, prefix: str,
                                                    writer: EtcdStore) -> None:
    sims = [SimProcess(["m"], name=n, latency_ms=80, tokens_per_second=0) for n in "abc"]
    try:
        for sim in sims:
            sim.start()
            await publish(writer, prefix, sim)
        async with Scheduler(etcd_server.url, prefix) as s:
            await s.wait_models("m")
            client = s.client()
            gate = asyncio.Semaphore(24)

            async def one() -> str:
                async with gate:
                    return await complete(client)

            try:
                tasks = [asyncio.create_task(one()) for _ in range(150)]
                # Kill while requests are in flight on every backend.
                await until(lambda: sum(t.done() for t in tasks) >= 30, 30, "progress")
                sims[0].kill()
                results = await asyncio.gather(*tasks)  # any failure raises here
            finally:
                await client.close()
            assert len(results) == 150
            assert {"n1/b", "n1/c"} <= set(results)
            text = await s.metrics()
            assert metric_value(text, "aivmm_scheduler_failovers_total", backend="n1/a") >= 1
            assert metric_value(text, "aivmm_scheduler_requests_total", status="200") == 150
    finally:
        for sim in sims:
            sim.stop()


async def test_503_is_retried_elsewhere_and_4xx_passes_through(
        etcd_server: EtcdServer, prefix: str, writer: EtcdStore,
        pair: list[SimProcess]) -> None:
    a, b = pair
    a.set(fail_mode="status", fail_status=503)
    for sim in pair:
        await publish(writer, prefix, sim)
    async with Scheduler(etcd_server.url, prefix) as s:
        await s.wait_models("m")
        client = s.client()
        try:
            assert {await complete(client) for _ in range(10)} == {"n1/b"}
            # A 4xx is the backend's answer to this request, not a failure of the backend.
            b.set(fail_mode="status", fail_status=422)
            failovers_before = metric_value(await s.metrics(), "aivmm_scheduler_failovers_total")
            with pytest.raises(openai.UnprocessableEntityError) as caught:
                await complete(client)
            assert caught.value.response.headers["x-aivmm-backend"] == "n1/b"
            assert metric_value(await s.metrics(),
                                "aivmm_scheduler_failovers_total") == failovers_before
        finally:
            await client.close()


async def test_every_backend_failing_gives_the_last_answer(
        etcd_server: EtcdServer, prefix: str, writer: EtcdStore,
        pair: list[SimProcess]) -> None:
    for sim in pair:
        sim.set(fail_mode="status", fail_status=503)
        await publish(writer, prefix, sim)
    async with Scheduler(etcd_server.url, prefix) as s:
        await s.wait_models("m")
        client = s.client()
        try:
            with pytest.raises(openai.InternalServerError) as caught:
                await complete(client)
            assert caught.value.status_code == 503
        finally:
            await client.close()
        text = await s.metrics()
        assert metric_value(text, "aivmm_scheduler_failovers_total", reason="status_503") == 1


async def test_slow_backend_loses_its_traffic(etcd_server: EtcdServer, prefix: str,
                                              writer: EtcdStore,
                                              pair: list[SimProcess]) -> None:
    for sim in pair:
        await publish(writer, prefix, sim)
    async with Scheduler(etcd_server.url, prefix) as s:
        await s.wait_models("m")
        client = s.client()
        try:
            pair[1].set(latency_ms=250)
            answered: Counter[str] = Counter()
            for _ in range(10):
                answered.update(await asyncio.gather(*(complete(client) for _ in range(3))))
        finally:
            await client.close()
        assert answered["n1/b"] < answered["n1/a"] / 3, answered


async def test_hung_backend_times_out_and_fails_over(etcd_server: EtcdServer, prefix: str,
                                                     writer: EtcdStore,
                                                     pair: list[SimProcess]) -> None:
    pair[0].set(fail_mode="hang")
    for sim in pair:
        await publish(writer, prefix, sim)
    async with Scheduler(etcd_server.url, prefix, first_byte_timeout=0.3) as s:
        await s.wait_models("m")
        client = s.client()
        try:
            assert {await complete(client) for _ in range(6)} == {"n1/b"}
        finally:
            await client.close()
        text = await s.metrics()
        assert metric_value(text, "aivmm_scheduler_failovers_total", reason="timeout") >= 1


async def test_death_mid_body_is_retried_death_mid_stream_ends_with_error_event(
        etcd_server: EtcdServer, prefix: str, writer: EtcdStore,
        pair: list[SimProcess]) -> None:
    a, b = pair
    a.set(fail_mode="die_mid_stream")
    await publish(writer, prefix, a)
    async with Scheduler(etcd_server.url, prefix) as s:
        await s.wait_models("m")
        client = s.client()
        try:
            # Streaming: bytes already reached the client, so no silent retry: an error event.
            stream = await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "x"}], stream=True)
            with pytest.raises(openai.APIError) as caught:
                async for _ in stream:
                    pass
            assert "n1/a" in str(caught.value)
            # Non-streaming: a small body is taken whole first, so another backend answers.
            await publish(writer, prefix, b)
            await until(lambda: _has_two(s), what="second backend")
            a.set(fail_mode="die_mid_stream")
            for _ in range(6):
                await complete(client)
        finally:
            await client.close()
        text = await s.metrics()
        assert metric_value(text, "aivmm_scheduler_broken_streams_total", backend="n1/a") == 1


async def _has_two(s: Scheduler) -> bool:
    return metric_value(await s.metrics(), "aivmm_scheduler_backends") == 2


async def test_stalled_stream_is_cut_with_error_event(etcd_server: EtcdServer, prefix: str,
                                                      writer: EtcdStore) -> None:
    with SimProcess(["m"], name="slow", latency_ms=1, tokens_per_second=0.5) as sim:
        await publish(writer, prefix, sim)
        async with Scheduler(etcd_server.url, prefix, stream_idle_timeout=0.3) as s:
            await s.wait_models("m")
            async with aiohttp.ClientSession() as c, c.post(
                    s.url + "/v1/completions",
                    json={"model": "m", "prompt": "x", "stream": True}) as r:
                body = await r.read()  # ends: the scheduler closed the stream cleanly
            assert b'"error"' in body and b"stalled" in body
            text = await s.metrics()
            assert metric_value(text, "aivmm_scheduler_broken_streams_total") == 1


async def test_request_waits_in_queue_for_a_backend(etcd_server: EtcdServer, prefix: str,
                                                    writer: EtcdStore,
                                                    pair: list[SimProcess]) -> None:
    await publish(writer, prefix, pair[0], state="starting")
    async with Scheduler(etcd_server.url, prefix, queue_timeout=20) as s:
        await until(lambda: _known(s), what="the starting backend")
        client = s.client()
        try:
            waiting = asyncio.create_task(complete(client))
            await until(lambda: _queued(s), what="the request to queue")
            await publish(writer, prefix, pair[0], state="ready")
            assert await waiting == "n1/a"
        finally:
            await client.close()


async def _known(s: Scheduler) -> bool:
    return metric_value(await s.metrics(), "aivmm_scheduler_backends", state="not_ready") == 1


async def _queued(s: Scheduler) -> bool:
    return metric_value(await s.metrics(), "aivmm_scheduler_queued_requests") == 1


async def test_etcd_down_keeps_routing_then_resyncs(etcd_own: EtcdServer, prefix: str,
                                                    pair: list[SimProcess]) -> None:
    async with EtcdStore([etcd_own.url]) as w:
        await publish(w, prefix, pair[0])
    async with Scheduler(etcd_own.url, prefix) as s:
        await s.wait_models("m")
        client = s.client()
        try:
            etcd_own.stop()
            await until(lambda: _etcd_up(s, 0), 30, "the watch to notice etcd is gone")
            async with aiohttp.ClientSession() as c, c.get(s.url + "/readyz") as r:
                ready = await r.json()
            assert ready["etcd"] == "disconnected" and ready["stale"] is True
            # Static stability: the last view keeps serving.
            for _ in range(10):
                assert await complete(client) == "n1/a"
            etcd_own.start()
            async with EtcdStore([etcd_own.url]) as w:
                await publish(w, prefix, pair[1])
            await until(lambda: _etcd_up(s, 1), 30, "the watch to come back")
            await until(lambda: _has_two(s), 30, "the backend added meanwhile")
            assert "n1/b" in {await complete(client) for _ in range(20)}
        finally:
            await client.close()


async def _etcd_up(s: Scheduler, value: int) -> bool:
    return metric_value(await s.metrics(), "aivmm_scheduler_etcd_watch_up") == value


async def test_failover_never_resends_to_the_backend_that_just_failed(
        etcd_server: EtcdServer, prefix: str, writer: EtcdStore) -> None:
    # One backend that resets every connection: the request fails once, after waiting for
    # another backend; it is not sent to the same sick one max_attempts times.
    with SimProcess(["m"], name="a", fail_mode="reset") as sim:
        await publish(writer, prefix, sim)
        async with Scheduler(etcd_server.url, prefix, queue_timeout=0.3) as s:
            await s.wait_models("m")
            client = s.client()
            try:
                with pytest.raises(openai.APIStatusError) as info:
                    await client.completions.create(model="m", prompt="hi")
            finally:
                await client.close()
            assert info.value.status_code == 502
            text = await s.metrics()
            assert metric_value(text, "aivmm_scheduler_failovers_total", backend="n1/a") == 1

