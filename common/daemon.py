"""Running a daemon's aiohttp application until a signal or a failed eternal task.

Order matters both ways. Starting: the listening socket is bound first, and only then do
the app's cleanup contexts run, so a daemon whose port is taken exits before it registered
anything in etcd or touched a container. Stopping: ``STOPPING`` is set first (readiness
answers 503 while the socket still accepts, so a load balancer moves traffic elsewhere),
the requests in flight get ``shutdown_timeout`` to finish, then the contexts unwind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import ssl
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from common.tasks import GUARD, Guard

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_TASK_FAILED = 1

# Both units stop with TimeoutStopSec=20 (scheduler) / 30 (agent) before systemd sends
# SIGKILL; aiohttp's own default is 60 s. 15 s for the requests in flight leaves the rest
# for the contexts' tear-down (the lease revoke alone may take REVOKE_TIMEOUT_S), so the
# lease is revoked and STOPPING=1 sent rather than the process killed halfway.
SHUTDOWN_TIMEOUT_S = 15.0
# What the handlers still running at the end of the drain get after the socket is closed:
# the drain already gave them shutdown_timeout, this is only for cancellation to unwind.
CUT_OFF_S = 1.0
_BACKLOG = 1024

# Set by serve() once the socket accepts connections: READY=1 must not come before that.
LISTENING: web.AppKey[asyncio.Event] = web.AppKey("listening", asyncio.Event)
# Set by serve() the moment it starts stopping, before anything is torn down.
STOPPING: web.AppKey[asyncio.Event] = web.AppKey("stopping", asyncio.Event)


def split_listen(listen: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` as (host without brackets, port)."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def bind(listen: str, *, reuse_port: bool = False) -> list[socket.socket]:
    """Bound (not yet listening) sockets for ``listen``; one per address the host names.

    Raises :class:`OSError` when the address is taken or cannot be bound. The options are
    those asyncio's ``create_server`` would set, so behaviour matches ``web.TCPSite``.
    """
    host, port = split_listen(listen)
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    seen: set[tuple[int, object]] = set()
    try:
        for family, kind, proto, _, address in infos:
            if (family, address) in seen:
                continue
            seen.add((family, address))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                # "::" means IPv6 only here, as in asyncio: "0.0.0.0" is a separate entry.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class _InFlight:
    """Counts requests being handled, so stopping can wait for them with the socket open."""

    def __init__(self) -> None:
        self.count = 0
        self.idle = asyncio.Event()
        self.idle.set()

    @web.middleware
    async def middleware(self, request: web.Request,
                         handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
                         ) -> web.StreamResponse:
        self.count += 1
        self.idle.clear()
        try:
            return await handler(request)
        finally:
            self.count -= 1
            if self.count == 0:
                self.idle.set()


class _HeaderDeadline(asyncio.Protocol):
    """aiohttp's protocol for one connection, with a deadline on each request's headers.

    aiohttp closes a connection idle for ``keepalive_timeout`` but has no limit on how long
    the headers of a request may take to arrive, so a client trickling them (slowloris) holds
    its connection and a descriptor for that long. This wrapper starts a timer when bytes of
    a new request arrive while the handler waits for one, stops it when the headers are
    complete (aiohttp has parsed a message), and closes the connection when it fires. It
    reads two private attributes of aiohttp's RequestHandler (``_request_count``,
    ``_waiter``); tests/test_hardening.py fails if they change meaning.
    """

    def __init__(self, inner: RequestHandler, timeout: float) -> None:
        self.inner = inner
        self.timeout = timeout
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        before = self.inner._request_count
        self.inner.data_received(data)
        if self.inner._request_count != before:
            self._stop()  # the headers of a request are complete
        elif self.timer is None and self.inner._waiter is not None:
            # Bytes of a request whose headers are not complete, while no request runs.
            self.timer = asyncio.get_running_loop().call_later(self.timeout, self._expire)

    def _expire(self) -> None:
        self.timer = None
        if self.transport is not None and not self.transport.is_closing():
            log.info("closing a connection whose request headers did not arrive in %.0fs",
                     self.timeout)
            self.transport.close()

    def _stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()  # type: ignore[func-returns-value]

    def connection_lost(self, exc: BaseException | None) -> None:
        self._stop()
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class _Site(web.SockSite):
    """A SockSite whose connections have a header deadline (when one is given)."""

    __slots__ = ("_header_timeout",)

    def __init__(self, runner: web.BaseRunner, sock: socket.socket, *,
                 header_timeout: float | None, **kwargs: Any) -> None:
        super().__init__(runner, sock, **kwargs)
        self._header_timeout = header_timeout

    async def start(self) -> None:
        if self._header_timeout is None:
            return await super().start()
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        timeout = self._header_timeout
        self._server = await asyncio.get_running_loop().create_server(
            lambda: _HeaderDeadline(server(), timeout), sock=self._sock,
            ssl=self._ssl_context, backlog=self._backlog)


async def serve(app: web.Application, listen: str, *, reuse_port: bool = False,
                handler_cancellation: bool = False,
                shutdown_timeout: float = SHUTDOWN_TIMEOUT_S,
                keepalive_timeout: float | None = None, header_timeout: float | None = None,
                ssl_context: ssl.SSLContext | None = None,
                reload: Callable[[], None] | None = None) -> int:
    """Serve ``app`` on ``listen`` until SIGTERM/SIGINT (exit 0) or a task ends (exit 1).

    Exits 1 at once, before any of the app's start-up runs, when ``listen`` cannot be bound.
    The app's ``cleanup_ctx`` spawn their loops into ``app[GUARD]`` and undo their work on
    the way out, so stopping is the same path whatever the reason.

    ``keepalive_timeout`` closes idle connections, ``header_timeout`` those whose request
    headers do not arrive in time; ``ssl_context`` serves TLS; ``reload`` runs on SIGHUP.
    """
    try:
        sockets = bind(listen, reuse_port=reuse_port)
    except OSError as err:
        log.error("cannot listen on %s: %s", listen, err.strerror or err)
        return EXIT_TASK_FAILED
    if GUARD not in app:
        app[GUARD] = Guard()
    for key in (LISTENING, STOPPING):
        if key not in app:
            app[key] = asyncio.Event()
    guard = app[GUARD]
    inflight = _InFlight()
    # Innermost, so it counts exactly the time a handler runs, whatever the app's own do.
    app.middlewares.append(inflight.middleware)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if reload is not None:
        loop.add_signal_handler(signal.SIGHUP, reload)
    extra: dict[str, Any] = {}
    if keepalive_timeout is not None:
        extra["keepalive_timeout"] = keepalive_timeout
    runner = web.AppRunner(app, handle_signals=False, access_log=None,
                           handler_cancellation=handler_cancellation,
                           shutdown_timeout=CUT_OFF_S, **extra)
    try:
        await runner.setup()
        for sock in sockets:
            await _Site(runner, sock, backlog=_BACKLOG, ssl_context=ssl_context,
                        header_timeout=header_timeout).start()
        log.info("listening", extra={"listen": listen})
        app[LISTENING].set()
        stopped = asyncio.create_task(stop.wait())
        failed = asyncio.create_task(guard.failed.wait())
        await asyncio.wait({stopped, failed}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        failed.cancel()
        code = EXIT_TASK_FAILED if guard.failed.is_set() else EXIT_OK
        log.info("stopping", extra={"reason": guard.reason or "signal"})
        app[STOPPING].set()
        # The socket stays open meanwhile: readiness says 503, new requests are still served.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(inflight.idle.wait(), shutdown_timeout)
        if inflight.count:
            log.warning("cutting off requests still in flight",
                        extra={"requests": inflight.count})
        return code
    finally:
        app[STOPPING].set()
        await runner.cleanup()
        await guard.stop()
        for sock in sockets:
            sock.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        if reload is not None:
            loop.remove_signal_handler(signal.SIGHUP)


def run_main(main: Coroutine[Any, Any, int]) -> int:
    """Run a daemon's ``main`` on uvloop where it is installed (a faster loop for the proxy
    hop and the agent's many probes), else on asyncio's own loop; returns its exit code."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)
