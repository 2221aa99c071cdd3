"""Running a daemon's aiohttp application until a signal or a failed eternal task."""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web

from common.tasks import GUARD, Guard

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_TASK_FAILED = 1

# Set by serve() once the socket accepts connections: READY=1 must not come before that.
LISTENING: web.AppKey[asyncio.Event] = web.AppKey("listening", asyncio.Event)


def split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


async def serve(app: web.Application, listen: str, *, reuse_port: bool = False,
                handler_cancellation: bool = False) -> int:
    """Serve ``app`` on ``listen`` until SIGTERM/SIGINT (exit 0) or a task ends (exit 1).

    The app's ``cleanup_ctx`` spawn their loops into ``app[GUARD]`` and undo their work on
    the way out, so stopping is the same path whatever the reason.
    """
    if GUARD not in app:
        app[GUARD] = Guard()
    guard = app[GUARD]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = web.AppRunner(app, handle_signals=False, access_log=None,
                           handler_cancellation=handler_cancellation)
    try:
        await runner.setup()
        host, port = split_listen(listen)
        site = web.TCPSite(runner, host, port, reuse_port=reuse_port or None)
        try:
            await site.start()
        except OSError as err:
            log.error("cannot listen on %s: %s", listen, err.strerror or err)
            return EXIT_TASK_FAILED
        log.info("listening", extra={"listen": listen})
        if LISTENING in app:
            app[LISTENING].set()
        stopped = asyncio.create_task(stop.wait())
        failed = asyncio.create_task(guard.failed.wait())
        await asyncio.wait({stopped, failed}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        failed.cancel()
        code = EXIT_TASK_FAILED if guard.failed.is_set() else EXIT_OK
        log.info("stopping", extra={"reason": guard.reason or "signal"})
        return code
    finally:
        await runner.cleanup()
        await guard.stop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
