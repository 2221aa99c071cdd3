"""The sim's knobs: one typed dataclass, parsed from flags, ``SIM_*`` variables or JSON.

Every knob can change while the server runs (``POST /sim/config``), so validation lives here,
in one place, and the server only ever swaps a whole validated :class:`SimSettings`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sim.profiles import PROFILES

FAIL_MODES = ("none", "status", "reset", "hang", "die_mid_stream", "unhealthy")


class SettingsError(ValueError):
    """A knob was unknown or had a value of the wrong type or range."""


@dataclass(frozen=True)
class SimSettings:
    """What the sim serves and how it misbehaves. Frozen: changes make a new instance."""

    models: tuple[str, ...] = ("sim-model",)
    latency_ms: float = 20.0          # time to first token
    tokens_per_second: float = 200.0  # 0 or less: no delay between tokens
    chunks: int = 16                  # tokens per answer (or max_tokens when smaller)
    fail_rate: float = 1.0            # share of requests that fail when fail_mode is set
    fail_status: int = 500
    fail_mode: str = "none"
    embedding_dim: int = 64
    max_concurrency: int = 0          # 0: unlimited; beyond it requests wait
    node_label: str = "sim"
    # Like vLLM's --api-key: /v1/ and /sim/ demand "Authorization: Bearer KEY" ("" = open);
    # /health and /metrics stay open. Never shown by GET /sim/config.
    api_key: str = ""
    # The engine model (sim/engine.py). All off by default: with none of them set the sim
    # paces answers by latency_ms and tokens_per_second alone, as it always did.
    profile: str = ""                 # a named device (sim/profiles.py) setting the knobs below
    max_batch: int = 0                # sequences decoding at once; beyond it they queue
    decode_ms: float = 0.0            # one decode step (one token per sequence) at batch 1
    step_ms_per_seq: float = 0.0      # added to a step per sequence in the batch
    prefill_tokens_per_second: float = 0.0  # prompt tokens not in the prefix cache
    max_batched_tokens: int = 0       # prefill tokens one step may take (chunked prefill)
    prefix_cache_blocks: int = 0      # KV pool and prefix cache (LRU), in blocks
    block_tokens: int = 16            # tokens per cache block
    time_scale: float = 1.0           # every engine duration times this (slow motion)

    @property
    def engine(self) -> bool:
        """Whether the engine model is on (any of its knobs set)."""
        return bool(self.max_batch or self.decode_ms or self.step_ms_per_seq
                    or self.prefill_tokens_per_second or self.prefix_cache_blocks)
    # Seconds after start during which the server is "loading its weights": /health and the
    # OpenAI routes answer 503 and /v1/models lists nothing (cold starts in tests and demos).
    startup_delay_s: float = 0.0

    def updated(self, changes: Mapping[str, Any]) -> SimSettings:
        """A copy with ``changes`` applied; strings are coerced (for env and flags)."""
        known = {f.name: f for f in dataclasses.fields(self)}
        values: dict[str, Any] = {}
        profile = changes.get("profile")
        if isinstance(profile, str) and profile:
            # A profile sets its knobs first; knobs named alongside it override them.
            if profile not in PROFILES:
                raise SettingsError(f"profile: expected one of {', '.join(PROFILES)}, "
                                    f"got {profile!r}")
            changes = {**PROFILES[profile], **changes}
        for key, raw in changes.items():
            if key not in known:
                raise SettingsError(f"unknown knob {key!r}; known: {', '.join(known)}")
            values[key] = _coerce(key, raw, getattr(self, key))
        new = dataclasses.replace(self, **values)
        new.validate()
        return new

    def validate(self) -> None:
        """Raise :class:`SettingsError` for values out of range."""
        if not self.models or not all(self.models):
            raise SettingsError("models: at least one non-empty model id is needed")
        if self.fail_mode not in FAIL_MODES:
            raise SettingsError(f"fail_mode: expected one of {', '.join(FAIL_MODES)}, "
                                f"got {self.fail_mode!r}")
        if not 0.0 <= self.fail_rate <= 1.0:
            raise SettingsError(f"fail_rate: expected 0..1, got {self.fail_rate}")
        if not 400 <= self.fail_status <= 599:
            raise SettingsError(f"fail_status: expected an HTTP error 400..599, "
                                f"got {self.fail_status}")
        for name in ("latency_ms", "tokens_per_second", "max_concurrency", "startup_delay_s"):
            if getattr(self, name) < 0:
                raise SettingsError(f"{name}: must not be negative")
        for name in ("max_batch", "decode_ms", "step_ms_per_seq", "prefill_tokens_per_second",
                     "max_batched_tokens", "prefix_cache_blocks"):
            if getattr(self, name) < 0:
                raise SettingsError(f"{name}: must not be negative")
        if self.profile and self.profile not in PROFILES:
            raise SettingsError(f"profile: expected one of {', '.join(PROFILES)}, "
                                f"got {self.profile!r}")
        if self.block_tokens < 1:
            raise SettingsError("block_tokens: must be at least 1")
        if not self.time_scale > 0:
            raise SettingsError("time_scale: must be positive")
        if self.chunks < 1:
            raise SettingsError("chunks: must be at least 1")
        if self.embedding_dim < 1:
            raise SettingsError("embedding_dim: must be at least 1")

    def as_json(self) -> dict[str, Any]:
        """The knobs as a JSON-ready dict (what ``GET /sim/config`` returns)."""
        data = dataclasses.asdict(self)
        data["models"] = list(self.models)
        data["api_key"] = "<set>" if self.api_key else ""
        return data


def knob_names() -> list[str]:
    """Every knob's name, in declaration order."""
    return [f.name for f in dataclasses.fields(SimSettings)]


def from_env(env: Mapping[str, str], base: SimSettings | None = None) -> SimSettings:
    """Apply ``SIM_<KNOB>`` variables (``SIM_MODELS`` is comma-separated) to ``base``."""
    base = base or SimSettings()
    changes = {name: env[f"SIM_{name.upper()}"] for name in knob_names()
               if f"SIM_{name.upper()}" in env}
    return base.updated(changes)


def _coerce(key: str, raw: Any, current: Any) -> Any:
    if isinstance(current, tuple):
        if isinstance(raw, str):
            items = [part.strip() for part in raw.split(",")]
        elif isinstance(raw, list | tuple):
            items = list(raw)
        else:
            raise SettingsError(f"{key}: expected a list of strings, got {raw!r}")
        if not all(isinstance(item, str) and item for item in items):
            raise SettingsError(f"{key}: expected non-empty strings, got {raw!r}")
        return tuple(items)
    # bool is an int in Python; a knob never wants it.
    if isinstance(raw, bool):
        raise SettingsError(f"{key}: expected {type(current).__name__}, got {raw!r}")
    try:
        if isinstance(current, float):
            if isinstance(raw, int | float | str):
                return float(raw)
        elif isinstance(current, int):
            if isinstance(raw, int) or (isinstance(raw, str) and raw.strip().lstrip("-").isdigit()):
                return int(raw)
            if isinstance(raw, float) and raw.is_integer():
                return int(raw)
        elif isinstance(current, str) and isinstance(raw, str):
            return raw
    except ValueError:
        pass
    raise SettingsError(f"{key}: expected {type(current).__name__}, got {raw!r}")
