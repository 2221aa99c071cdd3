"""The autoscaler's decisions (scheduler/placer/autoscale.py), pure, on recorded load series:
scale from zero at once, up after a sustained excess, down only after the delay and below
the band, to zero when idle, and a bounded number of actions under a square wave."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest

from common.records import (
    AutoscalePolicy,
    BackendLoad,
    BackendRecord,
    DeploymentRecord,
    ModelLoad,
    PlacementStatus,
    SchedulerLoad,
    autoscale_problem,
)
from scheduler.placer.autoscale import Autoscaler, Sample, decide, load_of

POLICY = AutoscalePolicy(min_replicas=0, max_replicas=4, target_load=8.0,
                         scale_down_delay_s=30.0, idle_seconds=60.0, scale_up_delay_s=2.0)


def series(*points: tuple[float, float]) -> list[Sample]:
    return [Sample(t, load) for t, load in points]


def test_a_request_at_zero_scales_to_one_at_once() -> None:
    d = decide(POLICY, 0, series((100.0, 1)), now=100.0, last_request_at=100.0,
               last_scaled_at=0.0)
    assert d.replicas == 1 and "waiting" in d.reason


def test_a_big_queue_at_zero_asks_for_what_it_needs_up_to_max() -> None:
    assert decide(POLICY, 0, series((0, 20)), now=0, last_request_at=0,
                  last_scaled_at=0).replicas == 3
    assert decide(POLICY, 0, series((0, 500)), now=0, last_request_at=0,
                  last_scaled_at=0).replicas == 4


def test_nothing_at_zero_stays_at_zero() -> None:
    assert decide(POLICY, 0, series((0, 0)), now=50, last_request_at=0,
                  last_scaled_at=0).replicas == 0


def test_up_only_after_the_load_stayed_above_target_for_the_delay() -> None:
    s = series((0, 4), (10, 20))  # 20 > 1 x 8 since t=10
    assert decide(POLICY, 1, s, now=11, last_request_at=11, last_scaled_at=0).replicas == 1
    d = decide(POLICY, 1, s, now=12.5, last_request_at=12, last_scaled_at=0)
    assert d.replicas == 3 and "above" in d.reason  # ceil(20 / 8)


def test_a_spike_shorter_than_the_up_delay_does_nothing() -> None:
    s = series((0, 4), (10, 40), (11, 4))
    for now in (10.5, 11.5, 13, 20):
        assert decide(POLICY, 1, s, now=now, last_request_at=now,
                      last_scaled_at=0).replicas == 1


def test_up_sizes_for_the_lowest_load_of_the_window_and_stops_at_max() -> None:
    s = series((0, 30), (1, 17))
    assert decide(POLICY, 1, s, now=3.5, last_request_at=3, last_scaled_at=0).replicas == 3
    s = series((0, 300))
    assert decide(POLICY, 2, s, now=5, last_request_at=5, last_scaled_at=0).replicas == 4


def test_down_waits_for_the_delay_and_the_band_below_the_target() -> None:
    # 3 replicas; load falls to 10 at t=100: fits 2 x 6.4 (the band is 0.8 x target)
    s = series((0, 24), (100, 10))
    kw: dict[str, float] = {"last_request_at": 200, "last_scaled_at": 0}
    assert decide(POLICY, 3, s, now=120, **kw).replicas == 3  # not 30 s below yet
    d = decide(POLICY, 3, s, now=130.5, **kw)
    assert d.replicas == 2 and "fits 2" in d.reason
    # 14 fits 2 at target (16) but not in the band (12.8): no scale-down to 2
    s = series((0, 24), (100, 14))
    assert decide(POLICY, 3, s, now=200, **kw).replicas == 3


def test_no_scale_down_within_the_delay_after_any_action() -> None:
    s = series((0, 1))
    assert decide(POLICY, 3, s, now=100, last_request_at=100,
                  last_scaled_at=80).replicas == 3
    assert decide(POLICY, 3, s, now=111, last_request_at=100,
                  last_scaled_at=80).replicas == 1


def test_to_zero_only_when_idle_for_idle_seconds_and_min_is_zero() -> None:
    s = series((0, 3), (10, 0))
    # below the band long enough, but a request 20 s ago: down to one, not zero
    assert decide(POLICY, 1, s, now=50, last_request_at=30, last_scaled_at=0).replicas == 1
    d = decide(POLICY, 1, s, now=91, last_request_at=30, last_scaled_at=0)
    assert d.replicas == 0 and "no request" in d.reason
    keep_one = AutoscalePolicy(min_replicas=1, max_replicas=4, idle_seconds=1,
                               scale_down_delay_s=1)
    assert decide(keep_one, 1, s, now=1000, last_request_at=0,
                  last_scaled_at=0).replicas == 1


def test_bounds_are_enforced_at_once() -> None:
    policy = AutoscalePolicy(min_replicas=2, max_replicas=3)
    assert decide(policy, 0, [], now=0, last_request_at=0, last_scaled_at=0).replicas == 2
    assert decide(policy, 5, [], now=0, last_request_at=0, last_scaled_at=0).replicas == 3


def test_a_policy_is_checked() -> None:
    assert autoscale_problem(POLICY) is None
    assert "max_replicas" in (autoscale_problem(AutoscalePolicy(min_replicas=3,
                                                                max_replicas=2)) or "")
    assert "target_load" in (autoscale_problem(AutoscalePolicy(target_load=0)) or "")


# -- the stateful shell on a recorded square wave ----------------------------------------------

def run_series(policy: AutoscalePolicy, load_at: Callable[[float], float], *,
               seconds: float, step: float = 1.0, start: int = 1) -> list[tuple[float, int]]:
    """Drive an Autoscaler on a load function; returns (time, count) of each action."""
    d = DeploymentRecord(name="d", model="m", replicas=start, autoscale=policy)
    scaler = Autoscaler()
    actions = []
    t = last = 0.0
    while t <= seconds:
        load = load_at(t)
        last = t if load else last
        record = SchedulerLoad("s", [ModelLoad("m", inflight=int(load), queued=0,
                                               last_request_at=last)])
        if scaler.step({"d": d}, {}, [record], [], t):
            state = scaler.state("d")
            assert state is not None
            actions.append((t, state[0]))
        t += step
    return actions


def square(high: float, low: float, period: float) -> Callable[[float], float]:
    return lambda t: high if (t % period) < period / 2 else low


@pytest.mark.parametrize("period", [4.0, 10.0, 30.0, 61.0, 120.0, 300.0])
def test_a_square_wave_makes_a_bounded_number_of_actions(period: float) -> None:
    # between 4 and 30 requests: one replica at the low, four at the high
    actions = run_series(POLICY, square(30, 4, period), seconds=1200)
    window = POLICY.scale_down_delay_s + POLICY.scale_up_delay_s
    # at most one scale-down per scale_down_delay_s, each followed by at most one scale-up
    assert len(actions) <= 2 * (1200 / window) + 2, actions
    downs = [t for (_, before), (t, n) in itertools.pairwise(actions) if n < before]
    assert all(b - a >= POLICY.scale_down_delay_s for a, b in itertools.pairwise(downs))
    assert all(1 <= n <= 4 for _, n in actions)


def test_a_fast_square_wave_scales_up_once_and_stays() -> None:
    # half-period 5 s < scale_down_delay_s: never low for long enough to scale down
    actions = run_series(POLICY, square(30, 4, 10.0), seconds=600)
    assert [n for _, n in actions] == [4]


def test_a_slow_square_wave_follows_the_load() -> None:
    actions = run_series(POLICY, square(30, 4, 200.0), seconds=400)
    counts = [n for _, n in actions]
    assert counts == [4, 1, 4, 1]


def test_idle_after_load_scales_to_zero_and_demand_brings_it_back() -> None:
    def load(t: float) -> float:
        return 3 if t < 20 or t >= 200 else 0
    actions = run_series(POLICY, load, seconds=220, start=0)
    assert [n for _, n in actions] == [1, 0, 1]
    (t_up, _), (t_zero, _), (t_back, _) = actions
    assert t_up == 0 and t_zero == 19 + POLICY.idle_seconds  # the last request at t=19
    assert t_back == 200


def test_a_fresh_leader_starts_from_the_status_and_does_not_idle_out_at_once() -> None:
    d = DeploymentRecord(name="d", model="m", replicas=0, autoscale=POLICY)
    scaler = Autoscaler()
    status = PlacementStatus("d", 2, 0, desired=2, scaled_at=500.0)
    assert not scaler.step({"d": d}, {"d": status}, [], [], 1000.0)
    assert scaler.state("d") == (2, 500.0)
    assert scaler.effective({"d": d})["d"].replicas == 2
    # the idle clock starts with this term: idle_seconds from now, not from 0 (meanwhile
    # the idle load scales down to one replica)
    scaler.step({"d": d}, {"d": status}, [], [], 1000.0 + POLICY.idle_seconds - 1)
    assert scaler.state("d") == (1, 1000.0 + POLICY.idle_seconds - 1)
    assert scaler.step({"d": d}, {"d": status}, [], [], 1000.0 + POLICY.idle_seconds + 1)
    assert scaler.state("d") == (0, 1000.0 + POLICY.idle_seconds + 1)


def test_load_is_the_schedulers_or_the_engines_whichever_says_more() -> None:
    d = DeploymentRecord(name="d", model="m", autoscale=POLICY)
    loads = [SchedulerLoad("s1", [ModelLoad("m", 2, 3, 10.0), ModelLoad("x", 9, 9, 50.0)]),
             SchedulerLoad("s2", [ModelLoad("m", 1, 0, 20.0)])]
    engine = BackendRecord(node="n", name="d-0", models=["m"], url="http://x",
                           state="ready", engine="sim", deployment="d",
                           load=BackendLoad(running=4, waiting=1))
    assert load_of(d, loads, [engine]) == (6.0, 20.0)
    engine.load = BackendLoad(running=9, waiting=3)
    assert load_of(d, loads, [engine]) == (12.0, 20.0)
