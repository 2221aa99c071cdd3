"""The scheduler's defences (docs/security.md): each test sends the bad thing and checks the
refusal. Real etcd, sim engines as processes, the scheduler served by serve() where the
socket-level limits are under test."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import socket
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from common.daemon import serve
from common.keys import Keys
from common.records import dump
from common.store import EtcdStore
from devtools.certs import make_ca, make_cert
from devtools.schedharness import Scheduler, metric_value, publish, record_for
from devtools.services import EtcdServer, free_port, until
from devtools.simproc import SimProcess
from scheduler import status
from scheduler.app import build_app
from scheduler.config import SchedulerConfig
from scheduler.netpolicy import backend_problem, networks
from scheduler.tls import reloader, tls_context

pytestmark = pytest.mark.timeout(120)
JSON = {"Content-Type": "application/json"}
CHAT = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'


@pytest.fixture(scope="module")
def sim() -> Iterator[SimProcess]:
    with SimProcess(["m"], name="a", latency_ms=1) as s:
        yield s


# -- records validated at the reader --------------------------------------------------------

def test_backend_problem() -> None:
    assert backend_problem("http://10.0.0.5:8000", "/v1", []) is None
    assert backend_problem("https://gpu1:8000", "/v3", []) is None
    for url, api in [("http://10.0.0.5:8000", "/internal/admin?x="), ("http://10.0.0.5:1", "/v1/"),
                     ("http://169.254.169.254:80", "/v1"), ("http://[fe80::1]:80", "/v1"),
                     ("ftp://10.0.0.5:21", "/v1"), ("http://u:p@10.0.0.5:80", "/v1"),
                     ("http://10.0.0.5:80/admin", "/v1"), ("http://10.0.0.5:80?x", "/v1"),
                     ("http://10.0.0.5", "/v1")]:
        assert backend_problem(url, api, []) is not None, (url, api)
    nets = networks(["10.0.0.0/8"])
    assert backend_problem("http://10.1.2.3:80", "/v1", nets) is None
    assert backend_problem("http://192.168.1.1:80", "/v1", nets) is not None
    assert backend_problem("http://gpu1:80", "/v1", nets) is not None  # names: refused
    assert backend_problem("http://169.254.169.254:80", "/v1",
                           networks(["169.254.0.0/16"])) is None  # named on purpose


async def test_hostile_records_are_skipped_and_counted(etcd_server: EtcdServer, prefix: str,
                                                       writer: EtcdStore,
                                                       sim: SimProcess) -> None:
    keys = Keys(prefix)
    good = record_for(sim)
    hostile = [dataclasses.replace(good, name="admin", models=["evil"],
                                   api_path="/internal/admin?x="),
               dataclasses.replace(good, name="meta", models=["evil"],
                                   url="http://169.254.169.254:80")]
    for r in [good, *hostile]:
        await writer.put(keys.backend(r.node, r.name), dump(r))
    async with Scheduler(etcd_server.url, prefix, queue_timeout=0.2) as s:
        await s.wait_models("m")
        assert "evil" not in await s.models()
        assert metric_value(await s.metrics(), "aivmm_scheduler_bad_records_total") == 2
        async with aiohttp.ClientSession() as c, c.post(
                s.url + "/v1/chat/completions", headers=JSON,
                data=CHAT.replace(b'"m"', b'"evil"')) as r:
            assert r.status == 404
    # backend_networks that do not hold the sim's address: even the good record is refused.
    async with Scheduler(etcd_server.url, prefix, queue_timeout=0.2,
                         backend_networks=["10.0.0.0/8"]) as s:
        async def all_refused() -> bool:
            return metric_value(await s.metrics(), "aivmm_scheduler_bad_records_total") == 3

        await until(all_refused, what="the three records read and refused")
        assert await s.models() == []


# -- the edge: media type, body deadline, concurrency cap, names, status page -----------------

async def test_form_post_is_refused_415(etcd_server: EtcdServer, prefix: str,
                                        writer: EtcdStore, sim: SimProcess) -> None:
    await publish(writer, prefix, sim)
    async with Scheduler(etcd_server.url, prefix, queue_timeout=0.2) as s:
        await s.wait_models("m")
        async with aiohttp.ClientSession() as c:
            for ctype in ("application/x-www-form-urlencoded", "text/plain",
                          "multipart/form-data; boundary=x"):
                async with c.post(s.url + "/v1/chat/completions", data=CHAT,
                                  headers={"Content-Type": ctype}) as r:
                    assert r.status == 415, ctype
                    assert (await r.json())["error"]["code"] == "unsupported_media_type"
            async with c.post(s.url + "/v1/chat/completions", data=CHAT, headers=JSON) as r:
                assert r.status == 200


async def test_trickled_body_gets_408(etcd_server: EtcdServer, prefix: str, writer: EtcdStore,
                                      sim: SimProcess) -> None:
    await publish(writer, prefix, sim)
    async with Scheduler(etcd_server.url, prefix, body_timeout=0.5) as s:
        await s.wait_models("m")
        host, port = s.config.listen.rsplit(":", 1)
        reader, writer_ = await asyncio.open_connection(host, int(port))
        writer_.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                      b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{")
        await writer_.drain()
        sent: list[int] = []

        async def trickle() -> None:
            with contextlib.suppress(OSError):
                for _ in range(50):
                    await asyncio.sleep(0.1)
                    writer_.write(b" ")
                    await writer_.drain()
                    sent.append(1)

        task = asyncio.create_task(trickle())
        head = await asyncio.wait_for(reader.readline(), 15)
        assert b" 408 " in head
        # A deadline on the whole body, not an idle timeout: the answer came while bytes were
        # still trickling in (an idle timeout would wait for all 50 and then 0.5 s more).
        assert len(sent) < 50, len(sent)
        # ... and the connection is closed (reset: body bytes were left unread), not kept.
        with contextlib.suppress(ConnectionResetError):
            await asyncio.wait_for(reader.read(), 5)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        writer_.close()


async def test_concurrency_cap_answers_503(etcd_server: EtcdServer, prefix: str,
                                           writer: EtcdStore) -> None:
    with SimProcess(["slow"], name="slow", latency_ms=1500) as slow:
        await publish(writer, prefix, slow)
        async with Scheduler(etcd_server.url, prefix, max_concurrent_requests=1) as s:
            await s.wait_models("slow")
            body = CHAT.replace(b'"m"', b'"slow"')
            async with aiohttp.ClientSession() as c:
                first = asyncio.create_task(c.post(s.url + "/v1/chat/completions", data=body,
                                                   headers=JSON))

                async def first_in_flight() -> bool:
                    return metric_value(await s.metrics(),
                                        "aivmm_scheduler_inflight_requests") == 1

                await until(first_in_flight, what="the first request in flight")
                async with c.post(s.url + "/v1/chat/completions", data=body,
                                  headers=JSON) as r:
                    assert r.status == 503 and r.headers["Retry-After"] == "1"
                    assert (await r.json())["error"]["code"] == "overloaded"
                resp = await first
                assert resp.status == 200
                resp.release()
            assert metric_value(await s.metrics(),
                                "aivmm_scheduler_overload_rejections_total") == 1


async def test_hide_internal_names(etcd_server: EtcdServer, prefix: str, writer: EtcdStore,
                                   sim: SimProcess) -> None:
    await publish(writer, prefix, sim)
    async with Scheduler(etcd_server.url, prefix, hide_internal_names=True,
                         metrics_networks=["10.0.0.0/8"]) as s:
        await s.wait_models("m")
        async with aiohttp.ClientSession() as c:
            async with c.post(s.url + "/v1/chat/completions", data=CHAT, headers=JSON) as r:
                assert r.status == 200 and "x-aivmm-backend" not in r.headers
            async with c.get(s.url + "/metrics") as r:
                assert r.status == 403  # 127.0.0.1 is not in metrics_networks


async def test_status_page_headers(etcd_server: EtcdServer, prefix: str) -> None:
    assert "sessionStorage" in status.PAGE and "localStorage" not in status.PAGE
    async with Scheduler(etcd_server.url, prefix) as s, aiohttp.ClientSession() as c, \
            c.get(s.url + "/") as r:
        csp = r.headers["Content-Security-Policy"]
        assert "script-src 'sha256-" in csp and "frame-ancestors 'none'" in csp
        assert r.headers["X-Frame-Options"] == "DENY"
        assert r.headers["X-Content-Type-Options"] == "nosniff"


# -- the engine key --------------------------------------------------------------------------

async def test_engine_key_only_the_scheduler_presents(etcd_server: EtcdServer, prefix: str,
                                                      writer: EtcdStore,
                                                      tmp_path: Path) -> None:
    key_file = tmp_path / "engine-key"
    key_file.write_text("k-engine-123\n")
    with SimProcess(["locked"], name="locked", api_key="k-engine-123") as locked:
        async with aiohttp.ClientSession() as c:
            # A client on the network going around the scheduler: refused.
            body = CHAT.replace(b'"m"', b'"locked"')
            async with c.post(locked.url + "/v1/chat/completions", data=body,
                              headers=JSON) as r:
                assert r.status == 401
            async with c.post(locked.url + "/v1/chat/completions", data=body,
                              headers={**JSON, "Authorization": "Bearer guess"}) as r:
                assert r.status == 401
            await publish(writer, prefix, locked)
            async with Scheduler(etcd_server.url, prefix,
                                 engine_api_key_file=str(key_file)) as s:
                await s.wait_models("locked")
                async with c.post(s.url + "/v1/chat/completions", data=body,
                                  headers={**JSON, "Authorization": "Bearer client"}) as r:
                    assert r.status == 200


# -- the socket: slowloris, idle connections, TLS, shutdown ----------------------------------

@contextlib.asynccontextmanager
async def serving(app: web.Application, listen: str, **kw: object) -> AsyncIterator[None]:
    task = asyncio.create_task(serve(app, listen, **kw))  # type: ignore[arg-type]
    host, port = listen.rsplit(":", 1)

    def up() -> bool:
        with socket.create_connection((host, int(port)), timeout=0.2):
            return True

    await until(up, what="serve() listening")
    try:
        yield
    finally:
        os.kill(os.getpid(), signal.SIGTERM)
        assert await asyncio.wait_for(task, 30) == 0


def _hello() -> web.Application:
    app = web.Application()

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hi")

    app.router.add_get("/", hello)
    return app


async def _closed_within(reader: asyncio.StreamReader, seconds: float, what: str) -> None:
    """Wait, at most ``seconds``, for the server to close; print how long it took (a figure to
    read, not to assert on a shared machine's clock)."""
    started = time.monotonic()
    await asyncio.wait_for(reader.read(), seconds)
    print(f"{what}: closed after {time.monotonic() - started:.2f} s")


async def test_slowloris_and_idle_connections_are_closed() -> None:
    listen = f"127.0.0.1:{free_port()}"
    host, port = listen.rsplit(":", 1)
    async with serving(_hello(), listen, keepalive_timeout=1.0, header_timeout=0.4):
        # Headers trickled a byte at a time: closed at the header deadline, well before the
        # keep-alive timeout.
        reader, w = await asyncio.open_connection(host, int(port))
        w.write(b"GET / HTTP/1.1\r\nHost: x\r\n")

        sent: list[int] = []

        async def trickle() -> None:
            with contextlib.suppress(OSError):
                for _ in range(200):
                    await asyncio.sleep(0.05)
                    w.write(b"X")
                    await w.drain()
                    sent.append(1)

        task = asyncio.create_task(trickle())
        await _closed_within(reader, 15, "trickled headers")
        # Closed while bytes were still arriving: a deadline, not an idle timeout.
        assert len(sent) < 200, len(sent)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        w.close()
        # A connection that sends nothing: closed at the keep-alive timeout.
        reader, w = await asyncio.open_connection(host, int(port))
        await _closed_within(reader, 10, "silent connection")
        w.close()
        # An idle keep-alive connection after a request: closed too; the request was fine.
        reader, w = await asyncio.open_connection(host, int(port))
        w.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"200" in await asyncio.wait_for(reader.readline(), 3)
        await _closed_within(reader, 10, "idle keep-alive connection")
        w.close()


async def test_tls_listener_reloads_on_sighup(tmp_path: Path) -> None:
    ca = make_ca(tmp_path)
    first = make_cert(ca, tmp_path, "one", "first")
    context = tls_context(str(first.cert), str(first.key))
    assert isinstance(context, ssl.SSLContext)
    listen = f"127.0.0.1:{free_port()}"
    host, port = listen.rsplit(":", 1)
    client = ssl.create_default_context(cafile=str(ca.cert))

    reload = lambda: reloader(context, str(first.cert), str(first.key))  # noqa: E731
    async with serving(_hello(), listen, ssl_context=context, reload=reload):
        assert await asyncio.to_thread(served_cn_sync, host, int(port), client) == "first"
        # Renewed files in place, then SIGHUP: new connections get the new certificate.
        second = make_cert(ca, tmp_path, "two", "second")
        first.cert.write_bytes(second.cert.read_bytes())
        first.key.write_bytes(second.key.read_bytes())
        os.kill(os.getpid(), signal.SIGHUP)
        async def renewed() -> bool:
            return await asyncio.to_thread(served_cn_sync, host, int(port), client) == "second"

        assert await until(renewed, what="the new certificate")
        # Plain HTTP on the TLS port gets nothing.
        with pytest.raises((aiohttp.ClientError, ConnectionError, asyncio.TimeoutError)):
            async with aiohttp.ClientSession() as c, c.get(f"http://{listen}/",
                                                           timeout=aiohttp.ClientTimeout(2)):
                pass


def served_cn_sync(host: str, port: int, client: ssl.SSLContext) -> str:
    with socket.create_connection((host, port), timeout=2) as raw, \
            client.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        cert = tls.getpeercert()
        assert cert is not None
        return dict(x[0] for x in cert["subject"])["commonName"]  # type: ignore[index, misc]


async def test_shutdown_ends_streams_with_an_sse_error(etcd_server: EtcdServer, prefix: str,
                                                       writer: EtcdStore) -> None:
    with SimProcess(["long"], name="long", tokens_per_second=5, chunks=200) as long:
        await publish(writer, prefix, long)
        listen = f"127.0.0.1:{free_port()}"
        config = SchedulerConfig(etcd=[etcd_server.url], etcd_prefix=prefix, listen=listen,
                                 placer=False)
        app = build_app(config)
        task = asyncio.create_task(serve(app, listen, shutdown_timeout=0.5,
                                         handler_cancellation=True))
        body = (b'{"model": "long", "stream": true, '
                b'"messages": [{"role": "user", "content": "go"}]}')
        async with aiohttp.ClientSession() as c:
            async def served() -> bool:
                async with c.get(f"http://{listen}/v1/models") as r:
                    return r.status == 200 and b"long" in await r.read()

            await until(served, what="the model served")
            resp = await c.post(f"http://{listen}/v1/chat/completions", data=body, headers=JSON)
            assert resp.status == 200
            await resp.content.readuntil(b"\n\n")
            started = time.monotonic()
            os.kill(os.getpid(), signal.SIGTERM)
            rest = await asyncio.wait_for(resp.content.read(), 10)
            assert b"shutting down" in rest  # an SSE error event, not a cut
            print(f"stream ended {time.monotonic() - started:.2f} s after SIGTERM")
        assert await asyncio.wait_for(task, 30) == 0
