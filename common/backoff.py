"""Exponential backoff with optional jitter: the one retry-delay policy of aivmm (pure)."""

from __future__ import annotations

import random


class Backoff:
    """Delays that start at ``initial`` and grow by ``factor`` per failure, up to ``cap``.

    ``jitter`` is the fraction of each delay that is random: 0.5 spreads a delay ``d`` over
    [d/2, d], so that many clients cut off together do not retry in lockstep. ``rng`` is
    the random source (seed it in tests); without one a private ``random.Random`` is used.
    """

    def __init__(self, *, initial: float, cap: float, factor: float = 2.0, jitter: float = 0.0,
                 rng: random.Random | None = None) -> None:
        if initial <= 0 or factor < 1 or not 0 <= jitter <= 1:
            raise ValueError("backoff needs initial > 0, factor >= 1 and 0 <= jitter <= 1")
        self.initial = initial
        self.cap = cap
        self.factor = factor
        self.jitter = jitter
        self._rng = rng or random.Random()
        self._base = initial

    @property
    def base(self) -> float:
        """The delay the next :meth:`next` returns before jitter."""
        return self._base

    def next(self) -> float:
        """The delay before the next attempt; each call grows the following one.

        The first delay is ``initial`` even where ``cap`` is smaller: callers that cap the
        delay at an interval shorter than ``initial`` keep their first retry as it was.
        """
        base = self._base
        self._base = min(self.cap, base * self.factor)
        if not self.jitter:
            return base
        return base * (1 - self.jitter + self.jitter * self._rng.random())

    def reset(self) -> None:
        """An attempt succeeded: the next failure waits ``initial`` again."""
        self._base = self.initial
