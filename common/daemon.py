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
from collections.abc import Awaitable, Callable

from aiohttp import web

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


async def serve(app: web.Application, listen: str, *, reuse_port: bool = False,
                handler_cancellation: bool = False,
                shutdown_timeout: float = SHUTDOWN_TIMEOUT_S) -> int:
    """Serve ``app`` on ``listen`` until SIGTERM/SIGINT (exit 0) or a task ends (exit 1).

    Exits 1 at once, before any of the app's start-up runs, when ``listen`` cannot be bound.
    The app's ``cleanup_ctx`` spawn their loops into ``app[GUARD]`` and undo their work on
    the way out, so stopping is the same path whatever the reason.
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
    runner = web.AppRunner(app, handle_signals=False, access_log=None,
                           handler_cancellation=handler_cancellation,
                           shutdown_timeout=CUT_OFF_S)
    try:
        await runner.setup()
        for sock in sockets:
            await web.SockSite(runner, sock, backlog=_BACKLOG).start()
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
