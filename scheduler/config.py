"""The scheduler's configuration (DESIGN.md: Configuration), loaded by common.config."""

from __future__ import annotations

import dataclasses

from common.config import DaemonConfig, host_port, positive, setting


@dataclasses.dataclass(frozen=True, slots=True)
class SchedulerConfig(DaemonConfig):
    """The whole scheduler config file."""

    listen: str = setting("0.0.0.0:8080", check=host_port)
    # Plain keys or "sha256:<hex>" digests; none at all means no authentication.
    api_keys: list[str] = setting([])
    api_keys_file: str | None = setting(None)
    max_body_bytes: int = setting(16 * 1024 * 1024, check=positive)
    request_timeout: float = setting(600.0, check=positive)
    connect_timeout: float = setting(3.0, check=positive)
    first_byte_timeout: float = setting(120.0, check=positive)
    stream_idle_timeout: float = setting(60.0, check=positive)
    queue_timeout: float = setting(5.0, check=lambda v: None if v >= 0 else "a number >= 0")
    max_attempts: int = setting(3, check=lambda v: None if v >= 1 else "an integer >= 1")
    retry_budget_ratio: float = setting(
        0.2, check=lambda v: None if 0 <= v <= 1 else "a ratio 0..1")
