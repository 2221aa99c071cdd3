"""The scheduler's status page: its JSON against a running cluster, and the page itself as
headless Chromium renders it (Debian's chromium-headless-shell)."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from common.keys import Keys
from common.records import BackendRecord, GpuRecord, NodeRecord, dump
from common.store import EtcdStore
from devtools.schedharness import Scheduler, publish
from devtools.services import EtcdServer, free_port, until
from devtools.simproc import SimProcess
from scheduler import status as status_page
from scheduler.routing import Router
from scheduler.status import FailoverLog, RequestRates
from tests.test_ctl import ctl
from tests.test_ctl_deploy import write_placed

GIB = 2**30


def test_request_rates_come_from_counter_snapshots() -> None:
    now = [100.0]
    totals = {("m", "n/a"): 0.0}
    rates = RequestRates(lambda: dict(totals), clock=lambda: now[0])
    assert rates.rates() is None  # nothing to compare with yet
    now[0] += 10
    totals[("m", "n/a")] = 50.0
    assert rates.rates() == {("m", "n/a"): 5.0}
    now[0] += 40  # the window slides: only the last 30 s count
    totals[("m", "n/a")] = 50.0
    assert rates.rates() == {("m", "n/a"): 0.0}


def test_failover_log_keeps_the_newest() -> None:
    log = FailoverLog(size=3)
    for i in range(5):
        log.add("m", f"n/b{i}", "connect")
    assert [f.backend for f in log.items] == ["n/b2", "n/b3", "n/b4"]


@dataclass
class Cluster:
    sched: Scheduler
    sims: list[SimProcess]


async def build_cluster(etcd_url: str, prefix: str, **settings: Any
                        ) -> AsyncIterator[Cluster]:
    """Two nodes with GPUs, two live sim backends, a ready-but-dead one (failovers,
    ejection) and an unhealthy one; a scheduler that has served a few requests."""
    keys = Keys(prefix)
    now = time.time()
    nodes = [
        NodeRecord("gpu-node-a", "0.1.0", now, now, agent_url="http://127.0.0.1:9410", gpus=[
            GpuRecord(0, "nvidia", "NVIDIA H200", "GPU-a0", "0000:18:00.0",
                      memory_total_bytes=141 * GIB, memory_used_bytes=96 * GIB,
                      utilization=0.72, temperature_c=61, power_w=455),
            GpuRecord(1, "nvidia", "NVIDIA H200", "GPU-a1", "0000:2a:00.0",
                      memory_total_bytes=141 * GIB, memory_used_bytes=12 * GIB,
                      utilization=0.08, temperature_c=38, power_w=120)]),
        NodeRecord("arc-node-b", "0.1.0", now, now, agent_url="http://127.0.0.1:9411", gpus=[
            GpuRecord(0, "intel", "Intel Arc A770", "arc-b0", "0000:04:00.0",
                      memory_total_bytes=16 * GIB, memory_used_bytes=7 * GIB,
                      temperature_c=52)])]
    sims = [SimProcess("llama-3.1-8b", name="vllm-0", latency_ms=5).start(),
            SimProcess("qwen2.5-7b", name="ipex-0", latency_ms=8).start()]
    try:
        async with EtcdStore([etcd_url]) as store:
            await store.put_many([(keys.node(n.node), dump(n)) for n in nodes])
            await publish(store, prefix, sims[0], node="gpu-node-a", latency_ms=4.2)
            await publish(store, prefix, sims[1], node="arc-node-b", latency_ms=7.9)
            dead = BackendRecord("gpu-node-a", "vllm-1", ["llama-3.1-8b"],
                                 f"http://127.0.0.1:{free_port()}", "ready", "vllm",
                                 probe_latency_ms=0.001, updated_at=now)
            sick = BackendRecord("arc-node-b", "ipex-1", ["qwen2.5-7b"],
                                 f"http://127.0.0.1:{free_port()}", "unhealthy", "ipex-llm",
                                 error="probe: connection refused", updated_at=now)
            await store.put_many([(keys.backend(b.node, b.name), dump(b))
                                  for b in (dead, sick)])
        async with Scheduler(etcd_url, prefix, **settings) as sched:
            await sched.wait_models("llama-3.1-8b", "qwen2.5-7b",
                                    api_key=settings.get("api_keys", [None])[0])
            client = sched.client(api_key=settings.get("api_keys", ["none"])[0])
            # The dead backend looks cheapest: the first requests try it, fail over and
            # eject it.
            for _ in range(6):
                await client.chat.completions.create(
                    model="llama-3.1-8b", messages=[{"role": "user", "content": "hi"}])
            await client.chat.completions.create(
                model="qwen2.5-7b", messages=[{"role": "user", "content": "hi"}])
            await client.close()
            yield Cluster(sched, sims)
    finally:
        for s in sims:
            s.stop()


@pytest.fixture
async def cluster(etcd_server: EtcdServer, prefix: str) -> AsyncIterator[Cluster]:
    async for c in build_cluster(etcd_server.url, prefix):
        yield c


async def get(url: str, key: str | None = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with aiohttp.ClientSession() as s, s.get(url, headers=headers) as r:
        body = await (r.json() if r.content_type == "application/json" else r.text())
        return r.status, body


async def test_cluster_json_shows_nodes_gpus_backends_rates_and_failovers(
        cluster: Cluster) -> None:
    status, body = await get(cluster.sched.url + "/v1/cluster")
    assert status == 200
    assert sorted(n["node"] for n in body["nodes"]) == ["arc-node-b", "gpu-node-a"]
    h200 = body["nodes"][[n["node"] for n in body["nodes"]].index("gpu-node-a")]["gpus"][0]
    assert h200["name"] == "NVIDIA H200" and h200["utilization"] == 0.72
    states = {b["key"]: b["state"] for b in body["backends"]}
    assert states == {"gpu-node-a/vllm-0": "ready", "gpu-node-a/vllm-1": "ejected",
                      "arc-node-b/ipex-0": "ready", "arc-node-b/ipex-1": "unhealthy"}
    live = next(b for b in body["backends"] if b["key"] == "gpu-node-a/vllm-0")
    assert live["probe_latency_ms"] == 4.2 and live["latency_ms"] > 0
    assert live["engine"] == "sim" and live["inflight"] == 0 and live["pending"] == 0
    assert {"tpot_ms", "ttft_floor_ms", "waiting"} <= set(live)
    sick = next(b for b in body["backends"] if b["key"] == "arc-node-b/ipex-1")
    assert sick["error"] == "probe: connection refused"
    assert body["failovers"] and {f["backend"] for f in body["failovers"]} == {
        "gpu-node-a/vllm-1"}
    assert body["failovers"][0]["reason"] == "connect"
    assert body["etcd"] == {"connected": True, "error": None}
    assert set(body["models"]) == {"llama-3.1-8b", "qwen2.5-7b"}
    assert body["deployments"] == []  # none deployed in this cluster

    async def rates_known() -> Any:
        _, b = await get(cluster.sched.url + "/v1/cluster")
        return b if b["request_rate"] is not None else None
    later = await until(rates_known, 10, "a request rate")
    # 7 requests over a window of at least one second: positive, and model by model.
    assert later["request_rate"] > 0 and later["models"]["llama-3.1-8b"] > 0


async def test_page_is_open_and_its_data_needs_a_key_unless_made_public(
        etcd_server: EtcdServer, prefix: str) -> None:
    async with Scheduler(etcd_server.url, prefix, api_keys=["k1"]) as sched:
        status, page = await get(sched.url + "/")
        assert status == 200 and "<title>aivmm cluster</title>" in page
        assert (await get(sched.url + "/v1/cluster"))[0] == 401
        assert (await get(sched.url + "/v1/cluster", "k1"))[0] == 200
    async with Scheduler(etcd_server.url, prefix, api_keys=["k1"],
                         status_page_public=True) as sched:
        assert (await get(sched.url + "/v1/cluster"))[0] == 200


def chromium() -> str:
    for name in ("chromium-headless-shell", "chromium"):
        if path := shutil.which(name):
            return path
    pytest.fail("no headless Chromium: run scripts/install-services")


async def browse(url: str, tmp: Path, *extra: str) -> str:
    """Load ``url`` in headless Chromium, let its scripts run, return the DOM it dumps."""
    proc = await asyncio.create_subprocess_exec(
        chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={tmp / 'chromium'}", "--virtual-time-budget=3000",
        *extra, url, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 90)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode()


async def test_status_page_in_headless_chromium_shows_the_cluster(
        cluster: Cluster, tmp_path: Path) -> None:
    # A streamed answer teaches the router vllm-0's TTFT floor and decode speed.
    client = cluster.sched.client()
    stream = await client.chat.completions.create(
        model="llama-3.1-8b", messages=[{"role": "user", "content": "count to ten"}],
        stream=True, stream_options={"include_usage": True})
    assert [c async for c in stream]
    await client.close()
    dom = await browse(cluster.sched.url + "/", tmp_path, "--dump-dom")
    # Filled in by the page's script from /v1/cluster, so seeing them proves the JS ran.
    for text in ("gpu-node-a/vllm-0", "arc-node-b/ipex-1", "NVIDIA H200", "Intel Arc A770",
                 "96.0 / 141.0 GiB", "72%", "61 °C", "llama-3.1-8b", "qwen2.5-7b",
                 'class="pill ejected">ejected', 'class="pill unhealthy">unhealthy',
                 "probe: connection refused", "etcd connected"):
        assert text in dom, text
    failovers = dom[dom.index('id="failovers"'):]
    assert "gpu-node-a/vllm-1" in failovers and "connect" in failovers
    assert "<b>2</b><span>nodes</span>" in dom and "<b>3</b><span>GPUs</span>" in dom
    assert "<b>2/4</b><span>backends ready</span>" in dom
    assert "no deployments (aivmmctl deploy)" in dom[dom.index('id="deployments"'):]
    # What the router learnt of a backend it has served shows in its row.
    _, body = await get(cluster.sched.url + "/v1/cluster")
    learnt = next(b for b in body["backends"] if b["key"] == "gpu-node-a/vllm-0")
    assert learnt["ttft_floor_ms"] is not None
    start = dom.index("gpu-node-a/vllm-0</td>", dom.index('id="backends"'))
    row = dom[start:dom.index("</tr>", start)]
    assert f'<td class="num">{learnt["ttft_floor_ms"]:.2f}</td>' in row, row
    tpot = learnt["tpot_ms"]
    assert f'<td class="num">{"-" if tpot is None else format(tpot, ".2f")}</td>' in row, row
    shot = os.environ.get("AIVMM_STATUS_SCREENSHOT")
    if shot:  # how docs/status-page.png is made
        await browse(cluster.sched.url + "/", tmp_path, f"--screenshot={shot}",
                     "--window-size=1280,900", "--hide-scrollbars")


async def test_status_page_without_etcd_says_so(etcd_own: EtcdServer, prefix: str,
                                                tmp_path: Path) -> None:
    with SimProcess("m1", name="only") as sim:
        async with EtcdStore([etcd_own.url]) as store:
            await publish(store, prefix, sim, node="n1")
        async with Scheduler(etcd_own.url, prefix) as sched:
            await sched.wait_models("m1")
            await asyncio.to_thread(etcd_own.stop)
            dom = await browse(sched.url + "/", tmp_path, "--dump-dom")
    assert "etcd disconnected" in dom
    assert "n1/only" in dom  # still routing on its last view, and showing it


async def test_cluster_json_deployments_are_what_aivmmctl_shows(
        etcd_server: EtcdServer, prefix: str, writer: EtcdStore) -> None:
    """The page's deployments come from the same code as ``aivmmctl deployments --json``."""
    await write_placed(writer, prefix)
    assert (await ctl(etcd_server.url, prefix, "scale", "llama", "3")).returncode == 0
    view = status_page.EtcdView(Keys(prefix))
    await view.refresh(writer)
    body = orjson.loads(orjson.dumps(status_page.cluster(Router(), view, None, FailoverLog(),
                                             etcd_connected=True, now=time.monotonic())))
    out = await ctl(etcd_server.url, prefix, "deployments", "--json")
    assert out.returncode == 0, out.stderr
    assert body["deployments"] == orjson.loads(out.stdout)["deployments"]
    llama = body["deployments"][0]
    assert (llama["name"], llama["desired"], llama["placed"], llama["ready"]) == (
        "llama", 3, 2, 2)
    assert llama["reasons"] == ["no node has 2 free nvidia GPUs (gpu-a: 0, gpu-b: 1)"]
    assert "secret" not in out.stdout  # env values never leave etcd through the page
    [change] = body["audit"]  # the last changes, newest first
    assert (change["verb"], change["target"], change["detail"]) == ("scale", "llama",
                                                                    "replicas 3 -> 3")
    assert "secret" not in orjson.dumps(body["audit"]).decode()  # nor through the trail


async def test_status_page_in_headless_chromium_shows_deployments(
        etcd_server: EtcdServer, prefix: str, writer: EtcdStore, tmp_path: Path) -> None:
    """The page's Deployments table, fed by /v1/cluster over hand-written records (a page
    server of the test's own: a scheduler's placer would re-place hand-written records)."""
    await write_placed(writer, prefix)
    view = status_page.EtcdView(Keys(prefix))

    async def page(_: web.Request) -> web.Response:
        return web.Response(text=status_page.PAGE, content_type="text/html")

    async def data(_: web.Request) -> web.Response:
        await view.refresh(writer)
        return web.json_response(status_page.cluster(Router(), view, None, FailoverLog(),
                                         etcd_connected=True, now=time.monotonic()),
                                 dumps=lambda v: orjson.dumps(v).decode())

    app = web.Application()
    app.router.add_get("/", page)
    app.router.add_get("/v1/cluster", data)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        dom = await browse(f"http://127.0.0.1:{port}/", tmp_path, "--dump-dom")
        if shot := os.environ.get("AIVMM_DEPLOYMENTS_SCREENSHOT"):
            await browse(f"http://127.0.0.1:{port}/", tmp_path, f"--screenshot={shot}",
                         "--window-size=1280,900", "--hide-scrollbars")
    finally:
        await runner.cleanup()
    table = dom[dom.index('id="deployments"'):dom.index('id="backends"')]
    for text in ("llama", "llama-8b", "3 / 2 / 2", "mistral", "2 / 0 / 0", "qwen", "1 / 1 / 0",
                 'gpu-a · GPU 0,1 <span class="pill ready">ready</span>',
                 'gpu-b · GPU 2,3 <span class="pill starting">starting</span>',
                 'gpu-c · GPU - <span class="pill removing">removing</span>',
                 'arc-b · GPU 0 (20.0 GiB) <span class="pill assigned">assigned</span>',
                 "1: no node has 2 free nvidia GPUs (gpu-a: 0, gpu-b: 1)",
                 "2: waiting for the placer"):
        assert text in table, text
