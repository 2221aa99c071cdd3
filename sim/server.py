"""The sim engine's HTTP server: a small OpenAI-compatible API with vLLM-named load metrics.

It stands in for vLLM wherever no GPU exists (the demo, every test). Its knobs
(:class:`SimSettings`) change live through ``GET/POST /sim/config`` so a test can make one
backend slow, failing or unhealthy while the rest of the system watches.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import random
import socket
import struct
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
from aiohttp import web

from sim import generate
from sim.engine import Engine
from sim.settings import SettingsError, SimSettings

__all__ = ["STATE", "SimSettings", "SimState", "create_app"]

# vLLM reports a fraction in 0..1 under this "perc" name; without a concurrency limit the sim
# pretends a request takes this share of the cache.
_CACHE_SHARE_UNLIMITED = 1 / 16

MAX_DIMENSIONS = 65536


class SimState:
    """The live knobs and load of one sim server."""

    def __init__(self, settings: SimSettings, *, seed: int | None = None) -> None:
        self.settings = settings
        self.running: dict[str, int] = {}
        self.waiting: dict[str, int] = {}
        self.success: dict[str, int] = {}
        self.prompt_tokens: dict[str, int] = {}
        self.generation_tokens: dict[str, int] = {}
        self.random = random.Random(seed)
        self._room = asyncio.Condition()
        self.engine = Engine(lambda: self.settings)
        self.started = time.monotonic()

    def loading(self) -> bool:
        """Whether the simulated start-up (``startup_delay_s``) is still under way."""
        return time.monotonic() - self.started < self.settings.startup_delay_s

    def update(self, changes: dict[str, Any]) -> SimSettings:
        """Apply validated knob changes; waiting requests re-check a raised concurrency."""
        self.settings = self.settings.updated(changes)
        return self.settings

    async def wake_waiters(self) -> None:
        async with self._room:
            self._room.notify_all()

    def should_fail(self) -> bool:
        """Whether this request takes the configured fault (``unhealthy`` only hits /health)."""
        s = self.settings
        if s.fail_mode in ("none", "unhealthy"):
            return False
        return s.fail_rate >= 1.0 or self.random.random() < s.fail_rate

    def _has_room(self) -> bool:
        limit = self.settings.max_concurrency
        return limit <= 0 or sum(self.running.values()) < limit

    @contextlib.asynccontextmanager
    async def slot(self, model: str) -> AsyncIterator[None]:
        """Hold one running slot for ``model``, waiting (counted as waiting) while full."""
        self.waiting[model] = self.waiting.get(model, 0) + 1
        try:
            async with self._room:
                await self._room.wait_for(self._has_room)
                self.running[model] = self.running.get(model, 0) + 1
        finally:
            self.waiting[model] -= 1
        try:
            yield
        finally:
            self.running[model] -= 1
            # Shielded: a cancelled request must still hand its slot to a waiting one.
            await asyncio.shield(self.wake_waiters())

    def counts(self, model: str) -> tuple[int, int]:
        """(running, waiting) requests of ``model``; with the engine model, its batch and
        its queue (plus any held back by ``max_concurrency``)."""
        if not self.settings.engine:
            return self.running.get(model, 0), self.waiting.get(model, 0)
        running, waiting = self.engine.count(model)
        return running, waiting + self.waiting.get(model, 0)

    def cache_usage(self, model: str) -> float:
        if self.settings.engine:
            return self.engine.kv_usage()
        limit = self.settings.max_concurrency
        running = self.running.get(model, 0)
        return min(1.0, running / limit if limit > 0 else running * _CACHE_SHARE_UNLIMITED)


STATE = web.AppKey("sim_state", SimState)


def create_app(settings: SimSettings | None = None, *, seed: int | None = None) -> web.Application:
    """The sim's aiohttp application, serving ``settings`` (defaults if None).

    Run it with ``handler_cancellation=True`` on the runner, so a request whose client gave up
    (a hanging one above all) stops counting as running.
    """
    settings = settings or SimSettings()
    settings.validate()
    app = web.Application(client_max_size=16 * 1024 * 1024,
                          middlewares=[_engine_key, _starting_up])
    app[STATE] = SimState(settings, seed=seed)
    app.on_response_prepare.append(_label_response)
    app.router.add_post("/v1/chat/completions", _chat_completions)
    app.router.add_post("/v1/completions", _completions)
    app.router.add_post("/v1/embeddings", _embeddings)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/health", _health)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/sim/config", _get_config)
    app.router.add_post("/sim/config", _post_config)
    app.router.add_post("/reset_prefix_cache", _reset_prefix_cache)
    app.on_cleanup.append(_stop_engine)
    return app


async def _stop_engine(app: web.Application) -> None:
    await app[STATE].engine.close()


@web.middleware
async def _engine_key(request: web.Request, handler: Any) -> web.StreamResponse:
    """The api_key knob, as vLLM's --api-key: the API and the knobs need the key."""
    key = request.app[STATE].settings.api_key
    if key and request.path.startswith(("/v1/", "/sim/")) and not hmac.compare_digest(
            request.headers.get("Authorization", "").encode(), f"Bearer {key}".encode()):
        return _error(401, "invalid api key", type_="authentication_error",
                      code="invalid_api_key")
    response: web.StreamResponse = await handler(request)
    return response


@web.middleware
async def _starting_up(request: web.Request, handler: Any) -> web.StreamResponse:
    """During ``startup_delay_s`` only the knobs and metrics answer, as an engine loading
    its weights: /health is 503, /v1/models is empty, requests get 503."""
    if request.app[STATE].loading() and not request.path.startswith("/sim/") \
            and request.path != "/metrics":
        if request.path == "/v1/models":
            return web.json_response({"object": "list", "data": []})
        return web.Response(status=503, text="loading (simulated start-up)\n")
    response: web.StreamResponse = await handler(request)
    return response


async def _label_response(request: web.Request, response: web.StreamResponse) -> None:
    # Tests and the scheduler's logs need to see which instance answered.
    response.headers["x-sim-name"] = request.app[STATE].settings.node_label


# --- errors -----------------------------------------------------------------------------------

def _error(status: int, message: str, *, type_: str = "invalid_request_error",
           param: str | None = None, code: str | int | None = None) -> web.Response:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


class _Reject(Exception):
    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response


async def _read_json(request: web.Request) -> dict[str, Any]:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError as err:
        raise _Reject(_error(400, f"request body is not valid JSON: {err}")) from None
    if not isinstance(body, dict):
        raise _Reject(_error(400, "request body must be a JSON object"))
    return body


def _check_model(state: SimState, body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _Reject(_error(400, "model: a model id is required", param="model"))
    if model not in state.settings.models:
        raise _Reject(_error(404, f"The model `{model}` does not exist.", param="model",
                             code="model_not_found"))
    return model


def _max_tokens(body: dict[str, Any], keys: tuple[str, ...]) -> int | None:
    for key in keys:
        value = body.get(key)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise _Reject(_error(400, f"{key}: expected a positive integer", param=key))
        return value
    return None


def _abort_connection(request: web.Request) -> None:
    """Drop the connection with a TCP reset, as a crashed engine would."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


async def _hang(request: web.Request) -> web.StreamResponse:
    # Never answer. The runner cancels handlers whose client went away
    # (handler_cancellation=True), which releases the slot.
    await asyncio.Event().wait()
    return web.Response(status=499)


async def _fault_before(request: web.Request, state: SimState) -> web.StreamResponse | None:
    """The response for a fault that strikes before any output, or None."""
    mode = state.settings.fail_mode
    if mode == "status":
        status = state.settings.fail_status
        return _error(status, f"simulated failure ({status})", type_="server_error",
                      code=status)
    if mode == "reset":
        _abort_connection(request)
        return web.Response(status=500)
    if mode == "hang":
        return await _hang(request)
    return None


# --- inference ----------------------------------------------------------------------------------

ChunkMaker = Callable[[str | None, str | None], dict[str, Any]]


async def _generate(request: web.Request, *, model: str, prompt: str, max_tokens: int | None,
                    stream: bool, include_usage: bool, chunk: ChunkMaker,
                    final: Callable[[str, str], dict[str, Any]]) -> web.StreamResponse:
    """Shared body of chat and text completions: pacing, faults, streaming, usage."""
    state = request.app[STATE]
    fail = state.should_fail()
    if fail and (response := await _fault_before(request, state)) is not None:
        return response
    settings = state.settings
    n = min(settings.chunks, max_tokens) if max_tokens else settings.chunks
    finish = "length" if max_tokens is not None and max_tokens < settings.chunks else "stop"
    tokens = generate.answer_tokens(prompt, n)
    usage = {"prompt_tokens": generate.count_tokens(prompt), "completion_tokens": n,
             "total_tokens": generate.count_tokens(prompt) + n}
    gap = 1.0 / settings.tokens_per_second if settings.tokens_per_second > 0 else 0.0
    die_after = max(1, n // 2) if fail and settings.fail_mode == "die_mid_stream" else None

    if settings.engine:
        return await _generate_engine(request, model=model, prompt=prompt, stream=stream,
                                      include_usage=include_usage, chunk=chunk, final=final,
                                      tokens=tokens, finish=finish, usage=usage,
                                      die_after=die_after)
    await asyncio.sleep(settings.latency_ms / 1000)
    if not stream:
        await asyncio.sleep(gap * (n - 1))
        return await _whole(request, state, model, final("".join(tokens), finish), usage,
                            die_after)

    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
    await response.prepare(request)
    for i, token in enumerate(tokens):
        if i:
            await asyncio.sleep(gap)
        if die_after is not None and i == die_after:
            _abort_connection(request)
            return response
        await _sse(response, chunk(token, None))
    return await _stream_end(response, state, model, chunk, finish, include_usage, usage)


async def _whole(request: web.Request, state: SimState, model: str, answer: dict[str, Any],
                 usage: dict[str, int], die_after: int | None) -> web.StreamResponse:
    """A non-streamed answer (half of it, then a reset, for ``die_mid_stream``)."""
    body = orjson.dumps(answer | {"usage": usage})
    if die_after is not None:
        # Promise the whole body, send half of it, then drop the connection.
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = len(body)
        await response.prepare(request)
        await response.write(body[: len(body) // 2])
        _abort_connection(request)
        return response
    _count_success(state, model, usage)
    return web.Response(body=body, content_type="application/json")


async def _stream_end(response: web.StreamResponse, state: SimState, model: str,
                      chunk: ChunkMaker, finish: str, include_usage: bool,
                      usage: dict[str, int]) -> web.StreamResponse:
    await _sse(response, chunk(None, finish))
    if include_usage:
        await _sse(response, chunk(None, None) | {"choices": [], "usage": usage})
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    _count_success(state, model, usage)
    return response


async def _generate_engine(request: web.Request, *, model: str, prompt: str, stream: bool,
                           include_usage: bool, chunk: ChunkMaker,
                           final: Callable[[str, str], dict[str, Any]], tokens: list[str],
                           finish: str, usage: dict[str, int],
                           die_after: int | None) -> web.StreamResponse:
    """Chat and text completions paced by the engine model (sim/engine.py)."""
    state = request.app[STATE]
    engine = state.engine
    seq = engine.submit(model, prompt, len(tokens))
    try:
        if not stream:
            while seq.produced < len(tokens):
                await seq.next_token()
            return await _whole(request, state, model, final("".join(tokens), finish), usage,
                                die_after)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
        sent = 0
        while sent < len(tokens):
            produced = await seq.next_token()
            if not sent:
                await response.prepare(request)
            # Tokens that came while the last write waited go out one chunk each, as an
            # engine's detokenizer sends them.
            while sent < produced:
                if die_after is not None and sent == die_after:
                    _abort_connection(request)
                    return response
                await _sse(response, chunk(tokens[sent], None))
                sent += 1
        return await _stream_end(response, state, model, chunk, finish, include_usage, usage)
    finally:
        engine.cancel(seq)


async def _sse(response: web.StreamResponse, data: dict[str, Any]) -> None:
    await response.write(b"data: " + orjson.dumps(data) + b"\n\n")


def _count_success(state: SimState, model: str, usage: dict[str, int]) -> None:
    state.success[model] = state.success.get(model, 0) + 1
    state.prompt_tokens[model] = state.prompt_tokens.get(model, 0) + usage["prompt_tokens"]
    state.generation_tokens[model] = (state.generation_tokens.get(model, 0)
                                      + usage["completion_tokens"])


def _stream_flags(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = bool(body.get("stream", False))
    options = body.get("stream_options")
    include_usage = stream and isinstance(options, dict) and bool(options.get("include_usage"))
    return stream, include_usage


async def _chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    try:
        body = await _read_json(request)
        model = _check_model(state, body)
        try:
            prompt = generate.chat_prompt(body.get("messages"))
        except ValueError as err:
            raise _Reject(_error(400, str(err), param="messages")) from None
        max_tokens = _max_tokens(body, ("max_completion_tokens", "max_tokens"))
    except _Reject as reject:
        return reject.response
    stream, include_usage = _stream_flags(body)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    first = [True]

    def chunk(token: str | None, finish: str | None) -> dict[str, Any]:
        delta: dict[str, Any] = {}
        if first[0]:
            delta["role"] = "assistant"
            first[0] = False
        if token is not None:
            delta["content"] = token
        return {"id": rid, "object": "chat.completion.chunk", "created": created,
                "model": model, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                             "finish_reason": finish}]}

    def final(text: str, finish: str) -> dict[str, Any]:
        return {"id": rid, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": None, "finish_reason": finish}]}

    async with state.slot(model):
        return await _generate(request, model=model, prompt=prompt, max_tokens=max_tokens,
                               stream=stream, include_usage=include_usage, chunk=chunk,
                               final=final)


async def _completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    try:
        body = await _read_json(request)
        model = _check_model(state, body)
        try:
            prompt = generate.completion_prompt(body.get("prompt"))
        except ValueError as err:
            raise _Reject(_error(400, str(err), param="prompt")) from None
        max_tokens = _max_tokens(body, ("max_tokens",))
    except _Reject as reject:
        return reject.response
    stream, include_usage = _stream_flags(body)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(token: str | None, finish: str | None) -> dict[str, Any]:
        return {"id": rid, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": token or "", "logprobs": None,
                             "finish_reason": finish}]}

    def final(text: str, finish: str) -> dict[str, Any]:
        return {"id": rid, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": text, "logprobs": None,
                             "finish_reason": finish}]}

    async with state.slot(model):
        return await _generate(request, model=model, prompt=prompt, max_tokens=max_tokens,
                               stream=stream, include_usage=include_usage, chunk=chunk,
                               final=final)


async def _embeddings(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    try:
        body = await _read_json(request)
        model = _check_model(state, body)
        try:
            inputs = generate.embedding_inputs(body.get("input"))
        except ValueError as err:
            raise _Reject(_error(400, str(err), param="input")) from None
        dim = body.get("dimensions") or state.settings.embedding_dim
        # Bounded: one request must not stall the engine's loop building a giant vector.
        if not isinstance(dim, int) or isinstance(dim, bool) or not 1 <= dim <= MAX_DIMENSIONS:
            raise _Reject(_error(400, f"dimensions: expected an integer 1..{MAX_DIMENSIONS}",
                                 param="dimensions"))
        as_base64 = body.get("encoding_format") == "base64"
    except _Reject as reject:
        return reject.response
    async with state.slot(model):
        fail = state.should_fail()
        if fail and (response := await _fault_before(request, state)) is not None:
            return response
        await asyncio.sleep(state.settings.latency_ms / 1000)
        data = []
        for i, text in enumerate(inputs):
            vector = generate.embedding(text, dim)
            data.append({"object": "embedding", "index": i,
                         "embedding": generate.encode_base64(vector) if as_base64 else vector})
        prompt_tokens = sum(generate.count_tokens(t) for t in inputs)
        payload = orjson.dumps({"object": "list", "data": data, "model": model,
                                "usage": {"prompt_tokens": prompt_tokens,
                                          "total_tokens": prompt_tokens}})
        if fail and state.settings.fail_mode == "die_mid_stream":
            response = web.StreamResponse(headers={"Content-Type": "application/json"})
            response.content_length = len(payload)
            await response.prepare(request)
            await response.write(payload[: len(payload) // 2])
            _abort_connection(request)
            return response
        _count_success(state, model, {"prompt_tokens": prompt_tokens, "completion_tokens": 0})
        return web.Response(body=payload, content_type="application/json")


# --- the rest of the surface --------------------------------------------------------------------

async def _models(request: web.Request) -> web.Response:
    created = int(time.time())
    data = [{"id": m, "object": "model", "created": created, "owned_by": "aivmm-sim"}
            for m in request.app[STATE].settings.models]
    return web.json_response({"object": "list", "data": data}, dumps=_dumps)


async def _health(request: web.Request) -> web.Response:
    if request.app[STATE].settings.fail_mode == "unhealthy":
        return web.Response(status=503, text="unhealthy (simulated)\n")
    return web.Response(text="ok\n")


async def _metrics(request: web.Request) -> web.Response:
    return web.Response(text=render_metrics(request.app[STATE]),
                        content_type="text/plain", charset="utf-8",
                        headers={"X-Content-Type-Options": "nosniff"})


def render_metrics(state: SimState) -> str:
    """Prometheus text exposition with vLLM's metric names, one series per served model."""
    models = state.settings.models
    families: list[tuple[str, str, str, Callable[[str], float]]] = [
        ("vllm:num_requests_running", "gauge", "Number of requests currently running.",
         lambda m: state.counts(m)[0]),
        ("vllm:num_requests_waiting", "gauge", "Number of requests waiting to run.",
         lambda m: state.counts(m)[1]),
        ("vllm:gpu_cache_usage_perc", "gauge", "KV-cache usage; 1 means 100 percent.",
         state.cache_usage),
        ("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage; 1 means 100 percent.",
         state.cache_usage),
        # The engine is one device: its cache counters are the same for every model.
        ("vllm:prefix_cache_queries_total", "counter",
         "Prefix cache queries, in terms of number of queried tokens.",
         lambda _m: state.engine.queries),
        ("vllm:prefix_cache_hits_total", "counter",
         "Prefix cache hits, in terms of number of cached tokens.",
         lambda _m: state.engine.hits),
        ("vllm:request_success_total", "counter", "Requests finished successfully.",
         lambda m: state.success.get(m, 0)),
        ("vllm:prompt_tokens_total", "counter", "Prompt tokens processed.",
         lambda m: state.prompt_tokens.get(m, 0)),
        ("vllm:generation_tokens_total", "counter", "Generation tokens produced.",
         lambda m: state.generation_tokens.get(m, 0)),
    ]
    lines: list[str] = []
    for name, kind, help_text, value in families:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for model in models:
            label = model.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
            lines.append(f'{name}{{model_name="{label}"}} {float(value(model))}')
    return "\n".join(lines) + "\n"


async def _reset_prefix_cache(request: web.Request) -> web.Response:
    """vLLM's ``POST /reset_prefix_cache``: forget every cached block (benchmarks use it to
    give each run the same cold start)."""
    request.app[STATE].engine.reset_cache()
    return web.Response(text="ok\n")


async def _get_config(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE].settings.as_json(), dumps=_dumps)


async def _post_config(request: web.Request) -> web.Response:
    state = request.app[STATE]
    try:
        changes = await _read_json(request)
    except _Reject as reject:
        return reject.response
    try:
        settings = state.update(changes)
    except SettingsError as err:
        return _error(400, str(err))
    await state.wake_waiters()
    return web.json_response(settings.as_json(), dumps=_dumps)


def _dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()
