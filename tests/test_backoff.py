"""The one backoff policy (common/backoff.py) and the restart backoff built on it."""

from __future__ import annotations

import random

import pytest

from agent.backoff import RestartBackoff
from common.backoff import Backoff


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_delays_double_to_the_cap_and_stay_there() -> None:
    b = Backoff(initial=0.2, cap=2.0)
    assert [round(b.next(), 6) for _ in range(7)] == [0.2, 0.4, 0.8, 1.6, 2.0, 2.0, 2.0]


def test_another_factor_grows_by_it() -> None:
    b = Backoff(initial=1.0, cap=100.0, factor=3.0)
    assert [b.next() for _ in range(6)] == [1, 3, 9, 27, 81, 100]


def test_reset_returns_to_the_initial_delay() -> None:
    b = Backoff(initial=0.5, cap=30.0)
    b.next(), b.next(), b.next()
    assert b.base == 4.0
    b.reset()
    assert b.next() == 0.5
    assert b.next() == 1.0


def test_jitter_stays_within_its_fraction_of_each_delay() -> None:
    b = Backoff(initial=0.2, cap=5.0, jitter=0.5, rng=random.Random(17))
    seen: list[float] = []
    for _ in range(200):
        base = b.base
        delay = b.next()
        assert base / 2 <= delay <= base  # the [d/2, d] of the etcd and heartbeat retries
        seen.append(delay / base)
    # Spread over the range, not stuck at one end: that is what breaks the lockstep.
    assert min(seen) < 0.6 and max(seen) > 0.9
    assert b.base == 5.0


def test_the_same_seed_gives_the_same_delays() -> None:
    def delays(seed: int) -> list[float]:
        b = Backoff(initial=1.0, cap=60.0, jitter=0.3, rng=random.Random(seed))
        return [b.next() for _ in range(10)]

    assert delays(3) == delays(3)
    assert delays(3) != delays(4)


def test_the_first_delay_is_initial_even_above_the_cap() -> None:
    # The heartbeat caps at its interval, which a test may set below the first retry.
    b = Backoff(initial=0.2, cap=0.1)
    assert [b.next() for _ in range(3)] == [0.2, 0.1, 0.1]


def test_nonsense_parameters_are_refused() -> None:
    with pytest.raises(ValueError):
        Backoff(initial=0.0, cap=2.0)
    with pytest.raises(ValueError):
        Backoff(initial=1.0, cap=2.0, factor=0.5)
    with pytest.raises(ValueError):
        Backoff(initial=1.0, cap=2.0, jitter=1.5)


def test_restart_backoff_resets_only_after_a_healthy_stretch_on_the_injected_clock() -> None:
    clock = Clock()
    b = RestartBackoff(clock, initial=0.5, cap=4.0, reset_after=10.0)
    assert [b.failed() for _ in range(5)] == [0.5, 1, 2, 4, 4]
    b.healthy()
    clock.now += 9.9
    assert b.failed() == 4  # not healthy for long enough
    b.healthy()
    clock.now += 10.0
    assert b.failed() == 0.5
