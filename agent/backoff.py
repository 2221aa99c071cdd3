"""Restart backoff for a crashing backend (pure, clock injected)."""

from __future__ import annotations

from collections.abc import Callable

from common.backoff import Backoff


class RestartBackoff:
    """1 s doubling to 60 s between restarts; back to 1 s after 5 minutes healthy."""

    def __init__(self, clock: Callable[[], float], *, initial: float = 1.0, cap: float = 60.0,
                 reset_after: float = 300.0) -> None:
        self._clock = clock
        # No jitter: one agent restarts its own containers, there is no herd to spread.
        self._delays = Backoff(initial=initial, cap=cap)
        self._reset_after = reset_after
        self._healthy_since: float | None = None

    def failed(self) -> float:
        """Note a crash or failed start; returns how long to wait before the next attempt."""
        if self._healthy_since is not None and \
                self._clock() - self._healthy_since >= self._reset_after:
            self._delays.reset()
        self._healthy_since = None
        return self._delays.next()

    def healthy(self) -> None:
        """Note that the backend is serving; only a long enough healthy stretch resets."""
        if self._healthy_since is None:
            self._healthy_since = self._clock()

    def unhealthy(self) -> None:
        """Note that the backend stopped serving: its healthy stretch starts over."""
        self._healthy_since = None
