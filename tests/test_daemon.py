"""The task guard, the daemon runner and the systemd notify protocol."""

from __future__ import annotations

import asyncio
import inspect
import os
import re
import signal
import socket
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from agent.health.heartbeat import REVOKE_TIMEOUT_S
from common.daemon import CUT_OFF_S, EXIT_OK, EXIT_TASK_FAILED, SHUTDOWN_TIMEOUT_S, bind, serve
from common.sdnotify import Notifier
from common.store import EtcdStore
from common.store_api import Store
from common.tasks import GUARD, Guard
from devtools.services import free_port, until


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


async def test_serve_exits_1_before_any_start_up_when_the_port_is_taken() -> None:
    # Binding comes first: a daemon that cannot listen must not have registered anywhere.
    started: list[str] = []

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        started.append("ctx")
        yield

    app = web.Application()
    app.cleanup_ctx.append(ctx)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = await asyncio.wait_for(serve(app, f"127.0.0.1:{port}"), 10)
    assert code == EXIT_TASK_FAILED and started == []


def test_bind_takes_ipv6_brackets_and_honours_reuse_port() -> None:
    first = bind("[::1]:0")
    try:
        assert [s.family for s in first] == [socket.AF_INET6]
        port = first[0].getsockname()[1]
        first[0].listen()
        with pytest.raises(OSError):
            bind(f"[::1]:{port}")
    finally:
        for s in first:
            s.close()
    shared = bind("127.0.0.1:0", reuse_port=True)
    port = shared[0].getsockname()[1]
    shared[0].listen()
    again = bind(f"127.0.0.1:{port}", reuse_port=True)
    for s in shared + again:
        s.close()


def test_shutdown_timeout_fits_inside_the_units_stop_timeout() -> None:
    # systemd SIGKILLs after TimeoutStopSec; the drain and the cut-off must end before it,
    # with room left for the contexts' tear-down (lease revoke, STOPPING=1).
    units = Path(__file__).resolve().parent.parent / "systemd"
    stops = [int(m) for unit in units.glob("*.service")
             for m in re.findall(r"^TimeoutStopSec=(\d+)", unit.read_text(), re.M)]
    assert stops and min(stops) >= SHUTDOWN_TIMEOUT_S + 2 * CUT_OFF_S + REVOKE_TIMEOUT_S
    assert inspect.signature(serve).parameters["shutdown_timeout"].default == SHUTDOWN_TIMEOUT_S


async def test_serve_cuts_off_a_stuck_handler_after_shutdown_timeout() -> None:
    entered = asyncio.Event()

    async def stuck(request: web.Request) -> web.Response:
        entered.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    app = app_with(forever)
    app.router.add_get("/stuck", stuck)
    port = free_port()
    task = asyncio.create_task(serve(app, f"127.0.0.1:{port}", shutdown_timeout=0.5))
    async with aiohttp.ClientSession() as session:
        await until(lambda: _answers(session, port), 10, "the server to answer")
        client = asyncio.create_task(session.get(f"http://127.0.0.1:{port}/stuck"))
        await asyncio.wait_for(entered.wait(), 5)
        began = time.monotonic()
        os.kill(os.getpid(), signal.SIGTERM)
        # Bounded: a stuck handler that held the shutdown would never let serve return
        # (SHUTDOWN_TIMEOUT_S, not the 0.5 s asked for, would alone pass the bound).
        assert await asyncio.wait_for(task, 10) == EXIT_OK
        # 0.5 s of drain, then at most the cut-off twice (wait, then cancel): a figure to read.
        print(f"serve returned {time.monotonic() - began:.2f} s after SIGTERM "
              f"(0.5 s drain + up to {2 * CUT_OFF_S:.1f} s cut-off)")
        with pytest.raises(aiohttp.ClientError):
            await asyncio.wait_for(client, 5)


async def _answers(session: aiohttp.ClientSession, port: int) -> bool:
    try:
        async with session.get(f"http://127.0.0.1:{port}/healthz") as resp:
            return resp.status == 200
    except aiohttp.ClientConnectionError:
        return False


def test_etcd_store_satisfies_the_store_protocol() -> None:
    assert isinstance(EtcdStore(["http://127.0.0.1:2379"]), Store)
