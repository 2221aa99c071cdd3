"""The records that cross process boundaries through etcd (DESIGN.md: etcd keys and records).

Records are slotted dataclasses, written with orjson (which serialises dataclasses natively)
and read back through :func:`parse_node` / :func:`parse_backend`. Readers are forward
compatible: unknown fields are ignored. Anything else that is wrong (bad JSON, a missing or
mistyped field, an unknown schema) raises :class:`RecordError` with the reason, so callers
can skip and count the record instead of crashing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import orjson

SCHEMA = 1
VENDORS = ("nvidia", "amd", "intel")
STATES = ("starting", "ready", "unhealthy", "stopped")
Vendor = Literal["nvidia", "amd", "intel"]
State = Literal["starting", "ready", "unhealthy", "stopped"]


class RecordError(ValueError):
    """A record that cannot be used; the message says why."""


@dataclass(slots=True)
class GpuRecord:
    """One GPU of a node, as its driver reports it; ``None`` where the driver is silent."""

    index: int
    vendor: Vendor
    name: str
    uuid: str
    pci_bus_id: str
    render_node: str | None = None
    integrated: bool = False
    memory_total_bytes: int | None = None
    memory_used_bytes: int | None = None
    utilization: float | None = None
    temperature_c: float | None = None
    power_w: float | None = None
    driver: str | None = None
    driver_version: str | None = None
    mig_enabled: bool | None = None
    # The DRM primary node ("/dev/dri/card1"): numbered apart from render nodes (a BMC's
    # display or simpledrm may take card0), so it is read from sysfs, never derived.
    card_node: str | None = None


@dataclass(slots=True)
class NodeRecord:
    """``{prefix}/nodes/{node}``: a machine and its GPUs, bound to the agent's lease."""

    node: str
    agent_version: str
    started_at: float
    heartbeat_at: float
    gpus: list[GpuRecord] = field(default_factory=list)
    agent_url: str | None = None
    schema: int = SCHEMA


@dataclass(slots=True)
class BackendLoad:
    """What the engine itself says about its queue (vLLM's metric names), where it says it."""

    running: int | None = None
    waiting: int | None = None
    kv_cache_usage: float | None = None


@dataclass(slots=True)
class BackendRecord:
    """``{prefix}/backends/{node}/{name}``: one engine and whether it can take requests."""

    node: str
    name: str
    models: list[str]
    url: str
    state: State
    engine: str
    vendor: Vendor | None = None
    gpus: list[str] = field(default_factory=list)
    container_id: str | None = None
    probe_latency_ms: float | None = None
    load: BackendLoad | None = None
    updated_at: float = 0.0
    error: str | None = None
    restarts: int = 0
    # Where the engine serves the OpenAI API under ``url`` (OpenVINO Model Server: /v3).
    api_path: str = "/v1"
    schema: int = SCHEMA


@dataclass(slots=True)
class DrainRecord:
    """``{prefix}/drain/{node}``: an operator asks that node's agent to stop its backends
    until the key is deleted (``aivmmctl drain`` / ``undrain``). Not bound to a lease."""

    node: str
    requested_at: float
    reason: str | None = None
    schema: int = SCHEMA


# -- reading -----------------------------------------------------------------------------------

Check = Callable[[Any], Any]
R = TypeVar("R")


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise TypeError("a string")
    return v


def _int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError("an integer")
    return v


def _num(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise TypeError("a number")
    return float(v)


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise TypeError("true or false")
    return v


def _one_of(*choices: str) -> Check:
    def check(v: Any) -> str:
        if v not in choices:
            raise TypeError("one of " + ", ".join(choices))
        return v
    return check


def _opt(check: Check) -> Check:
    def optional(v: Any) -> Any:
        return None if v is None else check(v)
    return optional


def _list(check: Check) -> Check:
    def each(v: Any) -> list[Any]:
        if not isinstance(v, list):
            raise TypeError("a list")
        return [check(item) for item in v]
    return each


def _nested(cls: type[R], checks: dict[str, Check]) -> Check:
    def nested(v: Any) -> R:
        return _build(cls, v, checks)
    return nested


def _build(cls: type[R], data: Any, checks: dict[str, Check]) -> R:
    if not isinstance(data, dict):
        raise TypeError("an object")
    kwargs = {}
    for name, check in checks.items():
        if name in data:
            try:
                kwargs[name] = check(data[name])
            except TypeError as err:
                raise RecordError(f"field '{name}': expected {err}") from None
            except RecordError as err:
                raise RecordError(f"field '{name}'.{str(err).removeprefix('field ')}") from None
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required field is absent
        missing = str(err).rpartition(": ")[2].replace("'", "")
        raise RecordError(f"missing field(s) {missing}") from None


_GPU: dict[str, Check] = {
    "index": _int, "vendor": _one_of(*VENDORS), "name": _str, "uuid": _str,
    "pci_bus_id": _str, "render_node": _opt(_str), "integrated": _bool,
    "memory_total_bytes": _opt(_int), "memory_used_bytes": _opt(_int),
    "utilization": _opt(_num), "temperature_c": _opt(_num), "power_w": _opt(_num),
    "driver": _opt(_str), "driver_version": _opt(_str), "mig_enabled": _opt(_bool),
    "card_node": _opt(_str),
}
_NODE: dict[str, Check] = {
    "node": _str, "agent_version": _str, "started_at": _num, "heartbeat_at": _num,
    "gpus": _list(_nested(GpuRecord, _GPU)), "agent_url": _opt(_str), "schema": _int,
}
_LOAD: dict[str, Check] = {
    "running": _opt(_int), "waiting": _opt(_int), "kv_cache_usage": _opt(_num),
}
_BACKEND: dict[str, Check] = {
    "node": _str, "name": _str, "models": _list(_str), "url": _str,
    "state": _one_of(*STATES), "engine": _str, "vendor": _opt(_one_of(*VENDORS)),
    "gpus": _list(_str), "container_id": _opt(_str), "probe_latency_ms": _opt(_num),
    "load": _opt(_nested(BackendLoad, _LOAD)), "updated_at": _num, "error": _opt(_str),
    "restarts": _int, "api_path": _str, "schema": _int,
}


def _parse(raw: bytes | str, cls: type[R], checks: dict[str, Check]) -> R:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as err:
        raise RecordError(f"not JSON ({err})") from None
    if not isinstance(data, dict):
        raise RecordError("not a JSON object")
    schema = data.get("schema")
    if schema != SCHEMA:
        raise RecordError(f"unsupported schema {schema!r} (this reader knows {SCHEMA})")
    try:
        return _build(cls, data, checks)
    except TypeError as err:
        raise RecordError(f"expected {err}") from None


def parse_node(raw: bytes | str) -> NodeRecord:
    """Read a node record; raises RecordError with the reason when it is unusable."""
    return _parse(raw, NodeRecord, _NODE)


def parse_backend(raw: bytes | str) -> BackendRecord:
    """Read a backend record; raises RecordError with the reason when it is unusable."""
    return _parse(raw, BackendRecord, _BACKEND)


_DRAIN: dict[str, Check] = {
    "node": _str, "requested_at": _num, "reason": _opt(_str), "schema": _int,
}


def parse_drain(raw: bytes | str) -> DrainRecord:
    """Read a drain request; raises RecordError with the reason when it is unusable."""
    return _parse(raw, DrainRecord, _DRAIN)


def dump(record: NodeRecord | BackendRecord | DrainRecord) -> bytes:
    """Serialise a record to the UTF-8 JSON stored in etcd."""
    return orjson.dumps(record)


def to_dict(record: Any) -> dict[str, Any]:
    """A plain dict of a record (for JSON APIs that embed records)."""
    return dataclasses.asdict(record)
