"""Records: round trip, forward compatibility, and a reason for every invalid shape."""

from __future__ import annotations

import dataclasses
import types
import typing

import orjson
import pytest

from common.keys import Keys
from common.records import (
    AssignmentRecord,
    BackendLoad,
    BackendRecord,
    DeploymentRecord,
    DrainRecord,
    GpuRecord,
    LeaderRecord,
    NodeRecord,
    PlacementStatus,
    RecordError,
    dump,
    parse_assignment,
    parse_backend,
    parse_deployment,
    parse_drain,
    parse_leader,
    parse_node,
    parse_placement,
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


# -- every field of every record survives the trip ---------------------------------------------

def _non_default(tp: object, name: str) -> object:
    """A value of type ``tp`` that no record field has as its default."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return _non_default(next(a for a in args if a is not type(None)), name)
    if origin is list:
        return [_non_default(args[0], name), _non_default(args[0], name + "2")]
    if origin is dict:
        return {"k-" + name: _non_default(args[1], name)}
    if origin is typing.Literal:
        return args[-1]  # defaults are the first choice where a Literal has one
    if dataclasses.is_dataclass(tp):
        return _filled(tp)  # type: ignore[arg-type]
    if tp is bool:
        return True
    if tp is int:
        return 7 + len(name)
    if tp is float:
        return 0.5 + len(name)
    return f"value-of-{name}"


def _filled(cls: type) -> object:
    hints = typing.get_type_hints(cls)
    values = {f.name: _non_default(hints[f.name], f.name) for f in dataclasses.fields(cls)}
    values["schema"] = 1 if "schema" in values else None
    values = {k: v for k, v in values.items() if v is not None}
    if cls is DeploymentRecord:
        values["name"] = "dep-1"
    return cls(**values)


ALL_RECORDS = [
    (NodeRecord, parse_node), (BackendRecord, parse_backend), (DrainRecord, parse_drain),
    (DeploymentRecord, parse_deployment), (AssignmentRecord, parse_assignment),
    (PlacementStatus, parse_placement), (LeaderRecord, parse_leader),
]


@pytest.mark.parametrize(("cls", "parser"), ALL_RECORDS, ids=lambda c: getattr(c, "__name__", ""))
def test_every_field_set_survives_the_round_trip(cls: type, parser: object) -> None:
    record = _filled(cls)
    for f in dataclasses.fields(cls):
        if f.name == "schema":
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else object())
        assert getattr(record, f.name) != default, f"{cls.__name__}.{f.name} left at default"
    assert parser(dump(record)) == record  # type: ignore[operator]


def test_a_deployment_with_a_bad_name_or_size_is_rejected() -> None:
    good = DeploymentRecord(name="llama", model="m")
    assert parse_deployment(dump(good)) == good
    for bad, field in [(dict(name="a/b"), "name"), (dict(replicas=-1), "replicas"),
                       (dict(memory_bytes=0), "memory_bytes"), (dict(model=" "), "model")]:
        record = dataclasses.replace(good, **bad)  # type: ignore[arg-type]
        with pytest.raises(RecordError, match=field):
            parse_deployment(dump(record))


def test_assignment_names_its_backend() -> None:
    a = AssignmentRecord(deployment="llama", replica=2, node="n1", model="m", engine="vllm")
    assert a.name == "llama-2"
    keys = Keys("/p")
    assert keys.assignment("n1", a.name) == "/p/assignments/n1/llama-2"
    assert keys.split_assignment("/p/assignments/n1/llama-2") == ("n1", "llama-2")
    assert keys.split_assignment("/p/assignments/n1") is None


def test_an_object_field_checks_its_values_too() -> None:
    good = {"schema": 1, "deployment": "d", "placed": 0, "pending": 1,
            "avoid": {"n1": 1700000000},
            "strikes": {"n1": 2}}
    status = parse_placement(orjson.dumps(good))
    assert status.avoid == {"n1": 1700000000.0} and status.strikes == {"n1": 2}
    for field, value, what in (("strikes", {"n1": "two"}, "integers"),
                               ("strikes", {"n1": True}, "integers"),
                               ("avoid", {"n1": None}, "numbers"),
                               ("avoid", ["n1"], "numbers")):
        with pytest.raises(RecordError, match=f"field '{field}': expected an object of {what}"):
            parse_placement(orjson.dumps({**good, field: value}))
