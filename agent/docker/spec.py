"""The container a backend runs in, as plain data: image, command, env, labels, devices.

Pure: built from the config, the GPUs placement gave the backend and the engine profile. The
config hash covers every field that defines the container, so a changed config means a new
hash and a recreated container, and an agent restart with the same config adopts the old one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace

import orjson

from agent.config import BackendConfig, cpuset_cores
from agent.engines import resolve
from common.records import GpuRecord, Vendor

LABEL_MANAGED = "aivmm.managed"
LABEL_NODE = "aivmm.node"
LABEL_BACKEND = "aivmm.backend"
LABEL_HASH = "aivmm.config-hash"
# Set on a deployment's replicas: the agent keeps such a container through a restart until
# it knows its assignments, and re-learns the port it gave the replica.
LABEL_DEPLOYMENT = "aivmm.deployment"
LABEL_PORT = "aivmm.port"
MODELS_MOUNT = "/models"
# Processes and threads an engine may have (vLLM and SGLang run hundreds of threads).
PIDS_LIMIT = 4096
# Docker's json-file log, rotated: three files of 50 MB.
LOG_CONFIG = {"type": "json-file", "config": {"max-size": "50m", "max-file": "3"}}
# Fields added to the spec after containers already ran with it: they enter the config hash
# only when set, so that upgrading the agent does not recreate every engine of the fleet.
_ADDED_LATER = frozenset({"nano_cpus", "cpuset_cpus"})


@dataclass(frozen=True, slots=True)
class ContainerSpec:
    """Everything the Docker adapter needs to create one backend's container."""

    name: str  # the container name
    backend: str
    node: str
    model: str
    engine: str
    image: str
    entrypoint: list[str] | None
    command: list[str]
    env: dict[str, str]
    network: str  # "host" or "bridge"
    port: int
    # Bridge only: the published container port -> (host address, host port).
    ports: dict[str, tuple[str, int]]
    vendor: Vendor | None
    gpu_uuids: list[str]
    nvidia_device_ids: list[str]  # a device request for these, when not empty
    devices: list[str]  # "/dev/x:/dev/x:rwm"
    group_add: list[str]
    volumes: dict[str, dict[str, str]]
    mem_limit: str | None
    nano_cpus: int | None  # Docker's CPU quota: cores x 1e9
    cpuset_cpus: str | None
    security_opt: list[str]
    health_path: str
    api_path: str
    url: str
    labels: dict[str, str] = field(default_factory=dict)
    # docs/security.md: every capability dropped (the profile adds back what its engine
    # needs), a process limit, and a bounded log.
    cap_drop: list[str] = field(default_factory=lambda: ["ALL"])
    cap_add: list[str] = field(default_factory=list)
    pids_limit: int = PIDS_LIMIT
    log_config: dict[str, object] = field(default_factory=lambda: dict(LOG_CONFIG))

    @property
    def config_hash(self) -> str:
        return self.labels[LABEL_HASH]


def container_name(node: str, backend: str) -> str:
    return f"aivmm-{node}-{backend}"


def _gpu_access(vendor: Vendor | None, gpus: Sequence[GpuRecord],
                node_gpus: Sequence[GpuRecord], gids: Mapping[str, int]
                ) -> tuple[list[str], list[str], list[str], dict[str, str]]:
    """(nvidia device ids, device nodes, groups, env) for the GPUs (docs/contracts.md).

    ``gids`` maps device nodes to the gid owning them on the host (read by the caller, so
    this stays pure): the container joins those groups by number, which works in images
    whose /etc/group lacks "video"/"render". Without them AMD falls back to the names.
    """
    if not gpus:
        return [], [], [], {}
    renders = [g.render_node for g in gpus if g.render_node]
    if vendor == "nvidia":
        uuids = [g.uuid for g in gpus]
        return uuids, [], [], {"NVIDIA_VISIBLE_DEVICES": ",".join(uuids)}
    # Inside the container only the mapped GPUs enumerate, numbered from 0 in this order.
    local = ",".join(str(i) for i in range(len(gpus)))
    if vendor == "amd":
        devices = ["/dev/kfd", *renders]
        return [], [f"{d}:{d}:rwm" for d in devices], _groups(devices, gids, ["video", "render"]), \
            {"HIP_VISIBLE_DEVICES": local}
    cards = [g.card_node for g in gpus if g.card_node]
    devices = [*renders, *cards]
    env = {}
    if sum(1 for g in node_gpus if g.vendor == "intel") > 1:
        env["ZE_AFFINITY_MASK"] = local
    return [], [f"{d}:{d}:rwm" for d in devices], _groups(devices, gids, []), env


def _groups(devices: Sequence[str], gids: Mapping[str, int], names: list[str]) -> list[str]:
    """The numeric gids owning ``devices`` (once each, in device order); ``names`` when
    none of them could be read."""
    found = [str(gids[d]) for d in devices if d in gids]
    return list(dict.fromkeys(found)) if found else names


def build_spec(node: str, backend: BackendConfig, gpus: Sequence[GpuRecord],
               vendor: Vendor | None, *, models_dir: str, advertise_host: str,
               node_gpus: Sequence[GpuRecord] = (), deployment: str | None = None,
               device_gids: Mapping[str, int] | None = None,
               engine_api_key: str | None = None) -> ContainerSpec:
    """The container for ``backend`` with ``gpus``; raises EngineError when it cannot run.

    ``device_gids``: the host gid owning each device node (agent.inventory.devnodes).
    ``engine_api_key``: the key the engine demands of clients (only the scheduler has it),
    passed in the profile's environment variable, never on the command line."""
    host_net = backend.network == "host"
    # With host networking the engine binds the advertised address itself; on a bridge it
    # binds everything inside its namespace and Docker publishes the port on that address.
    bind_host = advertise_host if host_net else "0.0.0.0"
    launch = resolve(backend, vendor, bind_host)
    nvidia_ids, devices, groups, gpu_env = _gpu_access(vendor, gpus, node_gpus,
                                                      device_gids or {})
    spec = ContainerSpec(
        name=container_name(node, backend.name),
        backend=backend.name,
        node=node,
        model=backend.model,
        engine=backend.engine,
        image=launch.image,
        entrypoint=launch.entrypoint,
        command=launch.command,
        env={**gpu_env, **launch.env,
             **({launch.api_key_env: engine_api_key}
                if engine_api_key and launch.api_key_env else {})},
        network="host" if host_net else "bridge",
        port=backend.port,
        ports={} if host_net else {f"{backend.port}/tcp": (advertise_host, backend.port)},
        vendor=vendor,
        gpu_uuids=[g.uuid for g in gpus],
        nvidia_device_ids=nvidia_ids,
        devices=devices,
        group_add=groups,
        volumes={models_dir: {"bind": MODELS_MOUNT, "mode": "ro"}},
        mem_limit=backend.memory_limit,
        nano_cpus=None if backend.cpus is None else round(backend.cpus * 1e9),
        cpuset_cpus=backend.cpuset,
        security_opt=["no-new-privileges"],
        health_path=launch.health_path,
        api_path=launch.api_path,
        url=backend_url(advertise_host, backend.port),
        cap_add=list(launch.cap_add),
    )
    defined = {k: v for k, v in asdict(spec).items() if not (k in _ADDED_LATER and v is None)}
    # The groups follow from the device nodes: numeric gids read from them now, the names
    # "video"/"render" (AMD only) before. Hashed as before, so that an agent upgrade does not
    # recreate every AMD and Intel engine of the fleet; a container made with the names keeps
    # working as it did.
    defined["group_add"] = ["video", "render"] if vendor == "amd" and gpus else []
    digest = hashlib.sha256(orjson.dumps(defined, option=orjson.OPT_SORT_KEYS))
    labels = {LABEL_MANAGED: "true", LABEL_NODE: node, LABEL_BACKEND: backend.name,
              LABEL_HASH: digest.hexdigest()[:16], LABEL_PORT: str(backend.port)}
    if deployment is not None:
        labels[LABEL_DEPLOYMENT] = deployment
    return replace(spec, labels=labels)


def quota_problem(cpus: float | None, cpuset: str | None, cores: set[int]) -> str | None:
    """Why a CPU quota cannot be honoured on a node whose usable CPUs are ``cores``, or None.

    Docker would accept a quota above the node's cores (and enforce nothing), and refuse a
    cpuset naming a CPU the node lacks only when the container starts: say it first.
    """
    if cpus is not None and cpus > len(cores):
        return f"cpus {cpus:g} exceeds this node's {len(cores)} usable cores"
    if cpuset is not None:
        missing = sorted(cpuset_cores(cpuset) - cores)
        if missing:
            return (f"cpuset {cpuset} names CPUs this node cannot use: "
                    + ",".join(map(str, missing)))
    return None


def backend_url(host: str, port: int) -> str:
    """The base URL schedulers use for a backend (IPv6 addresses in brackets)."""
    bracketed = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"http://{bracketed}:{port}"
