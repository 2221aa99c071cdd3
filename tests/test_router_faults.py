"""Faults that probing found in the router itself, each driven end to end: real etcd, a
scheduler on loopback, sim engines as processes, and a tiny aiohttp backend (or a raw
socket client) where the hostile party is something the sim cannot be."""

from __future__ import annotations

import asyncio
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web

from common.keys import Keys
from common.records import BackendRecord, dump
from common.store import EtcdStore
from devtools.schedharness import Scheduler, metric_value, publish
from devtools.services import EtcdServer, free_port, until
from devtools.simproc import SimProcess
from scheduler.app import ROUTER

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def pair() -> Iterator[list[SimProcess]]:
    """Two fresh backends of model "m" that a test may break."""
    sims = [SimProcess(["m"], name="a", latency_ms=2), SimProcess(["m"], name="b", latency_ms=2)]
    try:
        for sim in sims:
            sim.start()
        yield sims
    finally:
        for sim in sims:
            sim.stop()


# -- a tiny engine for what the sim cannot do ---------------------------------------------------

@dataclass
class Engine:
    """An aiohttp backend on loopback that records what reaches it."""

    port: int
    seen: list[tuple[str, dict[str, str]]] = field(default_factory=list)  # path_qs, headers
    stream_closed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
async def engine() -> AsyncIterator[Engine]:
    eng = Engine(free_port())

    async def chat(request: web.Request) -> web.Response:
        eng.seen.append((request.path_qs, dict(request.headers)))
        body = await request.json()
        resp = web.json_response({
            "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": "hello"}}]})
        # Engines behind a load balancer may set a sticky-session cookie; it is for the
        # client that got this answer.
        resp.set_cookie("route", f"for-{request.headers.get('x-client', 'anyone')}")
        return resp

    async def endless(request: web.Request) -> web.StreamResponse:
        # An SSE stream of large events, as fast as the reader takes them, until the
        # connection is closed: nothing a client could blame on the backend.
        eng.seen.append((request.path_qs, dict(request.headers)))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        event = b'data: {"x": "' + b"y" * 65536 + b'"}\n\n'
        try:
            while True:
                await resp.write(event)
        finally:
            eng.stream_closed.set()

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/completions", endless)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", eng.port).start()
    try:
        yield eng
    finally:
        await runner.cleanup()


async def publish_engine(writer: EtcdStore, prefix: str, engine: Engine) -> None:
    record = BackendRecord(node="n1", name="eng", models=["m"], state="ready", url=engine.url,
                           engine="custom", probe_latency_ms=1.0, updated_at=time.time())
    await writer.put(Keys(prefix).backend("n1", "eng"), dump(record))


async def raw_connection(url: str, rcvbuf: int | None = None
                         ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    return await asyncio.open_connection(sock=sock, limit=4096)


def raw_post(target: str, body: bytes) -> bytes:
    return (f"POST {target} HTTP/1.1\r\nHost: client.example\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode() + body


# -- 1: a 5xx is a failure and no latency sample ------------------------------------------------

async def test_backend_answering_500_at_once_does_not_draw_the_traffic(
        etcd_server: EtcdServer, prefix: str, writer: EtcdStore,
        pair: list[SimProcess]) -> None:
    # Probing: a backend that answers 500 at once took 39 of 40 requests, its 500s counting
    # as successes and as very fast answers.
    bad, _good = pair
    bad.set(fail_mode="status", fail_status=500, latency_ms=0)
    for sim in pair:
        await publish(writer, prefix, sim)
    async with Scheduler(etcd_server.url, prefix) as s:
        await s.wait_models("m")
        client = s.client()
        answered: Counter[str] = Counter()
        try:
            for _ in range(40):
                try:
                    raw = await client.completions.with_raw_response.create(model="m",
                                                                            prompt="hi")
                    answered[raw.headers["x-aivmm-backend"]] += 1
                except openai.InternalServerError as err:
                    assert err.status_code == 500  # passed through as the backend said it
                    answered[err.response.headers["x-aivmm-backend"]] += 1
        finally:
            await client.close()
        text = await s.metrics()
    # Five 500s in a row (eject_failures) set it aside; the rest go to the good one.
    assert answered["n1/a"] <= 5, answered
    assert answered["n1/b"] >= 35, answered
    assert metric_value(text, "aivmm_scheduler_ejections_total", backend="n1/a") >= 1
    # No latency credit for a 500: no time-to-first-byte sample from it at all.
    assert metric_value(text, "aivmm_scheduler_time_to_first_byte_seconds_count",
                        backend="n1/a") == 0
    assert metric_value(text, "aivmm_scheduler_requests_total", backend="n1/a",
                        status="500") == answered["n1/a"]


# -- 3: a client that stops reading is the client's doing ----------------------------------------

async def test_client_that_stops_reading_is_not_blamed_on_the_backend(
        etcd_server: EtcdServer, prefix: str, writer: EtcdStore, engine: Engine) -> None:
    await publish_engine(writer, prefix, engine)
    # eject_failures=1: were the client's stall counted against the backend, it would be
    # ejected at once. stream_idle_timeout is short too, so a write stuck behind the client
    # is not mistaken for the backend's silence either.
    async with Scheduler(etcd_server.url, prefix, client_write_timeout=0.5,
                         stream_idle_timeout=1.0, eject_failures=1) as s:
        await s.wait_models("m")
        reader, writer_ = await raw_connection(s.url, rcvbuf=4096)
        try:
            writer_.write(raw_post("/v1/completions",
                                   b'{"model": "m", "prompt": "x", "stream": true}'))
            assert (await reader.readline()).startswith(b"HTTP/1.1 200")
            # ...and reads nothing more: its buffers, then the scheduler's, fill up.

            async def aborted() -> bool:
                return metric_value(await s.metrics(), "aivmm_scheduler_client_aborts_total",
                                    reason="write_timeout") == 1
            await until(aborted, 15, "the write to the client to time out")
            # The upstream stream is closed at once, not held for the slow client.
            await until(engine.stream_closed.is_set, 5, "the upstream stream to close")
        finally:
            writer_.close()
        text = await s.metrics()
        assert metric_value(text, "aivmm_scheduler_broken_streams_total") == 0
        assert metric_value(text, "aivmm_scheduler_ejections_total") == 0
        assert metric_value(text, "aivmm_scheduler_failovers_total") == 0
        assert metric_value(text, "aivmm_scheduler_requests_total", backend="n1/eng",
                            status="499") == 1
        assert metric_value(text, "aivmm_scheduler_backends", state="ready") == 1


# -- 4: hop-by-hop Expect, absolute-form targets ------------------------------------------------

async def test_expect_continue_is_not_forwarded(etcd_server: EtcdServer, prefix: str,
                                                writer: EtcdStore, engine: Engine) -> None:
    await publish_engine(writer, prefix, engine)
    async with Scheduler(etcd_server.url, prefix) as s:
        await s.wait_models("m")
        async with aiohttp.ClientSession() as c, c.post(
                s.url + "/v1/chat/completions", expect100=True,
                json={"model": "m", "messages": [{"role": "user", "content": "hi"}]}) as r:
            assert r.status == 200
            assert (await r.json())["choices"][0]["message"]["content"] == "hello"
    [(path, headers)] = engine.seen
    assert path == "/v1/chat/completions"
    assert "expect" not in {k.lower() for k in headers}


async def test_a_backends_cookie_is_not_replayed_to_it_for_other_clients(
        etcd_server: EtcdServer, prefix: str, writer: EtcdStore, engine: Engine) -> None:
    # The proxy's one upstream session must not keep what a backend set for one client and
    # send it along with everyone else's requests. By host name: aiohttp's cookie jar keeps
    # no cookie of a bare IP address, but a fleet's backends have names.
    record = BackendRecord(node="n1", name="eng", models=["m"], state="ready",
                           url=f"http://localhost:{engine.port}", engine="custom",
                           probe_latency_ms=1.0, updated_at=time.time())
    await writer.put(Keys(prefix).backend("n1", "eng"), dump(record))
    async with Scheduler(etcd_server.url, prefix) as s:
        await s.wait_models("m")
        for client in ("alice", "bob"):
            async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as c, \
                    c.post(s.url + "/v1/chat/completions", headers={"x-client": client},
                           json={"model": "m", "messages": [{"role": "user", "content": "hi"}]}
                           ) as r:
                assert r.status == 200
                assert r.headers["Set-Cookie"].startswith(f"route=for-{client}")
    assert len(engine.seen) == 2
    assert all("cookie" not in {k.lower() for k in headers} for _, headers in engine.seen)


async def test_absolute_form_target_goes_to_the_right_path(
        etcd_server: EtcdServer, prefix: str, writer: EtcdStore, engine: Engine) -> None:
    await publish_engine(writer, prefix, engine)
    async with Scheduler(etcd_server.url, prefix) as s:
        await s.wait_models("m")
        body = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'
        reader, writer_ = await raw_connection(s.url)
        try:
            writer_.write(raw_post(f"{s.url}/v1/chat/completions?api-version=1", body))
            answer = await asyncio.wait_for(reader.read(), 30)  # Connection: close
        finally:
            writer_.close()
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), answer[:300]
    assert orjson.loads(payload)["choices"][0]["message"]["content"] == "hello"
    assert [path for path, _ in engine.seen] == ["/v1/chat/completions?api-version=1"]


# -- 5: a backend that leaves takes its metric series with it -----------------------------------

async def test_removed_backend_series_leave_metrics(etcd_server: EtcdServer, prefix: str,
                                                    writer: EtcdStore,
                                                    pair: list[SimProcess]) -> None:
    a, _b = pair
    for sim in pair:
        await publish(writer, prefix, sim)
    async with Scheduler(etcd_server.url, prefix, eject_failures=1) as s:
        await s.wait_models("m")
        client = s.client()
        try:
            seen = {(await client.completions.with_raw_response.create(
                model="m", prompt="hi")).headers["x-aivmm-backend"] for _ in range(30)}
            assert seen == {"n1/a", "n1/b"}
            # Failover and ejection series for n1/a too.
            a.set(fail_mode="status", fail_status=503)

            async def failed_over() -> bool:
                await client.completions.create(model="m", prompt="hi")
                return metric_value(await s.metrics(), "aivmm_scheduler_ejections_total",
                                    backend="n1/a") >= 1
            await until(failed_over, 20, "a failover from n1/a")
        finally:
            await client.close()
        text = await s.metrics()
        for name in ("aivmm_scheduler_requests_total",
                     "aivmm_scheduler_time_to_first_byte_seconds_count",
                     "aivmm_scheduler_failovers_total", "aivmm_scheduler_ejections_total"):
            assert metric_value(text, name, backend="n1/a") >= 1, name

        await writer.delete(Keys(prefix).backend("n1", "a"))

        async def gone() -> bool:
            return 'backend="n1/a"' not in await s.metrics()
        await until(gone, 10, "n1/a's series to leave /metrics")
        text = await s.metrics()
        assert metric_value(text, "aivmm_scheduler_requests_total", backend="n1/b") >= 1
        # The backend's counters start afresh if it returns, and still count.
        await publish(writer, prefix, a)
        a.set(fail_mode="none")
        await until(lambda: _backends(s, 2), 10, "n1/a back")
        client = s.client()
        try:
            async def served_by_a() -> bool:
                raw = await client.completions.with_raw_response.create(model="m", prompt="x")
                return raw.headers["x-aivmm-backend"] == "n1/a"
            await until(served_by_a, 20, "n1/a to serve again")
        finally:
            await client.close()
        assert metric_value(await s.metrics(), "aivmm_scheduler_requests_total",
                            backend="n1/a", status="200") >= 1


async def _backends(s: Scheduler, n: int) -> bool:
    return metric_value(await s.metrics(), "aivmm_scheduler_backends") == n


# -- 6: the status page counts only served models -----------------------------------------------

async def test_status_page_counts_only_served_models(etcd_server: EtcdServer, prefix: str,
                                                     writer: EtcdStore,
                                                     pair: list[SimProcess]) -> None:
    _a, b = pair
    b.set(models=["other"])
    for sim in pair:
        await publish(writer, prefix, sim)
    async with Scheduler(etcd_server.url, prefix) as s:
        await s.wait_models("m", "other")
        client = s.client()
        try:
            await client.completions.create(model="m", prompt="hi")
            await client.completions.create(model="other", prompt="hi")
            with pytest.raises(openai.NotFoundError):  # rejected: counted with model ""
                await client.completions.create(model="nope", prompt="hi")
        finally:
            await client.close()
        await writer.delete(Keys(prefix).backend("n1", "b"))  # nothing serves "other" now

        async def cluster() -> dict[str, Any] | None:
            async with aiohttp.ClientSession() as c, c.get(s.url + "/v1/cluster") as r:
                body: dict[str, Any] = await r.json()
            keys = {bk["key"] for bk in body["backends"]}
            # Rates are known after a second; the table has dropped n1/b.
            return body if body["request_rate"] is not None and keys == {"n1/a"} else None
        body: dict[str, Any] | None = await until(cluster, 15,
                                                  "rates and the table without n1/b")
    assert body is not None
    assert set(body["models"]) == {"m"}


# -- the score learns from real streams ---------------------------------------------------------

async def test_streams_teach_each_backend_its_decode_speed_and_leave_no_count_behind(
        etcd_server: EtcdServer, prefix: str, writer: EtcdStore) -> None:
    # A fast and a slow device (sim profiles: 4.8 and 19.8 ms a decode step), streamed to
    # through the scheduler with the official client, concurrently so both serve some.
    sims = [SimProcess(["m"], name="fast", profile="h200", chunks=32),
            SimProcess(["m"], name="slow", profile="arc-a770", chunks=32)]
    try:
        for sim in sims:
            sim.start()
            await publish(writer, prefix, sim)
        async with Scheduler(etcd_server.url, prefix) as s:
            await s.wait_models("m")
            client = s.client()
            served: Counter[str] = Counter()

            async def one(i: int) -> None:
                raw = await client.chat.completions.with_raw_response.create(
                    model="m", stream=True, max_tokens=32,
                    messages=[{"role": "user", "content": f"question {i}"}])
                async for _ in raw.parse():
                    pass
                served[raw.headers["x-aivmm-backend"]] += 1
            try:
                for _ in range(3):
                    await asyncio.gather(*(one(i) for i in range(8)))
            finally:
                await client.close()
            backends = s.app[ROUTER].backends
            assert sum(served.values()) == 24
            for key in served:
                b = backends[key]
                # Learnt from the relayed events (the tap's count): tokens after the first
                # over the time from first byte to end.
                assert b.tpot_samples >= 1
                step = 0.0048 if key == "n1/fast" else 0.0198
                assert step * 0.8 < b.tpot(0.0) < step * 10, (key, b.tpot(0.0))
                assert b.samples >= 1 and b.base_rate > 0
            # Every request ended: nothing still counts as in flight or waiting.
            assert all(b.inflight == 0 and b.pending == 0 for b in backends.values())
            # The fast device served more than the slow one.
            assert served["n1/fast"] > served["n1/slow"], served
    finally:
        for sim in sims:
            sim.stop()
