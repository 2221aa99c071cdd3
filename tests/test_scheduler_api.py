"""The scheduler's API end to end: real etcd, sim backends as processes, the openai client."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Iterator

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

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def sims() -> Iterator[list[SimProcess]]:
    """Two backends of the chat model and one embeddings-only backend, shared by the module."""
    started = [SimProcess(["chat-m"], name="a", latency_ms=2),
               SimProcess(["chat-m"], name="b", latency_ms=2),
               SimProcess(["emb-m"], name="e", latency_ms=1)]
    try:
        for sim in started:
            sim.start()
        yield started
    finally:
        for sim in started:
            sim.stop()


@pytest.fixture
async def sched(etcd_server: EtcdServer, prefix: str, writer: EtcdStore,
                sims: list[SimProcess]) -> AsyncIterator[Scheduler]:
    for sim in sims:
        await publish(writer, prefix, sim)
    async with Scheduler(etcd_server.url, prefix, queue_timeout=0.2) as s:
        await s.wait_models("chat-m", "emb-m")
        yield s


async def test_chat_completions_embeddings_and_models(sched: Scheduler) -> None:
    client = sched.client()
    try:
        raw = await client.chat.completions.with_raw_response.create(
            model="chat-m", messages=[{"role": "user", "content": "hello"}])
        chat = raw.parse()
        assert chat.choices[0].message.content
        assert raw.headers["x-aivmm-backend"] in ("n1/a", "n1/b")

        comp = await client.completions.create(model="chat-m", prompt="once upon", max_tokens=4)
        assert comp.choices[0].text and comp.usage.completion_tokens == 4

        emb = await client.embeddings.with_raw_response.create(model="emb-m", input=["x", "y"])
        assert emb.headers["x-aivmm-backend"] == "n1/e"
        assert len(emb.parse().data) == 2

        models = await client.models.list()
        assert sorted(m.id for m in models.data) == ["chat-m", "emb-m"]
    finally:
        await client.close()


async def test_streaming_passes_chunks_through(sched: Scheduler) -> None:
    client = sched.client()
    try:
        stream = await client.chat.completions.create(
            model="chat-m", messages=[{"role": "user", "content": "tell me"}], stream=True)
        pieces = [c.choices[0].delta.content async for c in stream
                  if c.choices and c.choices[0].delta.content]
        assert len(pieces) > 1  # chunk by chunk, not one merged body
        async with aiohttp.ClientSession() as s, s.post(
                sched.url + "/v1/completions",
                json={"model": "chat-m", "prompt": "x", "stream": True}) as r:
            assert r.headers["Content-Type"].startswith("text/event-stream")
            assert r.headers["x-aivmm-backend"] in ("n1/a", "n1/b")
            body = await r.read()
            assert body.rstrip().endswith(b"data: [DONE]")
    finally:
        await client.close()


async def test_requests_spread_over_backends_and_are_counted(sched: Scheduler) -> None:
    client = sched.client()
    seen = set()
    try:
        for _ in range(30):
            raw = await client.completions.with_raw_response.create(model="chat-m", prompt="p")
            seen.add(raw.headers["x-aivmm-backend"])
    finally:
        await client.close()
    assert seen == {"n1/a", "n1/b"}
    text = await sched.metrics()
    assert metric_value(text, "aivmm_scheduler_requests_total", model="chat-m",
                        status="200") == 30
    assert metric_value(text, "aivmm_scheduler_backends", state="ready") == 3
    assert metric_value(text, "aivmm_scheduler_etcd_watch_up") == 1


async def _post(url: str, body: bytes, headers: dict[str, str] | None = None
                ) -> tuple[int, dict, dict[str, str]]:
    async with aiohttp.ClientSession() as s, s.post(
            url, data=body, headers={"Content-Type": "application/json", **(headers or {})}) as r:
        return r.status, orjson.loads(await r.read()), dict(r.headers)


async def test_bad_input_gets_openai_errors(etcd_server: EtcdServer, prefix: str,
                                            writer: EtcdStore, sims: list[SimProcess]) -> None:
    await publish(writer, prefix, sims[0])
    await publish(writer, prefix, sims[2], state="starting")
    async with Scheduler(etcd_server.url, prefix, queue_timeout=0.2,
                         max_body_bytes=1000) as s:
        await s.wait_models("chat-m")
        url = s.url + "/v1/chat/completions"
        cases = [
            (b"{not json", 400),
            (b"[1, 2]", 400),
            (b'{"messages": []}', 400),
            (b'{"model": "nope", "messages": []}', 404),
            (b'{"model": "chat-m", "x": "' + b"y" * 2000 + b'"}', 413),
            (b'{"model": "emb-m", "input": "x"}', 503),  # known, but its backend is starting
        ]
        for body, status in cases:
            got, doc, headers = await _post(url, body)
            assert got == status, (body[:40], got, doc)
            assert set(doc["error"]) == {"message", "type", "param", "code"}
            if status == 503:
                assert headers["Retry-After"].isdigit()
        # The same errors through the official client, as a user meets them.
        client = s.client()
        try:
            with pytest.raises(openai.NotFoundError):
                await client.chat.completions.create(model="nope", messages=[])
            with pytest.raises(openai.BadRequestError):
                await client.post("/chat/completions", body={"messages": []}, cast_to=object)
        finally:
            await client.close()
        # Rejections are counted, without the client's model name as a label.
        text = await s.metrics()
        for status in (400, 404, 413):
            assert metric_value(text, "aivmm_scheduler_requests_total", model="",
                                status=str(status)) >= 1
        assert 'model="nope"' not in text
        # A wrong path or method answers in the same shape, not in aiohttp's plain text.
        async with aiohttp.ClientSession() as http:
            async with http.get(url) as resp:
                assert resp.status == 405 and "POST" in resp.headers["Allow"]
                assert set((await resp.json())["error"]) == {"message", "type", "param", "code"}
            async with http.post(s.url + "/v1/nothing-here", data=b"{}") as resp:
                assert resp.status == 404
                assert (await resp.json())["error"]["type"] == "not_found_error"


async def test_authentication_on(etcd_server: EtcdServer, prefix: str, writer: EtcdStore,
                                 sims: list[SimProcess]) -> None:
    await publish(writer, prefix, sims[0])
    hashed = "sha256:" + hashlib.sha256(b"hashed-key").hexdigest()
    async with Scheduler(etcd_server.url, prefix, api_keys=["plain-key", hashed]) as s:
        await s.wait_models("chat-m", api_key="plain-key")
        for key in ("plain-key", "hashed-key"):
            client = s.client(api_key=key)
            try:
                comp = await client.completions.create(model="chat-m", prompt="hi")
                assert comp.choices[0].text
            finally:
                await client.close()
        client = s.client(api_key="wrong")
        try:
            with pytest.raises(openai.AuthenticationError):
                await client.completions.create(model="chat-m", prompt="hi")
            with pytest.raises(openai.AuthenticationError):
                await client.models.list()
        finally:
            await client.close()
        # Probes and scrapes stay open.
        async with aiohttp.ClientSession() as session:
            for path in ("/healthz", "/readyz", "/metrics"):
                async with session.get(s.url + path) as r:
                    assert r.status == 200, path
            async with session.post(s.url + "/v1/completions", data=b"{") as r:
                assert r.status == 401  # the key is checked before the body is looked at


async def test_authentication_off_accepts_any_key(sched: Scheduler) -> None:
    client = sched.client(api_key="anything at all")
    try:
        assert (await client.completions.create(model="chat-m", prompt="hi")).choices
    finally:
        await client.close()


async def test_two_replicas_on_one_etcd_both_serve(etcd_server: EtcdServer, prefix: str,
                                                   writer: EtcdStore,
                                                   sims: list[SimProcess]) -> None:
    await publish(writer, prefix, sims[0])
    async with Scheduler(etcd_server.url, prefix) as s1, Scheduler(etcd_server.url, prefix) as s2:
        for s in (s1, s2):
            await s.wait_models("chat-m")
        # A backend added later reaches both through the watch.
        await publish(writer, prefix, sims[2])
        for s in (s1, s2):
            await s.wait_models("chat-m", "emb-m")
            client = s.client()
            try:
                raw = await client.chat.completions.with_raw_response.create(
                    model="chat-m", messages=[{"role": "user", "content": "hi"}])
                assert raw.headers["x-aivmm-backend"] == "n1/a"
            finally:
                await client.close()
        # A deleted record leaves both.
        await writer.delete(f"{prefix}/backends/n1/e")
        for s in (s1, s2):
            await until(lambda s=s: _lacks(s, "emb-m"), what="emb-m gone")


async def _lacks(s: Scheduler, model: str) -> bool:
    return model not in await s.models()


async def test_corrupt_record_is_skipped_and_counted(etcd_server: EtcdServer, prefix: str,
                                                     writer: EtcdStore,
                                                     sims: list[SimProcess]) -> None:
    await publish(writer, prefix, sims[0])
    await writer.put(f"{prefix}/backends/n1/bad", b'{"schema": 1, "node": 3}')
    async with Scheduler(etcd_server.url, prefix) as s:
        await s.wait_models("chat-m")
        assert metric_value(await s.metrics(), "aivmm_scheduler_bad_records_total") == 1


async def test_client_disconnect_cancels_upstream(etcd_server: EtcdServer, prefix: str,
                                                  writer: EtcdStore) -> None:
    with SimProcess(["slow-m"], name="slow", latency_ms=1, tokens_per_second=5,
                    chunks=200) as sim:
        await publish(writer, prefix, sim)
        async with Scheduler(etcd_server.url, prefix) as s:
            await s.wait_models("slow-m")

            async def running() -> float:
                async with aiohttp.ClientSession() as c, c.get(sim.url + "/metrics") as r:
                    return metric_value(await r.text(), "vllm:num_requests_running")

            async with aiohttp.ClientSession() as c:
                r = await c.post(s.url + "/v1/completions",
                                 json={"model": "slow-m", "prompt": "x", "stream": True})
                await r.content.readline()  # the first event arrived: generation is running
                assert await running() == 1
                r.close()  # the client goes away mid-stream
            await until(lambda: _is_zero(running()), 10, "the backend to stop generating")


async def _is_zero(value: asyncio.Future[float] | object) -> bool:
    return await value == 0  # type: ignore[misc]


async def test_engine_serving_the_api_under_another_path(etcd_server: EtcdServer, prefix: str,
                                                         writer: EtcdStore) -> None:
    # OpenVINO Model Server answers the OpenAI API under /v3; its record says so and the
    # scheduler maps the client's /v1 onto it.
    seen: list[str] = []

    async def chat(request: web.Request) -> web.Response:
        seen.append(request.path)
        body = await request.json()
        return web.json_response({
            "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": "from v3"}}]})

    engine = web.Application()
    engine.router.add_post("/v3/chat/completions", chat)
    runner = web.AppRunner(engine, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        record = BackendRecord(node="n1", name="ovms", models=["ov-m"], state="ready",
                               url=f"http://127.0.0.1:{port}", engine="openvino",
                               api_path="/v3", updated_at=time.time())
        await writer.put(Keys(prefix).backend("n1", "ovms"), dump(record))
        async with Scheduler(etcd_server.url, prefix) as s:
            await s.wait_models("ov-m")
            client = s.client()
            try:
                answer = await client.chat.completions.create(
                    model="ov-m", messages=[{"role": "user", "content": "hi"}])
            finally:
                await client.close()
        assert answer.choices[0].message.content == "from v3"
        assert seen == ["/v3/chat/completions"]
    finally:
        await runner.cleanup()
