"""A real engine through the whole path: llama.cpp, supervised by the agent, behind a scheduler.

The image (llama.cpp compiled here, through llama-cpp-python) and a tiny random-weight GGUF
are built by devtools/llamacpp.py once and cached (~/.cache/aivmm; the README gives the
times). The agent runs it as an ordinary pinned ``llamacpp`` backend with no GPU, the very
command line of the profile; the probe finds it ready and reads its /metrics; the ``openai``
client's plain and streamed requests through the scheduler answer byte for byte what the
engine answers directly (greedy decoding, fixed seed).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from common.records import BackendRecord
from devtools.agentproc import Fleet
from devtools.schedharness import Scheduler
from devtools.services import DockerEngine, EtcdServer, free_port, until

# The first build, if `make llamacpp` has not run before, compiles llama.cpp: minutes.
pytestmark = [pytest.mark.docker, pytest.mark.timeout(3600)]

# A GGUF file in models_dir: `-m /models/tiny-llama.gguf --alias tiny-llama.gguf`.
MODEL = "tiny-llama.gguf"


@pytest.fixture(scope="module")
def engine(request: pytest.FixtureRequest, docker_engine: DockerEngine) -> dict[str, Any]:
    """The llama.cpp image and the tiny model, built or taken from the cache, progress shown."""
    from devtools import llamacpp

    capture = request.config.pluginmanager.getplugin("capturemanager")
    started = time.monotonic()
    with capture.global_and_fixture_disabled():  # the first build takes minutes: show it
        print()
        model = llamacpp.model()
        image = llamacpp.build_image(docker_engine.host)
        print(f"llamacpp: image and model ready in {time.monotonic() - started:.0f}s")
    return {"image": image, "model": model}


@pytest.fixture
def fleet(tmp_path: Path, etcd_server: EtcdServer, prefix: str,
          docker_engine: DockerEngine) -> Iterator[Fleet]:
    f = Fleet(tmp_path, etcd_server.url, prefix, docker_engine.host)
    yield f
    f.close()


async def _ready(fleet: Fleet, name: str, within: float) -> BackendRecord:
    async def check() -> BackendRecord | None:
        r = await fleet.backend(name)
        return r if r is not None and r.state == "ready" and r.load is not None else None
    return await until(check, within, f"backend {name} ready with its load read")


async def _chat(client: openai.AsyncOpenAI, prompt: str) -> str:
    reply = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=24,
        temperature=0, seed=42)
    assert reply.model == MODEL
    return reply.choices[0].message.content or ""


async def _stream(client: openai.AsyncOpenAI, prompt: str) -> str:
    stream = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=24,
        temperature=0, seed=42, stream=True)
    parts = []
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
    return "".join(parts)


async def test_llamacpp_served_by_the_agent_answers_the_same_through_the_scheduler(
        engine: dict[str, Any], fleet: Fleet, etcd_server: EtcdServer, prefix: str) -> None:
    shutil.copyfile(engine["model"], fleet.models / MODEL)
    config = fleet.config([{"name": "llama", "model": MODEL, "engine": "llamacpp",
                            "port": free_port(), "image": engine["image"], "gpu_count": 0}])
    agent = fleet.agent(config)
    try:
        record = await _ready(fleet, "llama", within=120)
    except TimeoutError:
        print(agent.output()[-4000:])
        for c in await fleet.in_thread(fleet.containers):
            print(c.logs().decode(errors="replace")[-4000:])
        raise
    assert record.engine == "llamacpp" and record.models == [MODEL]
    assert record.api_path == "/v1"
    # The load came from the engine's own /metrics (llama-server's names), idle.
    assert record.load is not None and (record.load.running, record.load.waiting) == (0, 0)
    (container,) = await fleet.in_thread(fleet.containers)
    # The profile's command line, unchanged: the image takes llama-server's flags.
    assert container.attrs["Config"]["Cmd"][:4] == ["-m", f"/models/{MODEL}", "--alias", MODEL]

    direct = openai.AsyncOpenAI(base_url=record.url + "/v1", api_key="none", max_retries=0,
                                timeout=60)
    async with Scheduler(etcd_server.url, prefix) as sched:
        await sched.wait_models(MODEL, within=15)
        routed = sched.client(timeout=60)
        try:
            for ask in (_chat, _stream):
                for prompt in ("Tell me a story about the sea.", "What is the name of the city?"):
                    # One request first, so the direct and the routed one meet the engine
                    # in the same state (llama.cpp keeps the last prompt's cache).
                    await ask(direct, prompt)
                    here, there = await ask(direct, prompt), await ask(routed, prompt)
                    assert here, (ask.__name__, prompt)
                    assert there.encode() == here.encode(), (ask.__name__, prompt, here, there)
        finally:
            await routed.close()
            await direct.close()
    assert "Traceback" not in container.logs().decode(errors="replace")
