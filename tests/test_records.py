"""Records: round trip, forward compatibility, and a reason for every invalid shape."""

from __future__ import annotations

import orjson
import pytest

from common.keys import Keys
from common.records import (
    BackendLoad,
    BackendRecord,
    GpuRecord,
    NodeRecord,
    RecordError,
    dump,
    parse_backend,
    parse_node,
)


def gpu(**over: object) -> GpuRecord:
    base = dict(index=0, vendor="amd", name="AMD Instinct MI210", uuid="0x5a1e0c2d9b1f4f12",
                pci_bus_id="0000:03:00.0", render_node="/dev/dri/renderD128",
                memory_total_bytes=68702699520, memory_used_bytes=None, driver="amdgpu")
    base.update(over)
    return GpuRecord(**base)  # type: ignore[arg-type]


def node() -> NodeRecord:
    return NodeRecord(node="gpu-01", agent_version="0.1.0", started_at=1.5, heartbeat_at=2.5,
                      gpus=[gpu(), gpu(index=1, vendor="nvidia", uuid="GPU-1", power_w=70.5)])


def backend() -> BackendRecord:
    return BackendRecord(node="gpu-01", name="llama", models=["m"], url="http://10.0.0.5:8001",
                         state="ready", engine="vllm", vendor="nvidia", gpus=["GPU-1"],
                         container_id="abc", probe_latency_ms=3.5,
                         load=BackendLoad(running=2, waiting=0, kv_cache_usage=0.25),
                         updated_at=10.0)


def test_round_trip() -> None:
    assert parse_node(dump(node())) == node()
    assert parse_backend(dump(backend())) == backend()


def test_every_record_carries_schema_1() -> None:
    assert orjson.loads(dump(node()))["schema"] == 1
    assert orjson.loads(dump(backend()))["schema"] == 1


def test_null_stays_null() -> None:
    doc = orjson.loads(dump(node()))
    assert doc["gpus"][0]["memory_used_bytes"] is None
    assert doc["gpus"][0]["power_w"] is None


def test_unknown_fields_are_ignored() -> None:
    doc = orjson.loads(dump(backend()))
    doc["future_field"] = {"x": 1}
    doc["load"]["new_metric"] = 7
    assert parse_backend(orjson.dumps(doc)) == backend()
    ndoc = orjson.loads(dump(node()))
    ndoc["gpus"][0]["fan_rpm"] = 1200
    assert parse_node(orjson.dumps(ndoc)) == node()


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda d: b"{not json", "not JSON"),
        (lambda d: b"[1, 2]", "not a JSON object"),
        (lambda d: {**d, "schema": 2}, "unsupported schema 2"),
        (lambda d: {k: v for k, v in d.items() if k != "schema"}, "unsupported schema None"),
        (lambda d: {k: v for k, v in d.items() if k != "url"}, "missing field(s) url"),
        (lambda d: {**d, "state": "up"}, "field 'state': expected one of"),
        (lambda d: {**d, "models": "m"}, "field 'models': expected a list"),
        (lambda d: {**d, "models": [1]}, "field 'models': expected a string"),
        (lambda d: {**d, "probe_latency_ms": "fast"}, "field 'probe_latency_ms'"),
        (lambda d: {**d, "load": {"running": "two"}}, "field 'load'.'running'"),
        (lambda d: {**d, "vendor": "matrox"}, "field 'vendor'"),
        (lambda d: {**d, "restarts": True}, "field 'restarts': expected an integer"),
    ],
)
def test_invalid_backend_is_rejected_with_a_reason(mutate, reason: str) -> None:  # type: ignore[no-untyped-def]
    doc = orjson.loads(dump(backend()))
    bad = mutate(doc)
    raw = bad if isinstance(bad, bytes) else orjson.dumps(bad)
    with pytest.raises(RecordError) as info:
        parse_backend(raw)
    assert reason in str(info.value)


def test_invalid_gpu_inside_a_node_names_the_field() -> None:
    doc = orjson.loads(dump(node()))
    doc["gpus"][1]["memory_total_bytes"] = "80GB"
    with pytest.raises(RecordError, match="memory_total_bytes"):
        parse_node(orjson.dumps(doc))


def test_key_layout() -> None:
    keys = Keys("/aivmm/v1")
    assert keys.node("gpu-01") == "/aivmm/v1/nodes/gpu-01"
    assert keys.backend("gpu-01", "llama") == "/aivmm/v1/backends/gpu-01/llama"
    assert keys.split_backend("/aivmm/v1/backends/gpu-01/llama") == ("gpu-01", "llama")
    assert keys.split_backend("/aivmm/v1/nodes/gpu-01") is None
    assert keys.split_backend("/aivmm/v1/backends/gpu-01") is None
    assert keys.split_backend("/aivmm/v1/backends/a/b/c") is None
