"""The records that cross process boundaries through etcd (docs/contracts.md: etcd records).

Records are slotted dataclasses, written with orjson (which serialises dataclasses natively)
and read back through :func:`parse_node` / :func:`parse_backend`. Readers are forward
compatible: unknown fields are ignored. Anything else that is wrong (bad JSON, a missing or
mistyped field, an unknown schema) raises :class:`RecordError` with the reason, so callers
can skip and count the record instead of crashing.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import orjson

from common.typedesc import describe

SCHEMA = 1
Vendor = Literal["nvidia", "amd", "intel"]
# "draining": a replica being scaled away; it takes no new requests, in-flight ones finish.
# "downloading": the agent fetches the model's weights before it starts the engine
# (docs/models.md); ``bytes_done``/``bytes_total``/``download_rate`` say how far it is.
State = Literal["starting", "ready", "unhealthy", "stopped", "draining", "downloading"]
Policy = Literal["spread", "binpack", "cost"]
AuditSource = Literal["aivmmctl", "placer", "agent", "scheduler"]
VENDORS: tuple[Vendor, ...] = typing.get_args(Vendor)
STATES: tuple[State, ...] = typing.get_args(State)
POLICIES: tuple[Policy, ...] = typing.get_args(Policy)
# Names of nodes, backends and deployments: they become etcd key parts and container names.
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


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
    # The PCI vendor:device ids ("1002:744c"), kept beside the name pci.ids gave them.
    pci_id: str | None = None


@dataclass(slots=True)
class NodeRecord:
    """``{prefix}/nodes/{node}``: a machine and its GPUs, bound to the agent's lease."""

    node: str
    agent_version: str
    started_at: float
    heartbeat_at: float
    gpus: list[GpuRecord] = field(default_factory=list)
    agent_url: str | None = None
    # Operator labels from agent.toml's [labels]; deployments may require some of them.
    labels: dict[str, str] = field(default_factory=dict)
    # CPUs the agent may give its engines (its affinity), for deployments' CPU quotas.
    cpu_count: int | None = None
    # What the machine costs per hour (agent.toml cost_per_hour, any currency); None: unknown.
    cost_per_hour: float | None = None
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
    # The deployment this backend is a replica of; None for a backend pinned in agent.toml.
    deployment: str | None = None
    # While "downloading" (docs/models.md): bytes of the model on disk, of the whole model,
    # and the recent rate in bytes/s; None otherwise.
    bytes_done: int | None = None
    bytes_total: int | None = None
    download_rate: float | None = None
    # A replica's: the generation of the assignment its running container was made for
    # (it lags the assignment while the container is being replaced); None: none runs, or
    # a pinned backend. A rolling update waits on it (docs/deployments.md).
    generation: str | None = None
    schema: int = SCHEMA


@dataclass(slots=True)
class ModelCopy:
    """One model in a node's models_dir (docs/models.md)."""

    model: str
    size_bytes: int = 0
    # "complete" (fetched and verified), "partial" (a download not finished), "local" (put
    # there by hand, not fetched by the agent).
    state: str = "complete"
    revision: str | None = None
    last_used: float | None = None  # when an engine was last started with it here
    in_use: list[str] = field(default_factory=list)  # this node's backends serving it


@dataclass(slots=True)
class ModelsRecord:
    """``{prefix}/models/{node}``: what the node's models_dir holds, under its lease."""

    node: str
    # The models_dir's identity: nodes sharing one (NFS, Ceph) show the same storage id.
    storage: str
    models_dir: str
    free_bytes: int | None = None
    models: list[ModelCopy] = field(default_factory=list)
    updated_at: float = 0.0
    schema: int = SCHEMA


@dataclass(slots=True)
class ModelRemoval:
    """``{prefix}/model-rm/{node}/{model, escaped}``: an operator asks that node's agent to
    delete a model it does not use (``aivmmctl models rm``); the agent deletes the key."""

    node: str
    model: str
    requested_at: float
    actor: str = ""
    schema: int = SCHEMA


@dataclass(slots=True)
class DrainRecord:
    """``{prefix}/drain/{node}``: an operator asks that node's agent to stop its backends
    until the key is deleted (``aivmmctl drain`` / ``undrain``). Not bound to a lease."""

    node: str
    requested_at: float
    reason: str | None = None
    schema: int = SCHEMA


@dataclass(slots=True)
class AutoscalePolicy:
    """A deployment's autoscaling (docs/autoscaling.md): the elected placer keeps the replica
    count between ``min_replicas`` and ``max_replicas`` so that each replica carries about
    ``target_load`` requests (in flight + queued)."""

    min_replicas: int = 0
    max_replicas: int = 4
    # Requests in flight + queued per replica; vLLM batches well up to a few dozen.
    target_load: float = 8.0
    # Load must stay below the lower threshold this long (and no action this long) to scale
    # down by one step or more.
    scale_down_delay_s: float = 60.0
    # With min_replicas 0: no request for this long scales to zero.
    idle_seconds: float = 300.0
    # Load must stay above the target this long to scale up (from zero: at once).
    scale_up_delay_s: float = 2.0


@dataclass(slots=True)
class DeploymentRecord:
    """``{prefix}/deployments/{name}``: a model the fleet should serve (desired state).

    Written by operators (``aivmmctl deploy``/``scale``); read by the placer. A replica takes
    ``gpus`` whole GPUs of one node, or, when ``memory_bytes`` is set, that much memory of
    one GPU that other replicas may share. ``engine`` "auto" means any engine whose profile
    runs on the chosen GPU's vendor.
    """

    name: str
    model: str
    engine: str = "auto"
    replicas: int = 1
    gpus: int = 1
    memory_bytes: int | None = None
    vendors: list[Vendor] = field(default_factory=list)
    nodes: list[str] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    image: str | None = None
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    placement: Policy = "spread"
    # A CPU quota per replica, in cores (Docker's NanoCPUs); None: no quota.
    cpus: float | None = None
    created_at: float = 0.0
    updated_at: float = 0.0
    # Set: the placer scales the replicas on load and ``replicas`` is only the start value.
    autoscale: AutoscalePolicy | None = None
    schema: int = SCHEMA


def autoscale_problem(a: AutoscalePolicy) -> str | None:
    """Why an autoscale policy is unusable (flag names are aivmmctl's), or None."""
    if a.min_replicas < 0:
        return "field 'autoscale.min_replicas': expected an integer >= 0"
    if a.max_replicas < max(1, a.min_replicas):
        return "field 'autoscale.max_replicas': expected an integer >= 1 and >= min_replicas"
    if not a.target_load > 0:
        return "field 'autoscale.target_load': expected a number > 0"
    for name in ("scale_down_delay_s", "idle_seconds", "scale_up_delay_s"):
        if not getattr(a, name) >= 0:
            return f"field 'autoscale.{name}': expected a number >= 0"
    return None


def deployment_problem(d: DeploymentRecord) -> str | None:
    """Why a deployment cannot be acted on (shared by aivmmctl and every reader), or None."""
    if not NAME.match(d.name) or len(d.name) > 48:
        return "field 'name': expected a name of letters, digits, '.', '_' or '-' (max 48)"
    if not d.model.strip():
        return "field 'model': expected a model id"
    if d.replicas < 0:
        return "field 'replicas': expected an integer >= 0"
    if d.gpus < 0:
        return "field 'gpus': expected an integer >= 0"
    if d.memory_bytes is not None and d.memory_bytes <= 0:
        return "field 'memory_bytes': expected a size > 0"
    if d.cpus is not None and not 0.01 <= d.cpus <= 4096:
        return "field 'cpus': expected a number of cores from 0.01 to 4096"
    if d.autoscale is not None:
        return autoscale_problem(d.autoscale)
    return None


@dataclass(slots=True)
class AssignmentRecord:
    """``{prefix}/assignments/{node}/{deployment}-{replica}``: one replica placed on a node.

    Written only by the elected placer, in transactions fenced on its election; the node's
    agent runs a backend named :attr:`name` for it. Self-contained: the agent needs nothing
    else to build the container.
    """

    deployment: str
    replica: int
    node: str
    model: str
    engine: str
    vendor: Vendor | None = None
    gpus: list[int] = field(default_factory=list)
    gpu_uuids: list[str] = field(default_factory=list)
    # Memory reserved on each of ``gpus`` when replicas share a GPU; None: whole GPUs.
    memory_bytes: int | None = None
    image: str | None = None
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    cpus: float | None = None
    # A digest of the deployment fields the container depends on: a changed deployment
    # makes a new generation, and its replicas are placed again.
    generation: str = ""
    assigned_at: float = 0.0
    # A replica being scaled away: its agent reports it "draining" (routed no new requests)
    # and the placer deletes the assignment once its requests have finished.
    draining: bool = False
    schema: int = SCHEMA

    @property
    def name(self) -> str:
        """The backend name on the node (and the last part of the assignment key)."""
        return f"{self.deployment}-{self.replica}"


@dataclass(slots=True)
class PlacementStatus:
    """``{prefix}/placement/{deployment}``: what the placer did with a deployment.

    ``pending`` replicas could not be placed; ``reasons`` says why, naming the shortfall.
    """

    deployment: str
    placed: int
    pending: int
    reasons: list[str] = field(default_factory=list)
    placer: str = ""
    updated_at: float = 0.0
    # Autoscaled deployments only: the replica count the autoscaler decided, and when it
    # last changed it (a new leader goes on from these).
    desired: int | None = None
    scaled_at: float = 0.0
    # Nodes where this deployment's replicas did not start: avoided until the given time
    # (Unix seconds), and how many times each failed (the next hold doubles). A new leader
    # goes on from these instead of placing there again at once.
    avoid: dict[str, float] = field(default_factory=dict)
    strikes: dict[str, int] = field(default_factory=dict)
    # Replicas not ready yet, by assignment key (node/name): since when (Unix seconds), and
    # their backend's restart count then. A new leader times their start from these
    # instead of giving each one ``placer_replace_after`` afresh.
    unready_since: dict[str, float] = field(default_factory=dict)
    unready_restarts: dict[str, int] = field(default_factory=dict)
    schema: int = SCHEMA


@dataclass(slots=True)
class ModelLoad:
    """One model's requests at one scheduler replica."""

    model: str
    inflight: int = 0  # forwarded to a backend, not answered yet
    queued: int = 0  # waiting for a usable backend (a cold start included)
    last_request_at: float = 0.0  # Unix seconds of the last request that arrived


@dataclass(slots=True)
class BackendInflight:
    """Requests one scheduler replica has in flight on one backend (``node/name``)."""

    backend: str
    inflight: int


@dataclass(slots=True)
class SchedulerLoad:
    """``{prefix}/load/{replica}``: a scheduler replica's demand, under its own lease, for the
    autoscaler; rewritten every ~2 s when it changed, at once when a cold model gets a
    request."""

    replica: str
    models: list[ModelLoad] = field(default_factory=list)
    backends: list[BackendInflight] = field(default_factory=list)
    updated_at: float = 0.0
    schema: int = SCHEMA


@dataclass(slots=True)
class LeaderRecord:
    """``{prefix}/placer/leader``: the scheduler process that places, under its lease."""

    holder: str
    since: float
    schema: int = SCHEMA


@dataclass(slots=True)
class AuditEntry:
    """``{prefix}/audit/{time_ns:019d}-{suffix}``: one change to the cluster, and who made it.

    Written by aivmmctl in the same transaction as the change, and by the placer and the
    agents for what they do on their own. ``old`` and ``new`` are the compact JSON text of
    the value before and after (None: absent); ``detail`` is one line saying why.
    """

    time: float
    actor: str
    source: AuditSource
    verb: str
    target: str
    old: str | None = None
    new: str | None = None
    detail: str = ""
    schema: int = SCHEMA


@dataclass(slots=True)
class RouteTarget:
    """One target of a route: a deployment name or a plain model id, and its weight."""

    target: str
    weight: int


@dataclass(slots=True)
class RouteGuard:
    """When a scheduler replica sets a target's weight to 0 (docs/routes.md: the guard)."""

    window_s: float = 60.0
    min_requests: int = 20
    max_error_rate: float | None = None  # a share, 0..1; None: not checked
    max_p95_ttft_ms: float | None = None  # None: not checked


@dataclass(slots=True)
class GuardTrip:
    """A target the guard took out of its route, with the figures that made it do so."""

    target: str
    at: float
    by: str  # the scheduler replica that tripped it
    reason: str  # one line: which threshold, the figure and the window
    requests: int = 0
    errors: int = 0
    p95_ttft_ms: float | None = None


@dataclass(slots=True)
class RouteRecord:
    """``{prefix}/routes/{name}``: a model name clients may ask for that the schedulers
    split over targets by weight, with fallbacks and an optional guard (docs/routes.md).

    Written by ``aivmmctl route``; a scheduler's guard only appends to ``tripped``.
    """

    name: str
    targets: list[RouteTarget]
    fallback: list[str] = field(default_factory=list)
    guard: RouteGuard | None = None
    # Targets the guard took out (effective weight 0) until an operator restores them.
    tripped: list[GuardTrip] = field(default_factory=list)
    created_at: float = 0.0
    updated_at: float = 0.0
    schema: int = SCHEMA


def route_problem(r: RouteRecord) -> str | None:
    """Why a route cannot be used (shared by aivmmctl and every reader), or None."""
    if not NAME.match(r.name) or len(r.name) > 63:
        return "field 'name': expected a name of letters, digits, '.', '_' or '-'"
    if not r.targets:
        return "field 'targets': expected at least one target"
    names = [t.target for t in r.targets]
    if any(not n.strip() for n in names + r.fallback):
        return "field 'targets': expected non-blank target names"
    if len(set(names)) != len(names):
        return "field 'targets': expected distinct targets"
    if any(t.weight < 0 for t in r.targets) or sum(t.weight for t in r.targets) <= 0:
        return "field 'targets': expected weights >= 0 adding up to more than 0"
    g = r.guard
    if g is not None:
        if g.window_s <= 0 or g.min_requests < 1:
            return "field 'guard': expected window_s > 0 and min_requests >= 1"
        if g.max_error_rate is not None and not 0 <= g.max_error_rate <= 1:
            return "field 'guard': expected max_error_rate from 0 to 1"
        if g.max_p95_ttft_ms is not None and g.max_p95_ttft_ms <= 0:
            return "field 'guard': expected max_p95_ttft_ms > 0"
    return None


@dataclass(slots=True)
class TargetFigures:
    """One scheduler replica's counters for one target of one route, since ``since``."""

    route: str
    target: str
    requests: int = 0
    errors: int = 0
    fallbacks: int = 0  # requests that reached this target as a fallback
    ttft_sum_s: float = 0.0
    ttft_count: int = 0
    p95_ttft_ms: float | None = None  # over the guard window (or the last 60 s)
    output_tokens: int = 0
    generation_s: float = 0.0  # seconds spent generating the tokens counted


@dataclass(slots=True)
class BackendFigures:
    """One scheduler replica's output tokens for one backend, over ``seconds`` of watching."""

    backend: str  # node/name
    output_tokens: int = 0
    seconds: float = 0.0


@dataclass(slots=True)
class RouteStats:
    """``{prefix}/route-stats/{replica}``: a scheduler replica's route and backend figures,
    under its own lease, rewritten at most every few seconds (aivmmctl routes sums them)."""

    replica: str
    since: float
    updated_at: float
    targets: list[TargetFigures] = field(default_factory=list)
    backends: list[BackendFigures] = field(default_factory=list)
    schema: int = SCHEMA


@dataclass(slots=True)
class KeyRecord:
    """``{prefix}/keys/{name}``: one client API key (docs/keys.md), written by aivmmctl.

    Only the key's SHA-256 is stored, never the key. ``None`` limits are no limit; ``models``
    empty is every model. A revoked key stays (for the trail) and is refused.
    """

    name: str
    hash: str  # "sha256:" + 64 hex digits of the key
    prefix: str  # the key's first characters, to recognise it in listings
    models: list[str] = field(default_factory=list)
    rpm: int | None = None
    tpm: int | None = None
    max_parallel: int | None = None
    expires_at: float | None = None
    created_at: float = 0.0
    updated_at: float = 0.0
    revoked: bool = False
    # May read per-key usage in /v1/cluster (the status page).
    operator: bool = False
    schema: int = SCHEMA


def key_problem(k: KeyRecord) -> str | None:
    """Why a key record cannot be used (flag names are aivmmctl's), or None."""
    if not NAME.match(k.name):
        return "field 'name': expected a name of letters, digits, '.', '_' or '-' (max 63)"
    hexpart = k.hash.removeprefix("sha256:")
    if not k.hash.startswith("sha256:") or len(hexpart) != 64 or \
            any(c not in "0123456789abcdef" for c in hexpart):
        return "field 'hash': expected 'sha256:' and 64 lower-case hex digits"
    for name in ("rpm", "tpm", "max_parallel"):
        value = getattr(k, name)
        if value is not None and value < 1:
            return f"field '{name}': expected an integer >= 1 or null"
    return None


@dataclass(slots=True)
class SchedulerPresence:
    """``{prefix}/schedulers/{replica}``: a live scheduler replica, under its own lease;
    replicas count each other from these to take their share of a key's limits."""

    replica: str
    listen: str = ""
    started_at: float = 0.0
    schema: int = SCHEMA


@dataclass(slots=True)
class KeyCounts:
    """One key's counts at one scheduler replica over one usage bucket."""

    name: str
    requests: int = 0
    errors: int = 0
    rate_limited: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(slots=True)
class KeyUsage:
    """``{prefix}/key-usage/{bucket}/{replica}``: what one scheduler replica counted per key
    in the hour starting at ``bucket`` (Unix seconds); no lease, rewritten every few
    seconds while it changes (aivmmctl usage sums them)."""

    replica: str
    bucket: int
    updated_at: float = 0.0
    keys: list[KeyCounts] = field(default_factory=list)
    schema: int = SCHEMA


# -- reading -----------------------------------------------------------------------------------
# The checks are derived from each record's type hints, so a record is declared once: a field
# added to a dataclass is read back by every reader without a second table to keep in step.

Check = Callable[[Any], Any]
R = TypeVar("R")


def _check_for(tp: Any) -> Check:
    """A function that returns the value converted to ``tp`` or raises TypeError/RecordError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1:
            raise TypeError(f"records support only 'X | None' unions, not {tp!r}")
        check = _check_for(inner[0])
        return lambda v: None if v is None else check(v)
    if origin is list:
        each = _check_for(args[0])

        def check_list(v: Any) -> list[Any]:
            if not isinstance(v, list):
                raise TypeError("a list")
            return [each(item) for item in v]
        return check_list
    if origin is dict:
        value = _check_for(args[1])
        what = {str: "strings", int: "integers", float: "numbers"}.get(args[1], "values")

        def check_dict(v: Any) -> dict[str, Any]:
            if not isinstance(v, dict):
                raise TypeError(f"an object of {what}")
            try:
                return {k: value(x) for k, x in v.items()}
            except TypeError:
                raise TypeError(f"an object of {what}") from None
        return check_dict
    if origin is Literal:
        def check_choice(v: Any) -> Any:
            if v not in args:
                raise TypeError(describe(tp, table="object"))
            return v
        return check_choice
    if dataclasses.is_dataclass(tp):
        return lambda v: _build(typing.cast("type[Any]", tp), v)

    def check_plain(v: Any) -> Any:
        if isinstance(v, bool) and tp is not bool:
            raise TypeError(describe(tp, table="object"))
        if tp is float and isinstance(v, int):
            return float(v)
        if not isinstance(v, tp):
            raise TypeError(describe(tp, table="object"))
        return v
    return check_plain


@functools.cache
def _checks(cls: type[Any]) -> dict[str, Check]:
    hints = typing.get_type_hints(cls)
    return {f.name: _check_for(hints[f.name]) for f in dataclasses.fields(cls)}


def _build(cls: type[R], data: Any) -> R:
    if not isinstance(data, dict):
        raise TypeError("an object")
    kwargs = {}
    for name, check in _checks(cls).items():  # type: ignore[arg-type]  # a class is hashable
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


def parse(raw: bytes | str, cls: type[R]) -> R:
    """Read a record of type ``cls``; raises RecordError with the reason when it is unusable."""
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
        return _build(cls, data)
    except TypeError as err:
        raise RecordError(f"expected {err}") from None


def parse_node(raw: bytes | str) -> NodeRecord:
    """Read a node record; raises RecordError with the reason when it is unusable."""
    return parse(raw, NodeRecord)


def parse_backend(raw: bytes | str) -> BackendRecord:
    """Read a backend record; raises RecordError with the reason when it is unusable."""
    return parse(raw, BackendRecord)


def parse_models(raw: bytes | str) -> ModelsRecord:
    """Read a node's models record; raises RecordError with the reason when it is unusable."""
    return parse(raw, ModelsRecord)


def parse_model_removal(raw: bytes | str) -> ModelRemoval:
    """Read a model removal request; raises RecordError when it is unusable."""
    return parse(raw, ModelRemoval)


def parse_drain(raw: bytes | str) -> DrainRecord:
    """Read a drain request; raises RecordError with the reason when it is unusable."""
    return parse(raw, DrainRecord)


def parse_deployment(raw: bytes | str) -> DeploymentRecord:
    """Read a deployment; raises RecordError with the reason when it is unusable."""
    record = parse(raw, DeploymentRecord)
    problem = deployment_problem(record)
    if problem:
        raise RecordError(problem)
    return record


def parse_assignment(raw: bytes | str) -> AssignmentRecord:
    """Read an assignment; raises RecordError with the reason when it is unusable."""
    return parse(raw, AssignmentRecord)


def parse_placement(raw: bytes | str) -> PlacementStatus:
    """Read a deployment's placement status; raises RecordError when it is unusable."""
    return parse(raw, PlacementStatus)


def parse_load(raw: bytes | str) -> SchedulerLoad:
    """Read a scheduler replica's load record; raises RecordError when it is unusable."""
    return parse(raw, SchedulerLoad)


def parse_leader(raw: bytes | str) -> LeaderRecord:
    """Read the placer election's leader record; raises RecordError when it is unusable."""
    return parse(raw, LeaderRecord)


def parse_audit(raw: bytes | str) -> AuditEntry:
    """Read an audit entry; raises RecordError with the reason when it is unusable."""
    return parse(raw, AuditEntry)


def parse_route(raw: bytes | str) -> RouteRecord:
    """Read a route; raises RecordError with the reason when it is unusable."""
    record = parse(raw, RouteRecord)
    problem = route_problem(record)
    if problem:
        raise RecordError(problem)
    return record


def parse_route_stats(raw: bytes | str) -> RouteStats:
    """Read a scheduler replica's route figures; raises RecordError when unusable."""
    return parse(raw, RouteStats)


def parse_key(raw: bytes | str) -> KeyRecord:
    """Read an API key record; raises RecordError with the reason when it is unusable."""
    record = parse(raw, KeyRecord)
    problem = key_problem(record)
    if problem:
        raise RecordError(problem)
    return record


def parse_each(values: Iterable[bytes], parser: Callable[[bytes], R]) -> tuple[list[R], int]:
    """The records among ``values`` that parse, and how many did not (readers skip and count
    an unusable record, never stop on it)."""
    out: list[R] = []
    bad = 0
    for raw in values:
        try:
            out.append(parser(raw))
        except RecordError:
            bad += 1
    return out, bad


def dump(record: Any) -> bytes:
    """Serialise a record to the UTF-8 JSON stored in etcd."""
    return orjson.dumps(record)


def to_dict(record: Any) -> dict[str, Any]:
    """A plain dict of a record (for JSON APIs that embed records)."""
    return dataclasses.asdict(record)
