"""A stream whose backend dies mid-way ends with an OpenAI error event, never a hang."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import aiohttp
import openai
import pytest

from devtools.services import until
from tests.faults.cluster import MODEL, Load
from tests.faults.conftest import Cluster

pytestmark = pytest.mark.docker

SLOW = {"tokens_per_second": 5, "chunks": 50}  # a ten-second answer
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "long"}], "stream": True,
        "max_tokens": 50}


async def test_stream_cut_by_a_dying_backend_ends_with_an_error_event(
        cluster: Cluster, figures: Callable[..., None]) -> None:
    nodes = {n.served_as: n for n in cluster.nodes.values()}
    for node in nodes.values():
        await asyncio.to_thread(node.set_knobs, **SLOW)
    url = cluster.schedulers[0].url
    async with Load(url, workers=4) as load:
        # Raw first: the body must end cleanly (no reset, no hang) with an error event.
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http, \
                http.post(url + "/v1/chat/completions", json=BODY) as resp:
            assert resp.status == 200
            first = await resp.content.readline()
            assert first.startswith(b"data: ")
            served = nodes[resp.headers["x-aivmm-backend"]]
            await asyncio.to_thread(lambda: served.container().kill())
            killed = time.monotonic()
            rest = await resp.content.read()
            ended = time.monotonic() - killed
        events = [line for line in rest.split(b"\n") if line.startswith(b"data: ")]
        assert events and b'"error"' in events[-1], rest[-300:]
        assert served.name.encode() in events[-1]
        # The record may still say "ready" from before the kill: wait for the restart itself.
        async def restarted() -> bool:
            r = await served.record()
            return r is not None and r.state == "ready" and r.restarts >= 1
        await until(restarted, 60, "the killed backend restarted and ready")
        await asyncio.to_thread(served.set_knobs, **SLOW)  # a restarted sim starts afresh

        # Then through the openai package: the error event surfaces as an APIError.
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0,
                                    timeout=30)
        try:
            raw = await client.chat.completions.with_raw_response.create(
                model=MODEL, messages=BODY["messages"], stream=True, max_tokens=50)
            served = nodes[raw.headers["x-aivmm-backend"]]
            chunks = aiter(raw.parse())
            await anext(chunks)
            await asyncio.to_thread(lambda: served.container().kill())
            killed = time.monotonic()
            with pytest.raises(openai.APIError) as caught:
                async with asyncio.timeout(20):
                    async for _ in chunks:
                        pass
            raised = time.monotonic() - killed
        finally:
            await client.close()
        assert "stream broken" in str(caught.value)
    # The steady non-streaming load around it never failed: small answers are retried.
    assert not load.failures, load.summary()
    figures("8 backend dies mid-stream", streams=2, hung=0, raw_end_after_kill_s=ended,
            openai_error_after_kill_s=raised, load_requests=len(load.outcomes),
            load_failed=len(load.failures))
