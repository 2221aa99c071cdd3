"""The sim engine, driven by the official openai client: as a process and as a container."""

from __future__ import annotations

import asyncio
import math
import signal
import urllib.request
from collections.abc import AsyncIterator, Iterator

import aiohttp
import docker
import openai
import pytest

from devtools.image import build_image
from devtools.services import DockerEngine, free_port, until
from devtools.simproc import SimProcess
from sim import generate
from sim.engine import Engine
from sim.main import parse_args
from sim.settings import SettingsError, SimSettings, from_env

CHAT = [{"role": "user", "content": "Say something about the fleet"}]


def metric(text: str, name: str, model: str) -> float:
    prefix = f'{name}{{model_name="{model}"}} '
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix):])
    raise AssertionError(f"{name} for {model} not in metrics:\n{text}")


@pytest.fixture(scope="module")
def sim() -> Iterator[SimProcess]:
    # One process for the module; tests that change knobs restore them.
    proc = SimProcess(["m1", "m2"], name="alpha", latency_ms=1, tokens_per_second=0,
                      chunks=8, embedding_dim=32).start()
    yield proc
    proc.stop()


@pytest.fixture
def defaults(sim: SimProcess) -> Iterator[SimProcess]:
    """The module's sim, with its knobs reset after the test."""
    yield sim
    sim.set(fail_mode="none", fail_rate=1.0, latency_ms=1, max_concurrency=0,
            tokens_per_second=0)


@pytest.fixture
async def client(sim: SimProcess) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=sim.url + "/v1", api_key="x",
                                  max_retries=0, timeout=30) as c:
        yield c


# --- pure parts -------------------------------------------------------------------------------

def test_answers_are_deterministic_readable_words() -> None:
    first = generate.answer_tokens("hello", 5)
    assert first == generate.answer_tokens("hello", 5)
    assert len(first) == 5
    assert all(token.strip().isalpha() for token in first)
    assert "".join(first).split() == [t.strip() for t in first]


def test_embeddings_are_unit_vectors_that_differ_by_input() -> None:
    a, b = generate.embedding("a", 48), generate.embedding("b", 48)
    assert len(a) == 48
    assert math.isclose(sum(v * v for v in a), 1.0, rel_tol=1e-9)
    assert a == generate.embedding("a", 48)
    assert a != b


def test_settings_from_env_and_flags_with_flags_winning() -> None:
    env = {"SIM_MODELS": "x, y", "SIM_LATENCY_MS": "250", "SIM_FAIL_MODE": "hang",
           "SIM_PORT": "9001", "SIM_NODE_LABEL": "env"}
    host, port, settings, _ = parse_args(["--latency-ms", "5", "--model", "z"], env)
    assert (host, port) == ("127.0.0.1", 9001)
    assert settings.models == ("z",)
    assert settings.latency_ms == 5.0
    assert settings.fail_mode == "hang"
    assert settings.node_label == "env"
    assert from_env(env).models == ("x", "y")


@pytest.mark.parametrize("changes", [
    {"fail_mode": "explode"}, {"fail_rate": 2}, {"chunks": 0}, {"nope": 1},
    {"max_concurrency": "many"}, {"models": []}, {"fail_status": 200}, {"latency_ms": True},
])
def test_bad_knobs_are_rejected(changes: dict[str, object]) -> None:
    with pytest.raises(SettingsError):
        SimSettings().updated(changes)


@pytest.mark.parametrize(("argv", "named"), [
    (["--fail-mode", "explode"], "fail_mode"), (["--log-level", "loud"], "--log-level")])
def test_bad_flag_exits_2(argv: list[str], named: str,
                          capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv, {})
    assert exit_info.value.code == 2
    assert named in capsys.readouterr().err


# --- the server as a process ------------------------------------------------------------------

async def test_chat_completion_answers_with_usage_and_names_the_instance(
        client: openai.AsyncOpenAI) -> None:
    raw = await client.chat.completions.with_raw_response.create(model="m1", messages=CHAT)
    assert raw.headers["x-sim-name"] == "alpha"
    answer = raw.parse()
    assert answer.model == "m1"
    text = answer.choices[0].message.content
    assert text and len(text.split()) == 8
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage is not None and answer.usage.completion_tokens == 8
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + 8


async def test_completion_honours_max_tokens(client: openai.AsyncOpenAI) -> None:
    answer = await client.completions.create(model="m2", prompt="Once upon a time", max_tokens=3)
    assert len(answer.choices[0].text.split()) == 3
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage is not None and answer.usage.completion_tokens == 3


async def test_streamed_chunks_join_into_the_full_answer(client: openai.AsyncOpenAI) -> None:
    whole = await client.chat.completions.create(model="m1", messages=CHAT)
    stream = await client.chat.completions.create(
        model="m1", messages=CHAT, stream=True, stream_options={"include_usage": True})
    pieces: list[str] = []
    usage = None
    finish = None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert len([p for p in pieces if p]) == 8
    assert "".join(pieces) == whole.choices[0].message.content
    assert finish == "stop"
    assert usage is not None and usage.completion_tokens == 8


async def test_streamed_text_completion(client: openai.AsyncOpenAI) -> None:
    stream = await client.completions.create(model="m2", prompt="hi", stream=True, max_tokens=4)
    texts = [c.choices[0].text async for c in stream if c.choices]
    assert len("".join(texts).split()) == 4


async def test_embeddings_list_and_single(client: openai.AsyncOpenAI) -> None:
    many = await client.embeddings.create(model="m1", input=["a", "b"])
    assert [d.index for d in many.data] == [0, 1]
    assert all(len(d.embedding) == 32 for d in many.data)
    assert many.data[0].embedding != many.data[1].embedding
    one = await client.embeddings.create(model="m1", input="a", encoding_format="float")
    assert one.data[0].embedding == pytest.approx(many.data[0].embedding, rel=1e-6)


async def test_models_lists_the_served_ids(client: openai.AsyncOpenAI) -> None:
    models = [m.id async for m in client.models.list()]
    assert models == ["m1", "m2"]


async def test_wrong_model_is_404_in_openai_shape(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        await client.chat.completions.create(model="nope", messages=CHAT)
    assert err.value.status_code == 404
    assert isinstance(err.value.body, dict)
    assert set(err.value.body) >= {"message", "type", "param", "code"}
    assert "nope" in err.value.body["message"]


async def test_bad_json_is_400(sim: SimProcess) -> None:
    async with aiohttp.ClientSession() as http, http.post(
            sim.url + "/v1/chat/completions", data=b"{not json",
            headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 400
        body = await resp.json()
    assert body["error"]["type"] == "invalid_request_error"


async def test_live_fail_mode_status_then_recovery(defaults: SimProcess,
                                                   client: openai.AsyncOpenAI) -> None:
    defaults.set(fail_mode="status", fail_status=503)
    with pytest.raises(openai.APIStatusError) as err:
        await client.chat.completions.create(model="m1", messages=CHAT)
    assert err.value.status_code == 503
    defaults.set(fail_mode="none")
    answer = await client.chat.completions.create(model="m1", messages=CHAT)
    assert answer.choices[0].message.content


async def test_reset_drops_the_connection(defaults: SimProcess,
                                          client: openai.AsyncOpenAI) -> None:
    defaults.set(fail_mode="reset")
    with pytest.raises(openai.APIConnectionError):
        await client.chat.completions.create(model="m1", messages=CHAT)


async def test_die_mid_stream_cuts_the_stream(defaults: SimProcess) -> None:
    defaults.set(fail_mode="die_mid_stream")
    events: list[bytes] = []
    async with aiohttp.ClientSession() as http, http.post(
            defaults.url + "/v1/chat/completions",
            json={"model": "m1", "messages": CHAT, "stream": True}) as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientError):
            async for line in resp.content:
                if line.startswith(b"data: "):
                    events.append(line)
    assert 0 < len(events) < 8
    assert b"data: [DONE]\n" not in events


async def test_unhealthy_mode_fails_health_only(defaults: SimProcess,
                                                client: openai.AsyncOpenAI) -> None:
    defaults.set(fail_mode="unhealthy")
    async with aiohttp.ClientSession() as http, http.get(defaults.url + "/health") as resp:
        assert resp.status == 503
    assert (await client.models.list()).data


async def test_bad_live_knob_is_400_and_changes_nothing(defaults: SimProcess) -> None:
    async with aiohttp.ClientSession() as http, http.post(
            defaults.url + "/sim/config", json={"fail_mode": "explode"}) as resp:
        assert resp.status == 400
    assert defaults.config()["fail_mode"] == "none"


async def test_metrics_follow_running_and_waiting_requests(
        defaults: SimProcess, client: openai.AsyncOpenAI) -> None:
    async with aiohttp.ClientSession() as http:
        async def scrape() -> str:
            async with http.get(defaults.url + "/metrics") as resp:
                return await resp.text()

        text = await scrape()
        for name in ("vllm:num_requests_running", "vllm:num_requests_waiting",
                     "vllm:gpu_cache_usage_perc"):
            assert metric(text, name, "m1") == 0.0

        async def counts() -> tuple[float, float]:
            text = await scrape()
            return (metric(text, "vllm:num_requests_running", "m1"),
                    metric(text, "vllm:num_requests_waiting", "m1"))

        # A slow request runs; with one slot, a second one waits behind it.
        defaults.set(latency_ms=60_000, max_concurrency=1)
        first = asyncio.create_task(
            client.chat.completions.create(model="m1", messages=CHAT), name="slow-1")
        second = asyncio.create_task(
            client.chat.completions.create(model="m1", messages=CHAT), name="slow-2")
        try:
            async def one_running_one_waiting() -> bool:
                return await counts() == (1.0, 1.0)
            await until(one_running_one_waiting, what="1 running, 1 waiting")
            assert metric(await scrape(), "vllm:gpu_cache_usage_perc", "m1") == 1.0
        finally:
            # Clients giving up must free the slots.
            first.cancel()
            second.cancel()
            await asyncio.gather(first, second, return_exceptions=True)

        async def idle() -> bool:
            return await counts() == (0.0, 0.0)
        await until(idle, what="no requests in flight")

        defaults.set(latency_ms=300, max_concurrency=0)
        answer = asyncio.create_task(
            client.chat.completions.create(model="m1", messages=CHAT), name="slow-3")

        async def running() -> bool:
            return (await counts())[0] == 1.0
        await until(running, what="the slow request running")
        assert (await answer).choices[0].message.content
        await until(idle, what="the slow request finished")


async def test_sigterm_exits_zero_even_with_a_hanging_request() -> None:
    sim = SimProcess("m", name="term", fail_mode="hang").start()
    try:
        async with aiohttp.ClientSession() as http:
            hung = asyncio.create_task(http.post(
                sim.url + "/v1/chat/completions", json={"model": "m", "messages": CHAT}),
                name="hanging-request")

            async def hanging() -> bool:
                async with http.get(sim.url + "/metrics") as resp:
                    return metric(await resp.text(), "vllm:num_requests_running", "m") == 1.0
            await until(hanging, what="the hanging request")
            assert sim.proc is not None
            sim.proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(sim.proc.wait, 20) == 0
            result = (await asyncio.gather(hung, return_exceptions=True))[0]
            if isinstance(result, aiohttp.ClientResponse):
                result.release()
    finally:
        sim.kill()


def test_restart_keeps_port_and_live_knobs() -> None:
    sim = SimProcess("m", name="again").start()
    try:
        port = sim.port
        sim.set(node_label="renamed")
        sim.restart()
        assert sim.port == port
        with urllib.request.urlopen(sim.url + "/health", timeout=5) as resp:
            assert resp.headers["x-sim-name"] == "renamed"
    finally:
        sim.stop()


# --- the image and the container --------------------------------------------------------------

@pytest.mark.docker
def test_image_rebuild_is_a_no_op(sim_image: str, docker_engine: DockerEngine,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    client = docker.DockerClient(base_url=docker_engine.host, version="auto")
    try:
        first_id = client.images.get(sim_image).id
        again = build_image(docker_engine.host)
        assert again == sim_image
        assert client.images.get(again).id == first_id
        assert client.images.get("aivmm-sim:latest").id == first_id
        assert "nothing to build" in capsys.readouterr().out
        image = client.images.get(sim_image)
        assert image.labels["aivmm.content-hash"] == sim_image.split(":")[1]
        user = image.attrs["Config"]["User"]
        assert user and not user.startswith("0")
    finally:
        client.close()


@pytest.mark.docker
async def test_container_answers_chat_completion(sim_image: str,
                                                 docker_engine: DockerEngine) -> None:
    client = docker.DockerClient(base_url=docker_engine.host, version="auto")
    port = free_port()
    container = await asyncio.to_thread(
        client.containers.run, sim_image, ["--host", "127.0.0.1", "--port", str(port)],
        environment={"SIM_MODELS": "boxed", "SIM_NODE_LABEL": "in-a-box",
                     "SIM_LATENCY_MS": "1"},
        network_mode="host", detach=True)
    try:
        url = f"http://127.0.0.1:{port}"

        async def healthy() -> bool:
            try:
                async with aiohttp.ClientSession() as http, http.get(url + "/health") as r:
                    return r.status == 200
            except aiohttp.ClientError:
                return False
        await until(healthy, within=30, what="the sim container")
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as oai:
            raw = await oai.chat.completions.with_raw_response.create(model="boxed",
                                                                     messages=CHAT)
        assert raw.headers["x-sim-name"] == "in-a-box"
        assert raw.parse().choices[0].message.content
        await asyncio.to_thread(container.stop, timeout=20)
        result = await asyncio.to_thread(container.wait, timeout=30)
        assert result["StatusCode"] == 0
    finally:
        await asyncio.to_thread(container.remove, force=True)
        client.close()


# --- the engine model (sim/engine.py) ---------------------------------------------------------

def test_engine_knobs_are_off_by_default_and_a_profile_sets_them() -> None:
    assert not SimSettings().engine
    h200 = SimSettings().updated({"profile": "h200"})
    assert h200.engine and h200.max_batch == 256 and h200.decode_ms == 4.8
    # A knob named alongside the profile wins over the profile's figure.
    tuned = SimSettings().updated({"profile": "arc-a770", "max_batch": 4})
    assert tuned.max_batch == 4 and tuned.prefill_tokens_per_second == 1290
    with pytest.raises(SettingsError, match="profile"):
        SimSettings().updated({"profile": "tpu-v9"})
    with pytest.raises(SettingsError, match="time_scale"):
        SimSettings().updated({"time_scale": 0})
    with pytest.raises(SettingsError, match="block_tokens"):
        SimSettings().updated({"block_tokens": 0})


def _engine(**knobs: object) -> tuple[Engine, SimSettings]:
    settings = SimSettings().updated(knobs)
    return Engine(lambda: settings), settings


async def _ttft_and_total(engine: Engine, prompt: str, n: int) -> tuple[float, float]:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    seq = engine.submit("m", prompt, n)
    await seq.next_token()
    first = loop.time() - t0
    while seq.produced < n:
        await seq.next_token()
    return first, loop.time() - t0


async def test_prefill_time_follows_uncached_prompt_tokens() -> None:
    engine, _ = _engine(decode_ms=1, prefill_tokens_per_second=8000,
                        prefix_cache_blocks=1000, block_tokens=16)
    try:
        prompt = " ".join(f"w{i}" for i in range(800))  # 800 tokens: 100 ms of prefill
        cold, _ = await _ttft_and_total(engine, prompt, 2)
        warm, _ = await _ttft_and_total(engine, prompt, 2)
        assert cold >= 0.1 and warm < 0.05, (cold, warm)
        assert engine.queries == 1600 and engine.hits == 799  # the last token is recomputed
        # A different prompt after the shared 400 tokens hits only those.
        other = " ".join(f"w{i}" for i in range(400)) + " " + " ".join(
            f"x{i}" for i in range(400))
        half, _ = await _ttft_and_total(engine, other, 2)
        assert 0.04 < half < cold, (half, cold)
        engine.reset_cache()
        again, _ = await _ttft_and_total(engine, prompt, 2)
        assert again >= 0.1
    finally:
        await engine.close()


async def test_prefix_cache_is_an_lru_of_blocks_with_a_capacity() -> None:
    engine, _ = _engine(decode_ms=0.1, prefix_cache_blocks=4, block_tokens=2)
    try:
        for prompt in ("a b c d", "e f g h", "i j k l"):  # 2 blocks each; 6 > 4
            await _ttft_and_total(engine, prompt, 1)
        assert len(engine.cache) == 4
        hits = engine.hits
        await _ttft_and_total(engine, "a b c d", 1)  # evicted: no hit
        assert engine.hits == hits
        await _ttft_and_total(engine, "i j k l", 1)  # still there
        assert engine.hits == hits + 3
    finally:
        await engine.close()


async def test_batch_step_time_grows_with_sequences_and_excess_waits() -> None:
    engine, _ = _engine(decode_ms=5, step_ms_per_seq=5, max_batch=2)
    try:
        alone = (await _ttft_and_total(engine, "p", 10))[1]  # 10 steps of 10 ms
        two = await asyncio.gather(*(_ttft_and_total(engine, f"p{i}", 10) for i in range(2)))
        # Together each step costs 15 ms: both slower than alone, neither twice as slow.
        assert all(alone * 1.2 < total < alone * 2 for _, total in two), (alone, two)
        three = await asyncio.gather(*(_ttft_and_total(engine, f"q{i}", 10) for i in range(3)))
        # The third waited for a place in the batch: its first token came after the others'
        # whole answers.
        assert three[2][0] >= max(three[0][1], three[1][1]) * 0.9, three
    finally:
        await engine.close()


async def test_kv_pool_limits_admission() -> None:
    engine, _ = _engine(decode_ms=2, prefix_cache_blocks=10, block_tokens=10)
    try:
        big = " ".join(["w"] * 60)  # 60 + 30 tokens: 9 of the 10 blocks
        first = engine.submit("m", big, 30)
        second = engine.submit("m", big + " x", 30)
        await first.next_token()
        assert engine.count("m") == (1, 1) and engine.kv_usage() == 0.9
        while second.produced < 1:
            await second.next_token()
        assert first.done  # admitted only once the first had finished
    finally:
        await engine.close()


async def test_engine_metrics_and_prefix_cache_reset_over_http() -> None:
    with SimProcess("m", name="eng", profile="h200", chunks=4) as sim:
        async with aiohttp.ClientSession() as http:
            body = {"model": "m", "messages": [{"role": "user", "content": " ".join(
                ["word"] * 200)}], "stream": True}
            for _ in range(2):
                async with http.post(sim.url + "/v1/chat/completions", json=body) as resp:
                    text = await resp.text()
                    assert text.count("data: ") == 6 and text.endswith("data: [DONE]\n\n")
            async with http.get(sim.url + "/metrics") as resp:
                metrics = await resp.text()
            # 200 tokens: 12 whole blocks of 16 hit the second time.
            assert metric(metrics, "vllm:prefix_cache_queries_total", "m") == 400
            assert metric(metrics, "vllm:prefix_cache_hits_total", "m") == 192
            for name in ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc",
                         "vllm:num_requests_running", "vllm:num_requests_waiting"):
                assert metric(metrics, name, "m") == 0.0
            async with http.post(sim.url + "/reset_prefix_cache") as resp:
                assert resp.status == 200
            async with http.post(sim.url + "/v1/chat/completions",
                                 json=body | {"stream": False}) as resp:
                assert (await resp.json())["usage"]["completion_tokens"] == 4
            async with http.get(sim.url + "/metrics") as resp:
                assert metric(await resp.text(), "vllm:prefix_cache_hits_total", "m") == 192
