"""Engine load from /metrics: each engine's names, hostile bodies, and a probe loop that lives.

The parser is pure (agent/health/load.py); the Prober runs for real against a small aiohttp
server on 127.0.0.1; the last tests run a real Supervisor's probe loop against it.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from agent.config import AgentConfig, BackendConfig
from agent.docker.client import DockerAdapter
from agent.health.load import MAX_COUNT, parse_load
from agent.health.probe import MAX_BODY_BYTES, Prober, ProbeResult
from agent.metrics import AgentMetrics
from agent.supervisor import Supervisor
from common.records import BackendLoad

MODEL = "meta-llama/Llama-3.1-8B-Instruct"

# -- real-looking bodies, in the shape each engine emits ------------------------------------

# vLLM V1 (0.10 and later): the old KV name is still sent, marked deprecated, next to the
# new one; an "engine" label per engine core.
VLLM_NEW = f"""\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{engine="0",model_name="{MODEL}"}} 3.0
vllm:num_requests_running{{engine="1",model_name="{MODEL}"}} 2.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{{engine="0",model_name="{MODEL}"}} 7.0
vllm:num_requests_waiting{{engine="1",model_name="{MODEL}"}} 0.0
# HELP vllm:gpu_cache_usage_perc GPU KV-cache usage. 1 means 100 percent usage. \
DEPRECATED: Use vllm:kv_cache_usage_perc instead.
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{{engine="0",model_name="{MODEL}"}} 0.1
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{{engine="0",model_name="{MODEL}"}} 0.42
vllm:kv_cache_usage_perc{{engine="1",model_name="{MODEL}"}} 0.3
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{{engine="0",model_name="{MODEL}"}} 8.128902e+06
vllm:time_to_first_token_seconds_bucket{{engine="0",le="+Inf",model_name="{MODEL}"}} 12.0
"""

# vLLM 0.6 (the default image of the vllm profile): gpu_cache_usage_perc only.
VLLM_OLD = f"""\
# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{{block_size="16",gpu_memory_utilization="0.9"}} 1.0
# HELP vllm:num_requests_running Number of requests currently running on GPU.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{model_name="{MODEL}"}} 4.0
# HELP vllm:num_requests_swapped Number of requests swapped to CPU.
# TYPE vllm:num_requests_swapped gauge
vllm:num_requests_swapped{{model_name="{MODEL}"}} 0.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{{model_name="{MODEL}"}} 1.0
# HELP vllm:gpu_cache_usage_perc GPU KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{{model_name="{MODEL}"}} 0.875
# HELP vllm:cpu_cache_usage_perc CPU KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:cpu_cache_usage_perc gauge
vllm:cpu_cache_usage_perc{{model_name="{MODEL}"}} 0.0
"""

SGLANG = f"""\
# HELP sglang:prompt_tokens_total Number of prefill tokens processed.
# TYPE sglang:prompt_tokens_total counter
sglang:prompt_tokens_total{{model_name="{MODEL}"}} 8.128902e+06
# HELP sglang:num_running_reqs The number of running requests.
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{{model_name="{MODEL}"}} 8.0
# HELP sglang:num_used_tokens The number of used tokens.
# TYPE sglang:num_used_tokens gauge
sglang:num_used_tokens{{model_name="{MODEL}"}} 91234.0
# HELP sglang:token_usage The token usage.
# TYPE sglang:token_usage gauge
sglang:token_usage{{model_name="{MODEL}"}} 0.28
# HELP sglang:num_queue_reqs The number of requests in the waiting queue.
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{{model_name="{MODEL}"}} 4.0
# HELP sglang:cache_hit_rate The prefix cache hit rate.
# TYPE sglang:cache_hit_rate gauge
sglang:cache_hit_rate{{model_name="{MODEL}"}} 0.007507552643049313
"""

# llama.cpp's llama-server (--metrics): no labels, plain integers.
LLAMACPP = """\
# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed.
# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total 6886
# HELP llamacpp:kv_cache_usage_ratio KV-cache usage. 1 means 100 percent usage.
# TYPE llamacpp:kv_cache_usage_ratio gauge
llamacpp:kv_cache_usage_ratio 0.63
# HELP llamacpp:kv_cache_tokens KV-cache tokens.
# TYPE llamacpp:kv_cache_tokens gauge
llamacpp:kv_cache_tokens 10321
# HELP llamacpp:requests_processing Number of requests processing.
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 2
# HELP llamacpp:requests_deferred Number of requests deferred.
# TYPE llamacpp:requests_deferred gauge
llamacpp:requests_deferred 1
"""

# OpenVINO Model Server (--metrics_enable): an LLM servable is a MediaPipe graph.
OVMS = """\
# HELP ovms_streams Number of OpenVINO execution streams.
# TYPE ovms_streams gauge
ovms_streams{name="embeddings",version="1"} 4
# HELP ovms_current_requests Number of requests being currently processed by the model server.
# TYPE ovms_current_requests gauge
ovms_current_requests{name="embeddings",version="1"} 0
# HELP ovms_current_graphs Number of MediaPipe graphs in process.
# TYPE ovms_current_graphs gauge
ovms_current_graphs{name="llama"} 3
# HELP ovms_requests_success Number of successful requests to a model or a DAG.
# TYPE ovms_requests_success counter
ovms_requests_success{api="V3",interface="REST",method="Unary",name="llama"} 120
"""


@pytest.mark.parametrize(("body", "expected"), [
    (VLLM_NEW, BackendLoad(running=5, waiting=7, kv_cache_usage=0.42)),
    (VLLM_OLD, BackendLoad(running=4, waiting=1, kv_cache_usage=0.875)),
    (SGLANG, BackendLoad(running=8, waiting=4, kv_cache_usage=0.28)),
    (LLAMACPP, BackendLoad(running=2, waiting=1, kv_cache_usage=0.63)),
    (OVMS, BackendLoad(running=3, waiting=None, kv_cache_usage=None)),
], ids=["vllm-new", "vllm-old", "sglang", "llamacpp", "ovms"])
def test_each_engines_own_names_give_its_load(body: str, expected: BackendLoad) -> None:
    assert parse_load(body) == expected
    assert parse_load(body.encode()) == expected  # as read off the wire


def test_ovms_without_graphs_counts_a_plain_models_requests() -> None:
    body = 'ovms_current_requests{name="resnet",version="1"} 2\n' \
           'ovms_current_requests{name="resnet",version="2"} 1\n'
    assert parse_load(body) == BackendLoad(running=3)


def test_no_known_series_is_no_load() -> None:
    assert parse_load("") is None
    assert parse_load("process_cpu_seconds_total 1.5\n") is None
    only_comments = "# HELP vllm:num_requests_running x\n# TYPE vllm:num_requests_running gauge\n"
    assert parse_load(only_comments) is None


def test_timestamps_escapes_and_odd_spacing_are_read() -> None:
    body = (
        'vllm:num_requests_running{model_name="a b\\"c} d",x="\\\\"} 3 1700000000000\n'
        '  vllm:num_requests_waiting{model_name="{=}"}\t2.0\t-5\r\n'
        'vllm:kv_cache_usage_perc 5e-1\n'
        'vllm:num_requests_running_extra 99\n'  # another series sharing the prefix
    )
    assert parse_load(body) == BackendLoad(running=3, waiting=2, kv_cache_usage=0.5)


def _vllm(running: str = "1", waiting: str = "2", kv: str = "0.5") -> str:
    return (f'vllm:num_requests_running{{model_name="m"}} {running}\n'
            f'vllm:num_requests_waiting{{model_name="m"}} {waiting}\n'
            f'vllm:kv_cache_usage_perc{{model_name="m"}} {kv}\n')


@pytest.mark.parametrize("bad", [
    "NaN", "nan", "+Inf", "-Inf", "Inf", "inf", "-1", "-0.5", "2.5", "1e7", str(MAX_COUNT + 1),
    "1e308", "1e400", "0x10", "1_000", "", "abc", "3 abc", "3 1 2", "3" * 100,
])
def test_a_bad_count_is_none_and_the_rest_stands(bad: str) -> None:
    assert parse_load(_vllm(running=bad)) == BackendLoad(running=None, waiting=2,
                                                        kv_cache_usage=0.5)
    assert parse_load(_vllm(waiting=bad)) == BackendLoad(running=1, waiting=None,
                                                        kv_cache_usage=0.5)


@pytest.mark.parametrize("bad", ["NaN", "+Inf", "-Inf", "-0.1", "1.5", "50", "100", "1e9", "x"])
def test_a_bad_ratio_is_none_and_the_rest_stands(bad: str) -> None:
    # No engine here documents a percent: 50 is not read as 0.5.
    assert parse_load(_vllm(kv=bad)) == BackendLoad(running=1, waiting=2, kv_cache_usage=None)


def test_one_bad_label_set_spoils_the_sum() -> None:
    body = ('vllm:num_requests_running{model_name="a"} 3\n'
            'vllm:num_requests_running{model_name="b"} NaN\n'
            'vllm:num_requests_waiting{model_name="a"} 600000\n'
            'vllm:num_requests_waiting{model_name="b"} 600000\n')  # sum above MAX_COUNT
    assert parse_load(body) is None


def test_unterminated_labels_are_a_bad_sample() -> None:
    body = 'vllm:num_requests_running{model_name="a} 3\nvllm:num_requests_waiting 2\n'
    assert parse_load(body) == BackendLoad(waiting=2)


def test_all_readings_bad_is_no_load() -> None:
    assert parse_load(_vllm("NaN", "+Inf", "-Inf")) is None


def test_binary_garbage_and_non_utf8_never_raise() -> None:
    rng = random.Random(16)
    assert parse_load(bytes(rng.randrange(256) for _ in range(100_000))) is None
    # Valid lines among invalid bytes still count; the bad bytes only spoil their line.
    body = b"\xff\xfe\x00garbage\n" + _vllm().encode() + b"\x80\x81\n\x00\x00"
    assert parse_load(body) == BackendLoad(running=1, waiting=2, kv_cache_usage=0.5)
    assert parse_load(b'vllm:num_requests_running{model_name="\xff"} 4\n') == \
        BackendLoad(running=4)


def test_mutated_bodies_never_raise() -> None:
    """A cheap fuzz: every engine's body, cut and spliced with random bytes."""
    rng = random.Random(29)
    bodies = [b.encode() for b in (VLLM_NEW, VLLM_OLD, SGLANG, LLAMACPP, OVMS)]
    for _ in range(3000):
        body = bytearray(rng.choice(bodies))
        for _ in range(rng.randrange(1, 8)):
            at = rng.randrange(len(body))
            body[at:at + rng.randrange(4)] = bytes(rng.randrange(256)
                                                   for _ in range(rng.randrange(4)))
        load = parse_load(bytes(body))
        if load is not None:
            for count in (load.running, load.waiting):
                assert count is None or 0 <= count <= MAX_COUNT
            assert load.kv_cache_usage is None or 0.0 <= load.kv_cache_usage <= 1.0


def test_a_big_body_parses_without_trouble() -> None:
    # 1 MiB of other series (the most the prober reads) around the three readings.
    filler = "".join(f'vllm:other_total{{n="{i}"}} {i}\n' for i in range(40_000))
    started = time.monotonic()
    assert parse_load(filler + _vllm() + filler) == BackendLoad(1, 2, 0.5)
    print(f"parse_load of 1 MiB: {time.monotonic() - started:.3f} s")


# -- the real Prober against an engine that answers anything ----------------------------------

FLOOD = 50 * 1024 * 1024


@dataclass
class Engine:
    """What the fake engine answers; tests change it between probes."""

    metrics: Callable[[web.Request], Any]
    models: Callable[[web.Request], Any] | None = None
    url: str = ""


def body(text: str | bytes) -> Callable[[web.Request], Any]:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(body=text.encode() if isinstance(text, str) else text,
                            content_type="text/plain")
    return handler


def stream(line: bytes, total: int) -> Callable[[web.Request], Any]:
    """A chunked answer of ``total`` bytes (no Content-Length): the reader must stop itself."""
    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_type = "text/plain"
        await resp.prepare(request)
        chunk = line * max(1, (64 * 1024) // len(line))
        sent = 0
        try:
            while sent < total:
                await resp.write(chunk)
                sent += len(chunk)
            await resp.write_eof()
        except (ConnectionError, RuntimeError):
            pass  # the prober hung up, as it should
        return resp
    return handler


@pytest.fixture
async def engine() -> AsyncIterator[Engine]:
    state = Engine(metrics=body(_vllm()))

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def models(request: web.Request) -> web.StreamResponse:
        if state.models is not None:
            return await state.models(request)  # type: ignore[no-any-return]
        return web.json_response({"object": "list", "data": [{"id": MODEL}]})

    async def metrics(request: web.Request) -> web.StreamResponse:
        return await state.metrics(request)  # type: ignore[no-any-return]

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    state.url = f"http://127.0.0.1:{port}"
    try:
        yield state
    finally:
        await runner.cleanup()


@pytest.fixture
async def prober() -> AsyncIterator[Prober]:
    p = Prober(timeout=10.0)
    try:
        yield p
    finally:
        await p.close()


async def test_the_prober_reads_a_good_engine(engine: Engine, prober: Prober) -> None:
    result = await prober.probe(engine.url, "/health", MODEL)
    assert result.ready and result.error is None
    assert result.load == BackendLoad(running=1, waiting=2, kv_cache_usage=0.5)


@pytest.mark.parametrize(("metrics", "load"), [
    (body(_vllm("NaN", "2", "0.5")), BackendLoad(None, 2, 0.5)),
    (body(_vllm("1", "+Inf", "0.5")), BackendLoad(1, None, 0.5)),
    (body(_vllm("1", "2", "-Inf")), BackendLoad(1, 2, None)),
    (body(_vllm("-3", "1e12", "NaN")), None),
    (body(bytes(random.Random(3).randrange(256) for _ in range(200_000))), None),
    (body(b"\xff\xfe" + _vllm().encode()), BackendLoad(None, 2, 0.5)),  # first line spoilt
    # 50 MB, announced by Content-Length: not read at all.
    (body(b"vllm:num_requests_running 1\n" * (FLOOD // 28)), None),
    # 50 MB, chunked: read to the cap, then dropped (a partial sum would be a lie).
    (stream(b"vllm:num_requests_running 1\n", FLOOD), None),
    (stream(b"\x00\xff" * 512, FLOOD), None),
], ids=["nan", "inf", "-inf", "all-bad", "binary", "non-utf8", "50MB", "50MB-chunked",
        "50MB-binary"])
async def test_hostile_metrics_cost_only_the_bad_readings(
        engine: Engine, prober: Prober, metrics: Callable[[web.Request], Any],
        load: BackendLoad | None) -> None:
    engine.metrics = metrics
    started = time.monotonic()
    # Bounded below the prober's 10 s timeout: a body the prober waited out would fail here.
    result = await asyncio.wait_for(prober.probe(engine.url, "/health", MODEL), 8)
    print(f"probe took {time.monotonic() - started:.2f} s")
    assert result == ProbeResult(True, result.latency_s, load, None)


async def test_a_metrics_error_status_or_hangup_is_no_load(engine: Engine,
                                                           prober: Prober) -> None:
    async def error(request: web.Request) -> web.Response:
        return web.Response(status=500, text="vllm:num_requests_running 3\n")

    async def hangup(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        request.transport.close()
        return web.Response()

    for handler in (error, hangup):
        engine.metrics = handler
        result = await prober.probe(engine.url, "/health", MODEL)
        assert result.ready and result.load is None


@pytest.mark.parametrize("models", [
    body(b"[" * 200_000 + b"]" * 200_000),  # deep enough to exhaust the recursion limit
    body(b"\xff\xfe\x00{"),
    body(b'{"data": [' + b'{"id": "x"},' * (MAX_BODY_BYTES // 11) + b'{"id": "' +
         MODEL.encode() + b'"}]}'),  # over the cap: not read, not listed
    stream(b"x", FLOOD),
], ids=["deep-json", "non-utf8", "over-cap", "50MB-chunked"])
async def test_a_hostile_models_answer_is_a_failed_probe(
        engine: Engine, prober: Prober, models: Callable[[web.Request], Any]) -> None:
    engine.models = models
    result = await prober.probe(engine.url, "/health", MODEL)
    assert not result.ready and result.load is None and result.error


# -- a real Supervisor's probe loop outlives hostile engines and its own bugs ---------------

def _supervisor(tmp_path: Path, urls: dict[str, str]) -> Supervisor:
    backends = [BackendConfig(name=name, model=MODEL, engine="vllm", port=8001 + i)
                for i, name in enumerate(urls)]
    config = AgentConfig(node_name="probe-test", probe_interval=0.05, backend=backends,
                         models_dir=str(tmp_path), sysfs_root=str(tmp_path))
    sup = Supervisor(config, DockerAdapter("unix:///nonexistent.sock"),
                     AgentMetrics(CollectorRegistry(), "probe-test"), gpus=lambda: ([], []))
    for name, url in urls.items():
        s = sup.status[name]
        # What _probe and the record read of a running container's spec.
        s.spec = SimpleNamespace(url=url, health_path="/health", api_path="/v1",  # type: ignore[assignment]
                                 vendor=None, gpu_uuids=[])
        s.container_id = f"c-{name}"
    return sup


async def _until(cond: Callable[[], bool], what: str, task: asyncio.Task[None]) -> None:
    deadline = time.monotonic() + 20
    while not cond():
        assert not task.done(), f"the probe loop ended: {task}"
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)


async def test_the_probe_loop_lives_through_hostile_metrics(engine: Engine,
                                                            tmp_path: Path) -> None:
    """The user-facing fault: NaN in /metrics ended the agent's probe loop (int(nan))."""
    engine.metrics = body(_vllm("NaN", "+Inf", "0.5"))
    sup = _supervisor(tmp_path, {"hostile": engine.url})
    s = sup.status["hostile"]
    task = asyncio.create_task(sup.probe_loop(), name="probe-loop")
    try:
        await _until(lambda: s.state == "ready", "the hostile backend ready", task)
        assert s.load == BackendLoad(None, None, 0.5)
        for hostile in (body(b"\x00\xff" * 1000), stream(b"vllm:x 1\n", FLOOD),
                        body(_vllm("-1", "NaN", "-Inf"))):
            engine.metrics = hostile
            s.load = BackendLoad(0, 0, 0.0)  # a marker the next probe replaces
            await _until(lambda: s.load is None, "the load dropped", task)
            assert s.state == "ready"
        engine.metrics = body(_vllm())
        await _until(lambda: s.load == BackendLoad(1, 2, 0.5), "the load read again", task)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


class BuggyProber(Prober):
    """The real prober, except that it raises for one url, as a bug would."""

    def __init__(self, broken: str) -> None:
        super().__init__(timeout=5.0)
        self.broken = broken
        self.calls: dict[str, int] = {}

    async def probe(self, url: str, health_path: str, model: str,
                    api_path: str = "/v1") -> ProbeResult:
        self.calls[url] = self.calls.get(url, 0) + 1
        if url == self.broken:
            raise ValueError("cannot convert float NaN to integer")
        return await super().probe(url, health_path, model, api_path)


async def test_a_probe_that_raises_is_a_failed_probe_not_the_end(engine: Engine,
                                                                 tmp_path: Path) -> None:
    broken = "http://127.0.0.1:9"  # never contacted: the prober raises first
    sup = _supervisor(tmp_path, {"good": engine.url, "buggy": broken})
    prober = BuggyProber(broken)
    sup._prober = prober
    good, buggy = sup.status["good"], sup.status["buggy"]
    buggy.state = "ready"  # it was ready; failed probes must take it out of routing
    task = asyncio.create_task(sup.probe_loop(), name="probe-loop")
    try:
        await _until(lambda: prober.calls.get(engine.url, 0) >= 5,
                     "the good backend probed round after round", task)
        assert good.state == "ready" and good.load == BackendLoad(1, 2, 0.5)
        assert buggy.probe_fails >= 4
        assert buggy.state == "unhealthy"
        assert buggy.error is not None and "probe raised" in buggy.error
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
