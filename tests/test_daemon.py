"""The task guard, the daemon runner and the systemd notify protocol."""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
from aiohttp import web

from common.daemon import EXIT_OK, EXIT_TASK_FAILED, serve
from common.sdnotify import Notifier
from common.tasks import GUARD, Guard
from devtools.services import free_port


async def forever() -> None:
    await asyncio.Event().wait()


async def test_guard_notes_the_first_task_that_ends() -> None:
    guard = Guard()
    guard.spawn("steady", forever())

    async def crash() -> None:
        raise RuntimeError("disk on fire")

    guard.spawn("crashy", crash())
    await asyncio.wait_for(guard.failed.wait(), 5)
    assert guard.reason is not None and "crashy" in guard.reason and "disk on fire" in guard.reason
    await guard.stop()
    assert guard.names == []


async def test_guard_cancel_on_purpose_is_not_a_failure() -> None:
    guard = Guard()
    guard.spawn("loop", forever())
    await guard.cancel("loop")
    assert not guard.failed.is_set()
    await guard.stop()


def app_with(loop_factory) -> web.Application:  # type: ignore[no-untyped-def]
    app = web.Application()
    app[GUARD] = Guard()

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        app[GUARD].spawn("worker", loop_factory())
        yield
        await app[GUARD].cancel("worker")

    app.cleanup_ctx.append(ctx)
    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app.router.add_get("/healthz", healthz)
    return app


async def test_serve_exits_1_when_an_eternal_task_ends() -> None:
    async def short() -> None:
        await asyncio.sleep(0.05)

    code = await asyncio.wait_for(serve(app_with(short), f"127.0.0.1:{free_port()}"), 10)
    assert code == EXIT_TASK_FAILED


async def test_serve_exits_0_on_sigterm_and_serves_until_then() -> None:
    port = free_port()
    task = asyncio.create_task(serve(app_with(forever), f"127.0.0.1:{port}"))
    async with aiohttp.ClientSession() as session:
        for _ in range(200):
            try:
                async with session.get(f"http://127.0.0.1:{port}/healthz") as resp:
                    assert await resp.text() == "ok"
                    break
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.02)
        else:
            raise AssertionError("server never answered")
    os.kill(os.getpid(), 15)
    assert await asyncio.wait_for(task, 10) == EXIT_OK


def test_notifier_speaks_the_systemd_protocol() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "notify")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.settimeout(5)
        notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "4000000"})
        assert notifier.enabled and notifier.watchdog_interval == 2.0
        notifier.ready("serving")
        assert sock.recv(256) == b"READY=1\nSTATUS=serving"
        notifier.watchdog()
        assert sock.recv(256) == b"WATCHDOG=1"
        notifier.close()
        sock.close()


def test_notifier_outside_systemd_does_nothing() -> None:
    notifier = Notifier({})
    assert not notifier.enabled and notifier.watchdog_interval is None
    notifier.ready()  # no socket, no error
