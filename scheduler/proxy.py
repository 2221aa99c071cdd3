"""Forwarding one OpenAI request to a backend: choice, failover, streaming, accounting.

The body is read once, only its ``model`` is looked at, and the raw bytes go upstream
unchanged. Nothing reaches the client until the backend's first body chunk has arrived, so
every failure before that point (refused or reset connection, timeout, 502/503/504) can be
retried on another backend, within ``max_attempts`` and the retry budget. Once bytes have
been sent nothing is retried: a broken SSE stream ends with an OpenAI error event.
A client that stops reading is the client's doing, not the backend's: each write to it has
its own time limit, ``client_write_timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from scheduler.apikeys import HIDE_USAGE
from scheduler.budget import RetryBudget
from scheduler.errors import error_response, sse_error_event
from scheduler.metrics import SchedulerMetrics
from scheduler.request import REQUEST_DATA
from scheduler.routing import Backend, Pool, Router
from scheduler.tap import TAP

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({502, 503, 504})
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "trailers", "transfer-encoding", "upgrade", "proxy-connection",
})
# Request headers the proxy sets itself or that only concern the client's hop. The server
# has already decoded a compressed request body, so its Content-Encoding no longer holds.
# Expect: 100-continue was answered on the client's hop (the body is read whole before any
# attempt); passed on, it would make the upstream request wait for a 100 of its own.
_DROP_REQUEST = HOP_BY_HOP | {"host", "content-length", "content-encoding", "expect"}
BACKEND_HEADER = "x-aivmm-backend"
# Bodies with a Content-Length up to this size are read whole before the answer starts.
WHOLE_BODY_MAX = 1 << 20


@dataclass(frozen=True, slots=True)
class ProxySettings:
    """The knobs of forwarding, from SchedulerConfig."""

    connect_timeout: float = 3.0
    first_byte_timeout: float = 120.0
    stream_idle_timeout: float = 60.0
    request_timeout: float = 600.0
    queue_timeout: float = 5.0
    max_attempts: int = 3
    strip_authorization: bool = False
    client_write_timeout: float = 30.0
    # docs/security.md: no backend names to clients; connections per backend; the key the
    # engines demand, presented instead of the client's Authorization.
    hide_names: bool = False
    max_connections_per_backend: int = 0
    engine_api_key: str | None = None


class _Failed(Exception):
    """An attempt that failed before any byte reached the client; may be retried."""

    def __init__(self, reason: str, refused: bool = False, timeout: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.refused = refused
        self.timeout = timeout


class _ClientAbort(Exception):
    """The client ended a response already under way: it went away, or stopped reading for
    ``client_write_timeout``. Carries the response for the handler to return."""

    def __init__(self, reason: str, response: web.StreamResponse) -> None:
        super().__init__(reason)
        self.reason = reason
        self.response = response


def _drop_set(headers: Mapping[str, str], base: frozenset[str]) -> frozenset[str]:
    # Headers named in Connection are hop-by-hop too (RFC 9110 7.6.1).
    conn = headers.get("Connection")
    if not conn:
        return base
    return base | frozenset(h.strip().lower() for h in conn.split(","))


class Proxy:
    """Owns the upstream session and forwards requests; one per application."""

    def __init__(self, router: Router, budget: RetryBudget, metrics: SchedulerMetrics,
                 settings: ProxySettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.router = router
        self.budget = budget
        self.metrics = metrics
        self.settings = settings
        self.clock = clock
        self.session: aiohttp.ClientSession | None = None
        self._changed = asyncio.Event()
        self._request_drop = _DROP_REQUEST | (
            frozenset({"authorization"})
            if settings.strip_authorization or settings.engine_api_key else frozenset())
        self._engine_auth = (None if settings.engine_api_key is None
                             else ("Authorization", f"Bearer {settings.engine_api_key}"))
        # Upstream responses being relayed; cut (with an SSE error event) when stopping.
        self._relaying: set[aiohttp.ClientResponse] = set()
        self.stopping = False
        # Metric children by (metric, labels): labels() takes a lock and builds a key on
        # every call, a few µs a request on the hot path.
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        # (model, backend, reason) of each failover, for the status page's recent list.
        self.on_failover: Callable[[str, str, str], None] = lambda *_: None
        router.on_remove = self.forget
        # Scale from zero (docs/autoscaling.md): how long a request for a pool with no
        # ready backend may queue instead of queue_timeout (None: the pool is not cold), at
        # most ``cold_start_queue`` per pool; requests queued per pool for the load record,
        # and ``on_queue`` told of each one that starts to wait.
        self.cold_start: Callable[[object], float | None] = lambda _pool: None
        self.cold_start_queue = 0
        self.waiting: dict[object, int] = {}
        self.on_queue: Callable[[object], None] = lambda _pool: None

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=0, limit_per_host=self.settings.max_connections_per_backend,
            ttl_dns_cache=300, keepalive_timeout=30)
        self.session = aiohttp.ClientSession(
            # Bodies pass through undecoded, so ask for no encoding the client did not ask for.
            connector=connector, auto_decompress=False,
            # One session serves every client: a cookie a backend set for one must not be
            # kept and sent with everyone's requests (and the jar costs ~10 µs a request).
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept"),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.settings.connect_timeout),
            read_bufsize=2 ** 16)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None

    def strip_authorization(self, on: bool) -> None:
        """Keep the client's Authorization header from the backends (keys are in use)."""
        auth = frozenset({"authorization"})
        self._request_drop = self._request_drop | auth if on else self._request_drop - auth

    def cut_streams(self) -> None:
        """The scheduler stops and the drain is over: end every relay still running (an SSE
        stream gets an error event, not a cut); the backends are not blamed."""
        self.stopping = True
        for up in list(self._relaying):
            up.close()

    def notify(self) -> None:
        """The table changed: wake every request queued for a backend."""
        self._changed.set()
        self._changed = asyncio.Event()

    # -- accounting --------------------------------------------------------------------------

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def count(self, model: str, backend: str, status: int) -> None:
        """Count one answered request (model and backend empty for a rejected one)."""
        self._child(self.metrics.requests, model, backend, str(status)).inc()

    def forget(self, b: Backend) -> None:
        """``b`` left the table: drop its metric series (and the cached children of them)."""
        self.metrics.forget_backend(b.key)
        for key in [k for k in self._children if b.key in k[1]]:
            del self._children[key]

    def _fail(self, b: Backend, model: str, err: _Failed, now: float) -> None:
        self.metrics.failovers.labels(model, b.key, err.reason).inc()
        self.on_failover(model, b.key, err.reason)
        self._failure(b, now, err.reason, refused=err.refused)

    def _failure(self, b: Backend, now: float, reason: str, refused: bool = False) -> None:
        if b.ejection.failure(now, refused=refused):
            self.metrics.ejections.labels(b.key).inc()
            log.warning("backend ejected", extra={
                "backend": b.key, "reason": reason, "for_s": b.ejection.backoff_s})

    # -- the request -------------------------------------------------------------------------

    async def _wait_for_backend(self, model: Pool, deadline: float,
                                exclude: Callable[[], Collection[Backend]] = tuple,
                                ) -> Backend | None:
        """Queue until a usable backend (not in ``exclude()``) appears or the deadline passes."""
        cold = self.cold_start(model)
        if cold is not None:
            # The model is starting from zero: wait for its replica, but not without bound.
            if self.cold_start_queue and self.waiting.get(model, 0) >= self.cold_start_queue:
                return None
            deadline = max(deadline, self.clock() + cold)
        self.waiting[model] = self.waiting.get(model, 0) + 1
        self.on_queue(model)
        self.metrics.queued.inc()
        try:
            while True:
                now = self.clock()
                b = self.router.choose(model, now, exclude())
                if b is not None:
                    return b
                remaining = deadline - now
                if remaining <= 0:
                    return None
                nxt = self.router.next_change(model, now)
                wait = remaining if nxt is None else min(remaining, max(nxt - now, 0.001))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), wait)
        finally:
            self.metrics.queued.dec()
            left = self.waiting[model] - 1
            if left:
                self.waiting[model] = left
            else:
                del self.waiting[model]

    async def forward(self, request: web.Request, body: bytes, model: str, *,
                      pool: Pool | None = None) -> web.StreamResponse:
        """Send ``body`` to a backend of ``model`` (of ``pool`` when given: a route's
        target deployment) and stream its answer back.

        A backend silent for ``first_byte_timeout`` counts as failed and the request goes
        elsewhere. For a non-streaming request the first byte comes only when generation
        ends, so ``first_byte_timeout`` must exceed the longest answer expected unstreamed.
        """
        s = self.settings
        key: Pool = model if pool is None else pool
        start = self.clock()
        self.budget.request(start)
        self.metrics.inflight.inc()
        status = 0
        backend_key = ""
        try:
            # What the body says that matters to the choice (prefix key, answer length,
            # stream): parsed only when there is a choice to make.
            hint = self.router.hint(key, body, request.get(REQUEST_DATA))
            b = self.router.choose(key, start, hint=hint)
            if b is None:
                b = await self._wait_for_backend(key, start + s.queue_timeout)
                if b is None:
                    status = 503
                    return error_response(
                        503, f"no ready backend for model '{model}'", "no_backend",
                        headers={"Retry-After": "1"})
            drop = _drop_set(request.headers, self._request_drop)
            headers = [(k, v) for k, v in request.headers.items() if k.lower() not in drop]
            if self._engine_auth is not None:
                headers.append(self._engine_auth)
            # The relative URL, not raw_path: for an absolute-form target
            # ("POST http://host/v1/...") raw_path is the whole URL.
            url_path = str(request.rel_url)
            tried: list[Backend] = []
            tried_at: dict[str, int] = {}

            def still_out() -> list[Backend]:
                # A backend already tried is out of this request's choice, unless its agent
                # has since reported it ready again (it was restarted, not merely slow).
                return [t for t in tried if t.revivals == tried_at[t.key]]

            last: _Failed | None = None
            deadline = start + s.request_timeout
            while True:
                tried.append(b)
                tried_at[b.key] = b.revivals
                backend_key = b.key
                try:
                    resp = await self._attempt(request, b, model, url_path, headers, body,
                                               deadline=deadline,
                                               can_retry=lambda: self._can_retry(
                                                   model, len(tried), still_out(), key))
                    status = resp.status
                    return resp
                except _ClientAbort as abort:
                    status = 499
                    return abort.response
                except _Failed as err:
                    last = err
                    now = self.clock()
                    self._fail(b, model, err, now)
                    log.info("attempt failed", extra={
                        "backend": b.key, "model": model, "reason": err.reason})
                    nxt = None
                    if len(tried) < s.max_attempts and now < deadline:
                        nxt = self.router.choose(key, now, exclude=still_out(), hint=hint)
                        if nxt is None:
                            # Every other backend is briefly out (ejected, or restarting
                            # after the same crash): queue for one, as a new request would,
                            # rather than fail at once.
                            nxt = await self._wait_for_backend(
                                key, min(start + s.queue_timeout, deadline), still_out)
                    if nxt is None:
                        break
                    if not self.budget.try_retry(now):
                        self.metrics.budget_refusals.labels(model).inc()
                        break
                    b = nxt
            status = 504 if last is not None and last.timeout else 502
            who = "a backend" if s.hide_names else f"backend {backend_key}"
            return error_response(status, f"{who} failed: {last}",
                                  "upstream_failed",
                                  headers={BACKEND_HEADER: backend_key})
        except asyncio.CancelledError:
            status = 499  # the client went away; nginx's code for it
            if request.transport is None or request.transport.is_closing():
                self.metrics.client_aborts.labels("disconnected").inc()
            raise
        finally:
            self.metrics.inflight.dec()
            self.count(model, backend_key, status)
            self._child(self.metrics.duration, model).observe(self.clock() - start)

    def _can_retry(self, model: str, attempts: int, out: list[Backend],
                   pool: Pool | None = None) -> bool:
        now = self.clock()
        if (attempts >= self.settings.max_attempts
                or self.router.choose(model if pool is None else pool, now,
                                      exclude=out) is None):
            return False
        if not self.budget.can_retry(now):
            self.metrics.budget_refusals.labels(model).inc()
            return False
        return True

    async def _attempt(self, request: web.Request, b: Backend, model: str, path: str,
                       headers: list[tuple[str, str]], body: bytes, *, deadline: float,
                       can_retry: Callable[[], bool]) -> web.StreamResponse:
        s = self.settings
        assert self.session is not None
        b.inflight += 1
        b.pending += 1
        pending = True
        up: aiohttp.ClientResponse | None = None
        finished = False
        try:
            sent = self.clock()
            try:
                async with asyncio.timeout(min(s.first_byte_timeout, deadline - sent)):
                    # Every route is /v1/...; the engine may serve the API elsewhere (/v3).
                    up = await self.session.post(b.api + path[3:], data=body, headers=headers,
                                                 allow_redirects=False)
                    length = up.content_length
                    if length is not None and length <= WHOLE_BODY_MAX:
                        # A small complete answer is taken whole before anything is sent, so
                        # a backend dying half-way through it can still be retried.
                        first = await up.content.readexactly(length) if length else b""
                    else:
                        first = await up.content.readany()
            except aiohttp.ClientConnectorError as err:
                raise _Failed("connect", refused=True) from err
            except TimeoutError as err:
                raise _Failed("timeout", timeout=True) from err
            except (aiohttp.ClientError, ConnectionError, OSError,
                    asyncio.IncompleteReadError) as err:
                raise _Failed("reset") from err
            now = self.clock()
            b.pending -= 1
            pending = False
            if up.status >= 500:
                if up.status in RETRY_STATUSES and can_retry():
                    raise _Failed(f"status_{up.status}")
                # A 5xx the client gets as it is (a 500, or a 502/503/504 with no retry left)
                # is still the backend failing: it counts towards ejection and earns no
                # latency sample, or a backend answering 500 at once would look the fastest
                # and draw nearly all the traffic.
                self._failure(b, now, f"status_{up.status}")
            else:
                b.ejection.success()
                # A non-streamed answer's first byte is the end of generation: its time is
                # kept apart from the time to first token of streams.
                b.observe(now - sent, now, streamed=up.content_type == "text/event-stream",
                          size=len(body))
                self._child(self.metrics.ttfb, model, b.key).observe(now - sent)
                if (tap := request.get(TAP)) is not None:
                    tap.first_byte(now, b.key)
            resp, finished = await self._relay(request, up, b, model, first, deadline)
            return resp
        finally:
            b.inflight -= 1
            if pending:
                b.pending -= 1
            if up is not None:
                if finished:
                    up.release()
                else:
                    # Unread bytes make the connection useless; closing it also tells the
                    # backend to stop generating for a client that left.
                    up.close()
            if self.router.max_inflight:
                self.notify()

    async def _relay(self, request: web.Request, up: aiohttp.ClientResponse, b: Backend,
                     model: str, first: bytes, deadline: float
                     ) -> tuple[web.StreamResponse, bool]:
        """Stream the upstream answer to the client; also says whether it ended cleanly.

        Raises :class:`_ClientAbort` when the client went away or stopped reading.
        """
        s = self.settings
        resp = web.StreamResponse(status=up.status, reason=up.reason)
        drop = _drop_set(up.headers, HOP_BY_HOP)
        out = resp.headers
        for k, v in up.headers.items():
            if k.lower() not in drop:
                out.add(k, v)
        out[BACKEND_HEADER] = b.key
        sse = up.content_type == "text/event-stream"
        # The usage chunk asked for on a key's behalf, which its client did not ask for.
        hide = request.get(HIDE_USAGE) if sse else None
        if hide is not None:
            out.popall("Content-Length", None)
        tap = request.get(TAP)
        if tap is not None:
            out.update(tap.headers)
        await resp.prepare(request)
        self._relaying.add(up)
        loop = asyncio.get_running_loop()
        # The loop's clock and self.clock may differ; carry the deadline over as a remainder.
        end = loop.time() + (deadline - self.clock())
        # SSE events relayed, for the backend's decode speed (one token per event, roughly),
        # counted here only when no tap counts them already (its usage figure is exact).
        counting = sse and tap is None
        events = first.count(b"data:") if counting else 0
        first_at = self.clock()
        # One timer for the whole relay, re-armed for each step: a read from the backend may
        # take stream_idle_timeout (and not outlive the request), a write to the client
        # client_write_timeout. ``writing`` says whose side a failure is on.
        writing = True
        try:
            content = up.content
            async with asyncio.timeout(None) as timer:
                if first:
                    timer.reschedule(loop.time() + s.client_write_timeout)
                    await resp.write(first if hide is None else hide.feed(first))
                    if tap is not None:
                        tap.chunk(first)
                while True:
                    writing = False
                    timer.reschedule(min(loop.time() + s.stream_idle_timeout, end))
                    chunk = await content.readany()
                    writing = True
                    timer.reschedule(loop.time() + s.client_write_timeout)
                    if not chunk:
                        if hide is not None:
                            await resp.write(hide.flush())
                        await resp.write_eof()
                        if sse:
                            # Events less the finish chunk and [DONE], or the tap's figure.
                            self._stream_done(b, events - 2 if tap is None
                                              else tap.output_tokens(),
                                              self.clock() - first_at)
                        return resp, True
                    await resp.write(chunk if hide is None else hide.feed(chunk))
                    if counting:
                        events += chunk.count(b"data:")
                    if tap is not None:
                        tap.chunk(chunk)
        except (TimeoutError, aiohttp.ClientError, ConnectionError, OSError) as err:
            if writing:
                # The client's side: it stopped reading (its buffers and ours are full) or
                # its connection is gone. Not the backend's fault; the caller closes the
                # upstream connection at once.
                reason = "write_timeout" if isinstance(err, TimeoutError) else "disconnected"
                self._client_abort(request, b, model, reason)
                raise _ClientAbort(reason, resp) from err
            if request.transport is None or request.transport.is_closing():
                raise  # the client left, not the backend: nothing to tell anyone
            if self.stopping:
                why = "interrupted: the scheduler is shutting down"
            elif isinstance(err, TimeoutError) and loop.time() >= end:
                # The request outlived request_timeout: our limit, not the backend's fault.
                why = "exceeded request_timeout"
            else:
                why = "stalled" if isinstance(err, TimeoutError) else "broken"
                self.metrics.broken_streams.labels(model, b.key).inc()
                if tap is not None:
                    tap.broken = True
                log.warning("stream broke after bytes were sent", extra={
                    "backend": b.key, "model": model, "why": why})
                self._failure(b, self.clock(), f"stream_{why}")
            if sse:
                try:
                    async with asyncio.timeout(s.client_write_timeout):
                        who = "the backend" if s.hide_names else f"backend {b.key}"
                        await resp.write(sse_error_event(f"{who} stream {why}"))
                        await resp.write_eof()
                except TimeoutError:
                    self._client_abort(request, b, model, "write_timeout")
                except (ConnectionError, aiohttp.ClientError):
                    pass
                return resp, False
            # A plain body cannot carry an error: cut the connection so the client sees it.
            if request.transport is not None:
                request.transport.close()
            return resp, False
        finally:
            self._relaying.discard(up)

    def _stream_done(self, b: Backend, tokens: int, seconds: float) -> None:
        """A stream of ``tokens`` output tokens ended cleanly after ``seconds`` from its first
        byte: learn the backend's time per output token from it."""
        if tokens >= 2:
            b.observe_decode(seconds / (tokens - 1), self.clock())
            self.router.observe_output(tokens)

    def _client_abort(self, request: web.Request, b: Backend, model: str,
                      reason: str) -> None:
        """Count and log a response the client ended, and drop its connection: bytes it
        did not read are still queued there, so nothing more could be sent on it."""
        self.metrics.client_aborts.labels(reason).inc()
        log.info("client ended the response", extra={
            "backend": b.key, "model": model, "reason": reason})
        if request.transport is not None:
            request.transport.abort()
