"""The scheduler's configuration (docs/contracts.md: Config keys), loaded by common.config."""

from __future__ import annotations

import dataclasses

from common.config import DaemonConfig, host_port, positive, setting
from scheduler.netpolicy import cidr_list


def _keys(value: list[str]) -> str | None:
    for key in value:
        if not key:
            return "non-empty keys"
        if key.startswith("sha256:"):
            hexpart = key[len("sha256:"):]
            if len(hexpart) != 64 or any(c not in "0123456789abcdefABCDEF" for c in hexpart):
                return "keys, where a hashed one is 'sha256:' and 64 hex digits"
    return None


@dataclasses.dataclass(frozen=True, slots=True)
class SchedulerConfig(DaemonConfig):
    """The whole scheduler config file."""

    listen: str = setting("0.0.0.0:8080", check=host_port)
    # Several scheduler processes on one host may share `listen` (SO_REUSEPORT): the kernel
    # spreads connections over them, one process per core (docs/benchmarks.md).
    reuse_port: bool = setting(False)
    # Plain keys or "sha256:<hex>" digests; none at all means no authentication.
    api_keys: list[str] = setting([], check=_keys, secret=True)
    api_keys_file: str | None = setting(None)
    # GET /v1/cluster (the status page's data) without a key even when keys are configured.
    status_page_public: bool = setting(False)
    max_body_bytes: int = setting(16 * 1024 * 1024, check=positive)
    request_timeout: float = setting(600.0, check=positive)
    connect_timeout: float = setting(3.0, check=positive)
    first_byte_timeout: float = setting(120.0, check=positive)
    stream_idle_timeout: float = setting(60.0, check=positive)
    # A client that takes longer than this to accept a write (it stopped reading) loses
    # its response; the backend is not blamed.
    client_write_timeout: float = setting(30.0, check=positive)
    queue_timeout: float = setting(5.0, check=lambda v: None if v >= 0 else "a number >= 0")
    max_attempts: int = setting(3, check=lambda v: None if v >= 1 else "an integer >= 1")
    retry_budget_ratio: float = setting(
        0.2, check=lambda v: None if 0 <= v <= 1 else "a ratio 0..1")
    # Outlier ejection: consecutive failures before a backend is set aside, and for how long.
    eject_failures: int = setting(5, check=lambda v: None if v >= 1 else "an integer >= 1")
    eject_base_seconds: float = setting(5.0, check=positive)
    eject_max_seconds: float = setting(60.0, check=positive)
    # Requests in flight per backend before it counts as busy; 0 = no limit.
    max_inflight_per_backend: int = setting(
        0, check=lambda v: None if v >= 0 else "an integer >= 0")
    # The deployments' placer (docs/deployments.md): every scheduler with it on is a
    # candidate; one at a time is elected through an etcd lease of placer_lease_ttl seconds.
    placer: bool = setting(True)
    placer_lease_ttl: int = setting(5, check=lambda v: None if v >= 2 else "an integer >= 2")
    # A replica not ready this long after it was assigned (or restarted this often) is moved.
    placer_replace_after: float = setting(180.0, check=positive)
    placer_max_restarts: int = setting(3, check=lambda v: None if v >= 1 else "an integer >= 1")
    # A replica scaled away drains (no new requests) at most this long before it is removed.
    placer_drain_timeout: float = setting(600.0, check=positive)
    # Autoscaling (docs/autoscaling.md): a request for an autoscaled model with no ready
    # replica waits this long for one (scale from zero), at most cold_start_queue of them
    # per model; this scheduler's load record is rewritten at most every load_interval.
    cold_start_timeout: float = setting(300.0, check=positive)
    cold_start_queue: int = setting(256, check=lambda v: None if v >= 1 else "an integer >= 1")
    load_interval: float = setting(2.0, check=positive)
    # API keys (docs/keys.md): per-key usage is written to etcd this often (a restart loses
    # at most that much), and hours of it older than key_usage_keep_days are deleted.
    key_usage_interval: float = setting(2.0, check=positive)
    key_usage_keep_days: float = setting(90.0, check=positive)
    # The audit trail (docs/operations.md): the placer deletes entries older than this many
    # days, or beyond this many (oldest first).
    # Hardening (docs/security.md). Backend records are routed only to hosts in these
    # networks (CIDRs; [] = any but link-local, with a warning at start).
    backend_networks: list[str] = setting([], check=cidr_list)
    # Client connections: idle keep-alive, the whole header and the whole body must arrive
    # within these (408 for a body), and at most this many requests are served at once
    # (503 + Retry-After beyond; 0 = no cap). Connections to each backend are capped too.
    keepalive_timeout: float = setting(75.0, check=positive)
    header_timeout: float = setting(10.0, check=positive)
    body_timeout: float = setting(30.0, check=positive)
    max_concurrent_requests: int = setting(
        4096, check=lambda v: None if v >= 0 else "an integer >= 0")
    max_connections_per_backend: int = setting(
        256, check=lambda v: None if v >= 0 else "an integer >= 0")
    # A TLS listener: certificate chain and key (PEM), re-read on SIGHUP.
    tls_cert: str | None = setting(None)
    tls_key: str | None = setting(None)
    # Stopping: requests in flight get this long, then streams end with an SSE error event.
    # Keep it below the unit's TimeoutStopSec (20 s).
    shutdown_timeout: float = setting(
        15.0, check=lambda v: None if 0 < v <= 18 else "seconds in 0..18 (TimeoutStopSec=20)")
    # No node or backend names to clients: no x-aivmm-backend header, none in errors, and
    # /metrics only to addresses in metrics_networks (CIDRs; [] = any).
    hide_internal_names: bool = setting(False)
    metrics_networks: list[str] = setting([], check=cidr_list)
    # The key engines demand (their --api-key), presented by the scheduler as a Bearer token.
    engine_api_key_file: str | None = setting(None)
    audit_keep_days: float = setting(30.0, check=positive)
    audit_keep_entries: int = setting(
        10_000, check=lambda v: None if v >= 1 else "an integer >= 1")

    def __post_init__(self) -> None:
        DaemonConfig.__post_init__(self)  # the etcd_* checks
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_key: a file (tls_cert and tls_key go together)")
        if self.tls_cert is not None:
            from scheduler.tls import tls_context
            made = tls_context(self.tls_cert, str(self.tls_key))
            if isinstance(made, str):
                raise ValueError(f"tls_key: {made}")
        if self.engine_api_key_file is not None:
            try:
                with open(self.engine_api_key_file, encoding="utf-8") as fh:
                    if not fh.read().strip():
                        raise ValueError("engine_api_key_file: a file holding the key "
                                         "(it is empty)")
            except OSError as err:
                raise ValueError(f"engine_api_key_file: a readable file "
                                 f"({err.strerror})") from None
        if self.api_keys_file is not None:
            try:
                with open(self.api_keys_file, encoding="utf-8") as fh:
                    lines = [ln.strip() for ln in fh]
            except OSError as err:
                raise ValueError(f"api_keys_file: a readable file ({err.strerror})") from None
            problem = _keys([ln for ln in lines if ln and not ln.startswith("#")])
            if problem:
                raise ValueError(f"api_keys_file: a file of {problem}")
