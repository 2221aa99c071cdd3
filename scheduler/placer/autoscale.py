"""Autoscaling decisions as a pure function, and the placer's memory that feeds it.

:func:`decide` takes a deployment's policy, its current replica count, a recorded series of
its load (requests in flight + queued, fleet-wide) and the times of the last request and the
last scale action, and returns the count wanted and why. It has hysteresis so that a load
that comes and goes does not make replicas come and go (docs/autoscaling.md):

- **From zero** at once: any request queued for a deployment with no replica starts one
  (or as many as the queue needs at ``target_load`` each).
- **Up** when the load per replica stayed above ``target_load`` for ``scale_up_delay_s``:
  straight to ``ceil(lowest load of that window / target_load)``, at most ``max_replicas``.
- **Down** only when ``scale_down_delay_s`` passed since the last action *and* the highest
  load of the last ``scale_down_delay_s`` would fit in fewer replicas at
  ``DOWN_FRACTION * target_load`` each (a band below the target, so that the count after a
  scale-down is not at once above the target again). Never below ``max(min_replicas, 1)``.
- **To zero** (``min_replicas == 0``) when nothing is in flight or queued and no request
  arrived for ``idle_seconds``.

So at most one scale-down per ``scale_down_delay_s``, and a scale-up only after a full
``scale_up_delay_s`` above the target: under a square wave the actions per window are
bounded, whatever its period (tests/test_autoscale_decide.py).

:class:`Autoscaler` is the stateful shell the placer holds: per deployment the current count,
a short load history and the last action; it is rebuilt from the placement statuses by a
new leader.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from common.records import (
    AutoscalePolicy,
    BackendRecord,
    DeploymentRecord,
    PlacementStatus,
    SchedulerLoad,
)

# A scale-down sizes for this share of the target: the band between the two thresholds is
# the hysteresis.
DOWN_FRACTION = 0.8
# Samples older than the longest window any policy looks back on are dropped.
HISTORY_S = 3600.0


@dataclass(frozen=True, slots=True)
class Sample:
    """The deployment's load (requests in flight + queued) from ``time`` on."""

    time: float
    load: float


@dataclass(frozen=True, slots=True)
class Decision:
    replicas: int
    reason: str = ""


def _window(series: Sequence[Sample], start: float) -> list[float] | None:
    """The loads in effect during [start, last sample]; None when the series does not
    reach back to ``start`` (too short a history to decide on)."""
    before = [s for s in series if s.time <= start]
    if not before:
        return None
    return [before[-1].load] + [s.load for s in series if s.time > start]


def _count(load: float, per: float) -> int:
    return math.ceil(load / per - 1e-9) if load > 0 else 0


def decide(policy: AutoscalePolicy, current: int, series: Sequence[Sample], *, now: float,
           last_request_at: float, last_scaled_at: float) -> Decision:
    """The replica count ``policy`` wants now (``current`` when nothing changes)."""
    lo, hi, target = policy.min_replicas, policy.max_replicas, policy.target_load
    if current < lo:
        return Decision(lo, f"below min_replicas {lo}")
    if current > hi:
        return Decision(hi, f"above max_replicas {hi}")
    latest = series[-1].load if series else 0.0
    if current == 0:
        if latest > 0:
            n = min(hi, max(1, _count(latest, target)))
            return Decision(n, f"{latest:g} request(s) waiting with no replica")
        return Decision(0)
    up = _window(series, now - policy.scale_up_delay_s)
    if up is not None and min(up) > current * target:
        n = min(hi, _count(min(up), target))
        if n > current:
            return Decision(n, f"load {min(up):g} above {current} x {target:g} for "
                               f"{policy.scale_up_delay_s:g}s")
    # Idle is its own hysteresis (no request at all for idle_seconds): no cooldown on it.
    if lo == 0 and latest <= 0 and now - last_request_at >= policy.idle_seconds:
        return Decision(0, f"no request for {policy.idle_seconds:g}s")
    if now - last_scaled_at < policy.scale_down_delay_s:
        return Decision(current)
    down = _window(series, now - policy.scale_down_delay_s)
    if down is None:
        return Decision(current)
    peak = max(down)
    n = max(lo, 1, _count(peak, target * DOWN_FRACTION))
    if n < current:
        return Decision(n, f"load at most {peak:g} for {policy.scale_down_delay_s:g}s "
                           f"(fits {n} x {DOWN_FRACTION * target:g})")
    return Decision(current)


def initial(d: DeploymentRecord, status: PlacementStatus | None) -> tuple[int, float]:
    """The count and last-action time a placer starts from: a previous leader's decision
    where the status holds one, else the deployment's ``replicas`` within its bounds."""
    assert d.autoscale is not None
    a = d.autoscale
    if status is not None and status.desired is not None:
        return min(max(status.desired, a.min_replicas), a.max_replicas), status.scaled_at
    return min(max(d.replicas, a.min_replicas), a.max_replicas), 0.0


def load_of(d: DeploymentRecord, loads: Iterable[SchedulerLoad],
            backends: Iterable[BackendRecord]) -> tuple[float, float]:
    """``(load, last_request_at)`` of a deployment: the schedulers' in-flight and queued
    requests for its model, or its engines' running and waiting requests where those say
    more (requests that did not come through a scheduler); the latest request's time."""
    sched = 0
    last = 0.0
    for record in loads:
        for m in record.models:
            if m.model == d.model:
                sched += max(m.inflight, 0) + max(m.queued, 0)
                last = max(last, m.last_request_at)
    engine = 0
    for b in backends:
        if b.deployment == d.name and b.load is not None:
            engine += max(b.load.running or 0, 0) + max(b.load.waiting or 0, 0)
    return float(max(sched, engine)), last


@dataclass(slots=True)
class _Track:
    replicas: int
    scaled_at: float
    since: float  # when this placer started watching (an idle clock never starts earlier)
    series: deque[Sample] = field(default_factory=deque)


@dataclass(frozen=True, slots=True)
class ScaleEvent:
    """A decision that changed a deployment's count (for the audit trail and logs)."""

    deployment: str
    old: int
    new: int
    reason: str
    time: float


class Autoscaler:
    """The leader's per-deployment counts; :meth:`step` samples the load and decides."""

    def __init__(self) -> None:
        self._tracks: dict[str, _Track] = {}
        self.events: list[ScaleEvent] = []  # taken by the placer into its next write

    def step(self, deployments: Mapping[str, DeploymentRecord],
             statuses: Mapping[str, PlacementStatus], loads: Iterable[SchedulerLoad],
             backends: Sequence[BackendRecord], now: float) -> bool:
        """Sample every autoscaled deployment's load and decide; True when a count changed."""
        loads = list(loads)
        changed = False
        for name in [n for n in self._tracks if n not in deployments
                     or deployments[n].autoscale is None]:
            del self._tracks[name]
        for name, d in deployments.items():
            policy = d.autoscale
            if policy is None:
                continue
            track = self._tracks.get(name)
            if track is None:
                count, scaled_at = initial(d, statuses.get(name))
                track = self._tracks[name] = _Track(count, scaled_at, since=now)
            load, last_request = load_of(d, loads, backends)
            if not track.series or track.series[-1].load != load:
                track.series.append(Sample(now, load))
            # Keep one sample from before the longest window, so the window stays covered.
            horizon = now - min(HISTORY_S, max(policy.scale_down_delay_s,
                                               policy.scale_up_delay_s) + 1.0)
            while len(track.series) > 1 and track.series[1].time <= horizon:
                track.series.popleft()
            # The idle clock starts no earlier than the deployment's last change or this
            # placer's term: a fresh leader or a new policy does not scale to zero at once.
            last = max(last_request, d.updated_at, track.since)
            decision = decide(policy, track.replicas, track.series, now=now,
                              last_request_at=last, last_scaled_at=track.scaled_at)
            if decision.replicas != track.replicas:
                self.events.append(ScaleEvent(name, track.replicas, decision.replicas,
                                              decision.reason, now))
                track.replicas, track.scaled_at = decision.replicas, now
                changed = True
        return changed

    def effective(self, deployments: Mapping[str, DeploymentRecord]
                  ) -> dict[str, DeploymentRecord]:
        """The deployments with each autoscaled one's ``replicas`` set to its current count."""
        out = {}
        for name, d in deployments.items():
            track = self._tracks.get(name)
            out[name] = d if track is None else dataclasses.replace(d, replicas=track.replicas)
        return out

    def state(self, name: str) -> tuple[int, float] | None:
        """``(count, last action time)`` of an autoscaled deployment, for its status."""
        track = self._tracks.get(name)
        return None if track is None else (track.replicas, track.scaled_at)

    def take_events(self) -> list[ScaleEvent]:
        events, self.events = self.events, []
        return events

    @property
    def active(self) -> bool:
        """Whether any deployment is autoscaled (the placer then samples every second)."""
        return bool(self._tracks)
