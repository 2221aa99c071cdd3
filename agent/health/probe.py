"""Probing a backend: health path, /v1/models, and the engine's own /metrics.

The parser (agent/health/load.py) and the EWMA are pure; :class:`Prober` is the thin aiohttp
shell around them. A probe never raises, whatever the engine answers: every body is read up
to :data:`MAX_BODY_BYTES` and no further, and an answer that cannot be read or decoded is a
failed probe (health, /v1/models) or no load readings (/metrics).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import aiohttp

from agent.health.load import parse_load
from common.records import BackendLoad

# The most of an answer the prober reads: an engine's real /metrics is far under it; of a
# larger answer nothing is used and no more is read (a 50 MB flood costs 1 MiB at most).
MAX_BODY_BYTES = 1 << 20
_CHUNK = 64 << 10

# The pure parser lives in agent/health/load.py; the old name stays for its callers.
parse_vllm_load = parse_load


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
                await _read_capped(resp)  # what it says does not matter; a flood is cut off
                latency = time.monotonic() - started
                if resp.status // 100 != 2:
                    return ProbeResult(False, latency, None, f"health answered {resp.status}")
            async with session.get(url + api_path + "/models") as resp:
                raw = await _read_capped(resp) if resp.status == 200 else None
            body = None if raw is None else json.loads(raw)
            if not lists_model(body, model):
                return ProbeResult(False, latency, None,
                                   f"{api_path}/models does not list {model}")
        # ValueError: bad JSON or bad UTF-8; RecursionError: JSON nested a million deep.
        except (TimeoutError, aiohttp.ClientError, ValueError, RecursionError) as err:
            return ProbeResult(False, None, None, f"probe failed: {err!r}")
        return ProbeResult(True, latency, await self._load(url), None)

    async def _load(self, url: str) -> BackendLoad | None:
        """The engine's load readings from its /metrics; None when it gives none we can use."""
        try:
            async with self._client().get(url + "/metrics") as resp:
                if resp.status != 200:
                    return None
                body = await _read_capped(resp)
        except Exception:  # the readings are optional; the probe goes on
            return None
        return None if body is None else parse_load(body)


async def _read_capped(resp: aiohttp.ClientResponse,
                       limit: int = MAX_BODY_BYTES) -> bytes | None:
    """The body of ``resp`` if it is at most ``limit`` bytes; None (read no further) if not."""
    if resp.content_length is not None and resp.content_length > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    while chunk := await resp.content.read(_CHUNK):
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)
