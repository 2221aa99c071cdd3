"""Probing a backend: health path, /v1/models, and the engine's own /metrics.

The parser and the EWMA are pure; :class:`Prober` is the thin aiohttp shell around them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import aiohttp

from common.records import BackendLoad

_RUNNING = "vllm:num_requests_running"
_WAITING = "vllm:num_requests_waiting"
_KV = "vllm:gpu_cache_usage_perc"


def parse_vllm_load(text: str) -> BackendLoad | None:
    """The three vLLM load series from Prometheus text; None when the engine has none.

    Series with several label sets (one per model) are summed; the cache ratio is the max.
    """
    sums: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("vllm:"):
            continue
        name_part, _, value = line.rpartition(" ")
        name = name_part.split("{", 1)[0].strip()
        if name not in (_RUNNING, _WAITING, _KV):
            continue
        try:
            number = float(value)
        except ValueError:
            continue
        if name == _KV:
            sums[name] = max(sums.get(name, 0.0), number)
        else:
            sums[name] = sums.get(name, 0.0) + number
    if not sums:
        return None
    running = sums.get(_RUNNING)
    waiting = sums.get(_WAITING)
    return BackendLoad(
        running=None if running is None else int(running),
        waiting=None if waiting is None else int(waiting),
        kv_cache_usage=sums.get(_KV),
    )


def lists_model(body: object, model: str) -> bool:
    """Whether an OpenAI ``/v1/models`` answer lists ``model``."""
    if not isinstance(body, dict) or not isinstance(body.get("data"), list):
        return False
    return any(isinstance(m, dict) and m.get("id") == model for m in body["data"])


class Ewma:
    """Exponentially weighted moving average; the first sample is taken as is."""

    def __init__(self, alpha: float = 0.3) -> None:
        self.alpha = alpha
        self.value: float | None = None

    def add(self, sample: float) -> float:
        self.value = sample if self.value is None else \
            self.alpha * sample + (1 - self.alpha) * self.value
        return self.value

    def reset(self) -> None:
        self.value = None


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """One probe: ready when health answered 2xx and /v1/models lists the model."""

    ready: bool
    latency_s: float | None  # of the health request, when it answered at all
    load: BackendLoad | None
    error: str | None


class Prober:
    """Probes backends over one aiohttp session."""

    def __init__(self, timeout: float = 2.0) -> None:
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def probe(self, url: str, health_path: str, model: str,
                    api_path: str = "/v1") -> ProbeResult:
        """Probe the backend at ``url`` (no ``/v1``) serving ``model`` under ``api_path``."""
        session = self._client()
        started = time.monotonic()
        try:
            async with session.get(url + health_path) as resp:
                await resp.read()
                latency = time.monotonic() - started
                if resp.status // 100 != 2:
                    return ProbeResult(False, latency, None, f"health answered {resp.status}")
            async with session.get(url + api_path + "/models") as resp:
                body = await resp.json(content_type=None) if resp.status == 200 else None
            if not lists_model(body, model):
                return ProbeResult(False, latency, None,
                                   f"{api_path}/models does not list {model}")
        except (TimeoutError, aiohttp.ClientError, ValueError) as err:
            return ProbeResult(False, None, None, f"probe failed: {err!r}")
        return ProbeResult(True, latency, await self._load(url), None)

    async def _load(self, url: str) -> BackendLoad | None:
        try:
            async with self._client().get(url + "/metrics") as resp:
                if resp.status != 200:
                    return None
                return parse_vllm_load(await resp.text())
        except (TimeoutError, aiohttp.ClientError, UnicodeDecodeError):
            return None
