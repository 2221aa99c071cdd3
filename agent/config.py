"""The agent's configuration (docs/contracts.md: Config keys), loaded by common.config."""

from __future__ import annotations

import dataclasses
import os
import re
import socket
from typing import Literal

from common.config import DaemonConfig, host_port, port_number, positive, setting

Engine = Literal["vllm", "sglang", "openvino", "llamacpp", "ipex-llm", "sim", "custom"]
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_MEMORY = re.compile(r"^[0-9]+[bkmgBKMG]?$")


def _name(value: str) -> str | None:
    return None if _NAME.match(value) else "a name of letters, digits, '.', '_' or '-' (max 63)"


def _memory(value: str) -> str | None:
    return None if _MEMORY.match(value) else "a size such as 16g, 512m or 1073741824"


_CPUSET = re.compile(r"^[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*$")


def _cpus(value: float) -> str | None:
    # Docker's NanoCPUs: a billionth of a core; below a hundredth the kernel's CFS quota
    # (1 ms of each 100 ms period) cannot enforce it.
    return None if 0.01 <= value <= 4096 else "a number of cores from 0.01 to 4096"


def _cpuset(value: str) -> str | None:
    return None if _CPUSET.match(value) else "CPU numbers such as 0-3 or 0,2,4-7"


def cpuset_cores(value: str) -> set[int]:
    """The CPUs a cpuset string names ("0-3,8" -> {0, 1, 2, 3, 8})."""
    out: set[int] = set()
    for part in value.split(","):
        low, _, high = part.partition("-")
        out.update(range(int(low), int(high or low) + 1))
    return out


# Mounted into every engine (read-only): never the root or a system directory
# (docs/security.md).
_SYSTEM_DIRS = ("/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib64", "/opt",
                "/proc", "/root", "/run", "/sbin", "/srv", "/sys", "/tmp", "/usr", "/var",
                "/var/lib", "/var/run", "/var/log")
_SYSTEM_TREES = ("/boot", "/dev", "/etc", "/proc", "/root", "/run", "/sys", "/var/run",
                 "/var/lib/docker", "/usr", "/bin", "/sbin", "/lib")


def _models_dir(value: str) -> str | None:
    if not value.startswith("/"):
        return "an absolute path"
    norm = os.path.normpath(value)
    if norm in _SYSTEM_DIRS or any(norm.startswith(t + "/") for t in _SYSTEM_TREES):
        return "a directory of models, not / or a system directory"
    return None


def _port_range(value: str) -> str | None:
    low, sep, high = value.partition("-")
    if not sep or not low.isdigit() or not high.isdigit() or \
            not 0 < int(low) <= int(high) < 65536:
        return "a port range LOW-HIGH such as 20000-20999"
    return None


def _labels(value: dict[str, str]) -> str | None:
    for k, v in value.items():
        if not _NAME.match(k) or not v or "=" in v or "," in v:
            return "labels of letters, digits, '.', '_' or '-' with plain values (no '=' or ',')"
    return None


def _gpus(value: list[int] | str) -> str | None:
    if isinstance(value, list) and (any(i < 0 for i in value) or len(set(value)) != len(value)):
        return "distinct inventory indexes >= 0, or \"auto\""
    return None


@dataclasses.dataclass(frozen=True, slots=True)
class BackendConfig:
    """One ``[[backend]]`` table: an engine container serving one model."""

    name: str = setting(check=_name)
    model: str = setting(check=lambda v: None if v.strip() else "a model id")
    engine: Engine = setting()
    port: int = setting(check=port_number)
    gpus: list[int] | Literal["auto"] = setting("auto", check=_gpus)
    gpu_count: int = setting(1, check=lambda v: None if v >= 0 else "an integer >= 0")
    image: str | None = setting(None)
    args: list[str] = setting([])
    env: dict[str, str] = setting({})
    memory_limit: str | None = setting(None, check=_memory)
    # A CPU quota in cores (fractions allowed) and the CPUs the engine may run on: a
    # tokenizer-heavy engine must not take every core of the node from its neighbours.
    cpus: float | None = setting(None, check=_cpus)
    cpuset: str | None = setting(None, check=_cpuset)
    health_path: str | None = setting(
        None, check=lambda v: None if v.startswith("/") else "a path starting with /")
    network: Literal["host", "bridge"] = setting("host")
    # The engine's OpenAI API path (default from the engine profile: /v1, /v3 for openvino).
    api_path: str | None = setting(
        None, check=lambda v: None if v.startswith("/") and not v.endswith("/")
        else "a path like /v1 (leading /, no trailing /)")


@dataclasses.dataclass(frozen=True, slots=True)
class AgentConfig(DaemonConfig):
    """The whole agent config file."""

    node_name: str = setting("", check=lambda v: None if v == "" or _NAME.match(v)
                             else "a node name of letters, digits, '.', '_' or '-'")
    listen: str = setting("127.0.0.1:9410", check=host_port)
    advertise_host: str = setting("127.0.0.1")
    heartbeat_interval: float = setting(3.0, check=positive)
    lease_ttl: int = setting(10, check=lambda v: None if v >= 2 else "an integer >= 2")
    probe_interval: float = setting(2.0, check=positive)
    docker_host: str | None = setting(None)
    # Absolute: Docker would take a relative name for a named volume and mount it empty.
    models_dir: str = setting("/var/lib/aivmm/models", check=_models_dir)
    sysfs_root: str = setting("/sys")
    # Intel drivers report memory in use only per client, in DRM fdinfo under /proc; reading
    # it needs the host's PID namespace, so it is opt-in (set "/proc") rather than a guess.
    proc_root: str | None = setting(None)
    offer_integrated: bool = setting(False)
    # Published in the node record; deployments may require some (aivmmctl deploy --label).
    labels: dict[str, str] = setting({}, check=_labels)
    # What this machine costs per hour (any currency, the same on every node); published in
    # the node record for the placer's "cost" policy and the cost per million output tokens.
    cost_per_hour: float | None = setting(
        None, check=lambda v: None if v is None or v >= 0 else "a number >= 0")
    # Ports the agent gives to deployment replicas (pinned backends keep their own ports).
    assignment_ports: str = setting("20000-20999", check=_port_range)
    backend: list[BackendConfig] = setting([])
    # The key engines demand of clients (their --api-key; docs/security.md): only the
    # schedulers, which have the same file, present it. A file, never the config itself.
    engine_api_key_file: str | None = setting(None)
    # Fetching models into models_dir before an engine starts (docs/models.md).
    fetch_models: bool = setting(True)
    # The hub (or a mirror); unset: HF_ENDPOINT, else https://huggingface.co.
    hf_endpoint: str | None = setting(
        None, check=lambda v: None if v.startswith(("http://", "https://"))
        else "an http:// or https:// URL")
    # A file holding the hub token; unset: HF_TOKEN from the environment. Never logged.
    hf_token_file: str | None = setting(None)
    # Files fetched at once, over all models; and the bandwidth bound (bytes/s, 0: none).
    download_concurrency: int = setting(
        4, check=lambda v: None if 1 <= v <= 64 else "an integer from 1 to 64")
    download_max_bytes_per_s: int = setting(
        0, check=lambda v: None if v >= 0 else "bytes per second >= 0 (0: no bound)")
    # Free space a download must leave on models_dir's filesystem, in bytes.
    download_free_margin: int = setting(
        5 * 2**30, check=lambda v: None if v >= 0 else "bytes >= 0")

    def __post_init__(self) -> None:
        DaemonConfig.__post_init__(self)  # the etcd_* checks
        if self.engine_api_key_file is not None and not self.engine_api_key:
            raise ValueError("engine_api_key_file: a readable file holding the key")
        if self.heartbeat_interval * 2 > self.lease_ttl:
            raise ValueError("heartbeat_interval: a number at most lease_ttl / 2")
        names = [b.name for b in self.backend]
        if len(set(names)) != len(names):
            raise ValueError("backend: unique backend names")
        ports = [b.port for b in self.backend]
        if len(set(ports)) != len(ports):
            raise ValueError("backend: a distinct port per backend")
        low, high = self.port_range
        if any(low <= p <= high for p in ports):
            raise ValueError(f"backend: ports outside assignment_ports ({low}-{high})")
        if not self.node_name:
            object.__setattr__(self, "node_name", socket.gethostname().split(".")[0])

    @property
    def engine_api_key(self) -> str | None:
        """The engine key from engine_api_key_file (None when unset or unreadable)."""
        if self.engine_api_key_file is None:
            return None
        try:
            with open(self.engine_api_key_file, encoding="utf-8") as fh:
                return fh.read().strip() or None
        except OSError:
            return None

    @property
    def port_range(self) -> tuple[int, int]:
        low, _, high = self.assignment_ports.partition("-")
        return int(low), int(high)
