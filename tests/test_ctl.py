"""aivmmctl as an operator runs it, against a real etcd holding records the test writes."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from common.keys import Keys
from common.records import BackendLoad, BackendRecord, GpuRecord, NodeRecord, dump, parse_drain
from common.store import EtcdStore
from devtools.agentproc import ROOT
from devtools.services import EtcdServer, free_port

GIB = 2**30


async def ctl(etcd: str, prefix: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIVMM_")}
    return await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "ctl.main", "--etcd", etcd, "--prefix", prefix,
                         "--timeout", "2", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=30, check=False)


@pytest.fixture
async def cluster(etcd_server: EtcdServer, prefix: str) -> str:
    """Two nodes (an NVIDIA box, an Intel box with a silent iGPU), three backends, and one
    record that does not parse."""
    keys = Keys(prefix)
    now = time.time()
    n1 = NodeRecord("gpu-a", "0.1.0", now - 100, now - 2, agent_url="http://10.0.0.5:9410",
                    gpus=[GpuRecord(0, "nvidia", "NVIDIA H200", "GPU-1", "0000:18:00.0",
                                    memory_total_bytes=80 * GIB, memory_used_bytes=20 * GIB,
                                    utilization=0.37, temperature_c=65, power_w=310)])
    n2 = NodeRecord("arc-b", "0.1.0", now - 50, now - 1, agent_url="http://10.0.0.6:9410",
                    gpus=[GpuRecord(0, "intel", "Arc A770", "i-1", "0000:04:00.0",
                                    memory_total_bytes=16 * GIB),
                          GpuRecord(1, "intel", "UHD 770", "i-2", "0000:00:02.0",
                                    integrated=True)])
    b1 = BackendRecord("gpu-a", "llama", ["llama-8b"], "http://10.0.0.5:8001", "ready", "vllm",
                       vendor="nvidia", probe_latency_ms=12.5,
                       load=BackendLoad(running=2, waiting=1, kv_cache_usage=0.1))
    b2 = BackendRecord("arc-b", "qwen", ["qwen-7b"], "http://10.0.0.6:8001", "unhealthy",
                       "ipex-llm", vendor="intel", error="probe: connection refused")
    b3 = BackendRecord("arc-b", "llama", ["llama-8b"], "http://10.0.0.6:8002", "starting",
                       "ipex-llm", vendor="intel")
    async with EtcdStore([etcd_server.url]) as store:
        await store.put_many([(keys.node(n.node), dump(n)) for n in (n1, n2)]
                             + [(keys.backend(b.node, b.name), dump(b)) for b in (b1, b2, b3)]
                             + [(keys.backend("arc-b", "broken"), b'{"schema": 1}')])
    return etcd_server.url


async def test_status_prints_nodes_gpus_and_backends_as_tables(cluster: str, prefix: str
                                                                ) -> None:
    out = await ctl(cluster, prefix, "status")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "NODES (2)" in lines and "GPUS (3)" in lines and "BACKENDS (3)" in lines
    gpu = next(line.split() for line in lines if "H200" in line)
    assert gpu[:2] == ["gpu-a", "0"] and "20.0/80.0" in gpu and "37%" in gpu and "65C" in gpu
    igpu = next(line.split() for line in lines if "UHD" in line)
    assert "-/-" in igpu and "integrated" in igpu  # unknown figures are "-", never 0
    llama = next(line.split() for line in lines if line.startswith("gpu-a/llama"))
    assert llama[1:5] == ["llama-8b", "ready", "vllm", "12.5ms"]
    assert "run 2 wait 1" in " ".join(llama)
    assert "probe: connection refused" in next(ln for ln in lines if ln.startswith("arc-b/qwen"))
    assert "warning: 1 record(s) could not be parsed and were skipped" in lines
    assert not any(ln.startswith("DEPLOYMENTS") for ln in lines)  # only when there are


async def test_status_json_is_for_scripts(cluster: str, prefix: str) -> None:
    out = await ctl(cluster, prefix, "status", "--json")
    assert out.returncode == 0, out.stderr
    view = orjson.loads(out.stdout)
    assert sorted(n["node"] for n in view["nodes"]) == ["arc-b", "gpu-a"]
    by_name = {f"{b['node']}/{b['name']}": b for b in view["backends"]}
    assert by_name["gpu-a/llama"]["load"]["waiting"] == 1
    assert by_name["arc-b/qwen"]["state"] == "unhealthy"
    assert view["skipped"] == 1 and view["drained"] == [] and view["deployments"] == []


async def test_backends_of_one_model(cluster: str, prefix: str) -> None:
    out = await ctl(cluster, prefix, "backends", "--model", "llama-8b")
    assert out.returncode == 0, out.stderr
    rows = [line.split()[0] for line in out.stdout.splitlines()[1:]]
    assert sorted(rows) == ["arc-b/llama", "gpu-a/llama"]
    js = orjson.loads((await ctl(cluster, prefix, "backends", "--model", "qwen-7b",
                                 "--json")).stdout)
    assert [(b["node"], b["name"]) for b in js] == [("arc-b", "qwen")]
    none = await ctl(cluster, prefix, "backends", "--model", "nope")
    assert none.returncode == 0 and none.stdout.strip() == "no backend serves 'nope'"


async def test_drain_writes_the_request_and_undrain_removes_it(cluster: str, prefix: str
                                                                ) -> None:
    out = await ctl(cluster, prefix, "drain", "gpu-a", "--reason", "driver update")
    assert out.returncode == 0 and out.stdout.startswith("gpu-a drained"), out.stderr
    async with EtcdStore([cluster]) as store:
        record = parse_drain(await store.get(Keys(prefix).drain("gpu-a")) or b"")
    assert record.node == "gpu-a" and record.reason == "driver update"
    assert abs(record.requested_at - time.time()) < 30
    status = (await ctl(cluster, prefix, "status")).stdout.splitlines()
    assert next(ln for ln in status if ln.startswith("gpu-a ")).split()[-1] == "drained"

    unknown = await ctl(cluster, prefix, "drain", "nobody")
    assert unknown.returncode == 0 and "no node 'nobody' is registered" in unknown.stderr
    assert "drained, not running: nobody" in (await ctl(cluster, prefix, "status")).stdout

    out = await ctl(cluster, prefix, "undrain", "gpu-a")
    assert out.returncode == 0 and "undrained" in out.stdout
    async with EtcdStore([cluster]) as store:
        assert await store.get(Keys(prefix).drain("gpu-a")) is None


async def test_prometheus_targets_lists_every_agent(cluster: str, prefix: str,
                                                    tmp_path: Path) -> None:
    path = tmp_path / "agents.json"
    out = await ctl(cluster, prefix, "prometheus-targets", "-o", str(path))
    assert out.returncode == 0, out.stderr
    assert orjson.loads(path.read_text()) == [
        {"targets": ["10.0.0.6:9410"], "labels": {"node": "arc-b"}},
        {"targets": ["10.0.0.5:9410"], "labels": {"node": "gpu-a"}}]
    # A path that cannot be written is one clear line, not a traceback, and the file that
    # was there stays as it was.
    before = path.read_text()
    for bad in (tmp_path / "no-such-dir" / "agents.json", tmp_path):
        out = await ctl(cluster, prefix, "prometheus-targets", "-o", str(bad))
        assert out.returncode == 1
        assert out.stderr.startswith(f"aivmmctl: cannot write {bad}: "), out.stderr
        assert "Traceback" not in out.stderr
    assert path.read_text() == before


@pytest.mark.parametrize("verb", [["status"], ["backends"], ["drain", "n1"], ["deployments"],
                                  ["deploy", "d1", "--model", "m"], ["scale", "d1", "2"],
                                  ["undeploy", "d1"]])
async def test_unreachable_etcd_is_one_clear_line(verb: list[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    out = await ctl(url, "/aivmm/v1", *verb)
    assert out.returncode == 1
    assert out.stderr.strip() == f"aivmmctl: cannot reach etcd at {url}"
    assert out.stdout == ""


async def test_malformed_etcd_url_is_a_usage_error() -> None:
    out = await ctl("http://127.0.0.1:notaport", "/aivmm/v1", "status")
    assert out.returncode == 2
    assert out.stderr.startswith("aivmmctl: --etcd: ") and "notaport" in out.stderr
    assert "Traceback" not in out.stderr
