"""A small aiohttp load generator shared by the benchmarks: fixed concurrency, latencies kept."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import aiohttp

from devtools.stats import percentile


@dataclass
class Result:
    latencies: list[float] = field(default_factory=list)  # seconds, successful requests
    errors: int = 0
    elapsed: float = 0.0

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.elapsed if self.elapsed else 0.0

    def row(self) -> tuple[float, float, float, int]:
        """(p50 ms, p99 ms, requests/s, errors); both latencies NaN when none succeeded."""
        if not self.latencies:
            return (float("nan"), float("nan"), self.rps, self.errors)
        return (percentile(self.latencies, 50) * 1000, percentile(self.latencies, 99) * 1000,
                self.rps, self.errors)


async def drive(url: str, body: bytes, *, concurrency: int, requests: int,
                stream: bool = False) -> Result:
    """``requests`` POSTs to ``url`` over ``concurrency`` workers on pooled connections.

    A streamed answer is read to its end; its latency is the whole answer's.
    """
    result = Result()
    left = requests
    headers = {"Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                t = time.perf_counter()
                try:
                    async with session.post(url, data=body, headers=headers) as resp:
                        if stream:
                            async for _ in resp.content.iter_any():
                                pass
                        else:
                            await resp.read()
                        if resp.status != 200:
                            result.errors += 1
                            continue
                except aiohttp.ClientError:
                    result.errors += 1
                    continue
                result.latencies.append(time.perf_counter() - t)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        result.elapsed = time.perf_counter() - t0
    return result
