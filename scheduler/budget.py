"""The retry budget: retries may add at most a fixed share of the request rate.

During an outage every request fails and would be retried ``max_attempts`` times, multiplying
the load on whatever still works. The budget (as in Finagle and Envoy) allows retries only
while they stay under ``ratio`` of the requests seen in a sliding window, plus a small floor
per second so that a quiet replica can still retry at all. Pure; the clock is passed in.
"""

from __future__ import annotations

from collections import deque


class RetryBudget:
    """Counts requests and retries over a sliding window of one-second buckets."""

    def __init__(self, ratio: float = 0.2, window_s: int = 10, floor_per_s: float = 1.0) -> None:
        self.ratio = ratio
        self.window_s = window_s
        self.floor = floor_per_s * window_s
        # (second, requests, retries); the oldest bucket first.
        self._buckets: deque[list[int]] = deque()
        self._requests = 0
        self._retries = 0

    def _roll(self, now: float) -> list[int]:
        second = int(now)
        buckets = self._buckets
        while buckets and buckets[0][0] <= second - self.window_s:
            _, req, ret = buckets.popleft()
            self._requests -= req
            self._retries -= ret
        if not buckets or buckets[-1][0] != second:
            buckets.append([second, 0, 0])
        return buckets[-1]

    def request(self, now: float) -> None:
        """Count one client request (its first attempt)."""
        self._roll(now)[1] += 1
        self._requests += 1

    def can_retry(self, now: float) -> bool:
        """Whether a retry now would be within the budget (spends nothing)."""
        self._roll(now)
        return self._retries + 1 <= self.ratio * self._requests + self.floor

    def try_retry(self, now: float) -> bool:
        """Spend one retry if the budget allows it; False means do not retry."""
        if not self.can_retry(now):
            return False
        self._buckets[-1][2] += 1
        self._retries += 1
        return True
