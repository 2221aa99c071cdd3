"""Choosing a backend for a request: pure state and arithmetic, no I/O.

Cost of a backend = expected time of the request there (time to first token of streamed
answers, floored at the device's own speed, + expected tokens x learnt time per output token;
for a non-streamed request, the backend's non-streamed answer time) x the queue it would join
as a batching engine serves it (requests waiting for their first token and the engine's queue
in full, requests decoding a tenth each) x a KV-cache penalty (scheduler/score.py). A pool of
up to ``score.SCAN_ALL`` backends is weighed in full, a larger one by power of d random
choices; near-ties are broken by each replica's own random generator, so replicas that see
the same etcd view spread their picks instead of herding. Then prefix locality: the
request's preferred backend on a consistent-hash ring of the pool (the same on every
replica) wins unless it costs more than a bounded slack above that pick. Candidates come
from an index by model, so a decision in a large pool costs the same however many backends
the cluster has.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

from common.records import BackendRecord
from scheduler import score
from scheduler.score import Hint

# The latency assumed for a backend that has neither samples nor a probe figure yet.
DEFAULT_LATENCY_S = 0.05
# Weight of one stream's time per output token in its average.
TPOT_WEIGHT = 0.2
# Time constant of the latency average: a sample counts half after ~7 s.
DECAY_S = 10.0
# Weights of one sample in the floor of time to first byte: it falls to a faster answer
# at once nearly, and a run of slow (loaded) answers raises it only slowly.
BASE_FALL = 0.5
BASE_RISE = 0.05


@dataclass(slots=True)
class Ejection:
    """Outlier ejection of one backend with exponential backoff (clock passed in)."""

    threshold: int = 5
    base_s: float = 5.0
    max_s: float = 60.0
    failures: int = 0
    until: float = 0.0
    backoff_s: float = 0.0  # the last ejection's length; 0 = not on probation
    ejections: int = 0

    def ejected(self, now: float) -> bool:
        return now < self.until

    def success(self) -> None:
        """A good answer returns the backend to full service and forgets its history."""
        self.failures = 0
        self.backoff_s = 0.0
        self.until = 0.0

    def lift(self) -> None:
        """End the current ejection early but stay on probation (one more failure re-ejects).

        Used when the agent reports the backend ready again: its probe is fresher evidence
        than our last failure, which was often the very crash the agent has since repaired.
        """
        self.until = 0.0
        self.failures = 0

    def failure(self, now: float, refused: bool = False) -> bool:
        """Count a failure; returns True when this failure ejects the backend."""
        self.failures += 1
        # A backend back from ejection that fails again has not recovered: eject again at
        # once, for twice as long, rather than waiting for another run of failures.
        on_probation = self.backoff_s > 0 and not self.ejected(now)
        if refused or self.failures >= self.threshold or on_probation:
            if self.ejected(now):
                return False
            self.backoff_s = (min(self.max_s, self.backoff_s * 2) if self.backoff_s
                              else self.base_s)
            self.until = now + self.backoff_s
            self.failures = 0
            self.ejections += 1
            return True
        return False


@dataclass(slots=True, eq=False)
class Backend:
    """What this replica knows about one backend: its record plus its own measurements."""

    key: str  # "node/name"
    node: str
    name: str
    url: str
    models: tuple[str, ...]
    ready: bool
    api: str = ""  # the base of the engine's OpenAI API: url + the record's api_path
    deployment: str | None = None  # the deployment it is a replica of (routes may name it)
    revivals: int = 0  # times its agent reported it ready again after it was not
    waiting: int = 0
    probe_latency_s: float | None = None
    kv: float = 0.0  # the engine's KV-cache usage, 0..1
    # Peak-EWMAs: time to first byte of streamed answers (ewma_s), time per output token
    # learnt from streams (tpot_s) and the whole time of non-streamed answers (whole_s).
    ewma_s: float = 0.0
    stamp: float = 0.0
    samples: int = 0
    sample_size: float = 0.0  # body size the time to first byte stands for (same weights)
    tpot_s: float = 0.0
    tpot_stamp: float = 0.0
    tpot_samples: int = 0
    whole_s: float = 0.0
    whole_stamp: float = 0.0
    whole_samples: int = 0
    # Time to first byte per size unit of prompt (score.size_units), a floor under the
    # decayed peak: it falls fast to a quicker answer and rises slowly, so it tracks the
    # device's unloaded speed.
    base_rate: float = 0.0
    inflight: int = 0
    pending: int = 0  # of inflight, those with no first byte yet
    ejection: Ejection = field(default_factory=Ejection)

    def latency(self, now: float) -> float:
        """Peak-EWMA time to first byte; before any sample, the agent's probe figure."""
        if not self.samples:
            return self.probe_latency_s or DEFAULT_LATENCY_S
        return _decayed(self.ewma_s, self.stamp, now)

    def tpot(self, now: float) -> float:
        """Time per output token learnt from streams; 0 (not counted) before any. It does not
        decay while idle: decode speed is the device's, and an idle slow decoder whose figure
        fell towards zero would look cheap and draw a burst of requests it then drags out."""
        return self.tpot_s if self.tpot_samples else 0.0

    def whole(self, now: float) -> float | None:
        """Time of a whole non-streamed answer; None before any."""
        return _decayed(self.whole_s, self.whole_stamp, now) if self.whole_samples else None

    def seconds(self, now: float, tokens: float = 0.0, stream: bool = True,
                size: int = 0) -> float:
        """Expected time of one request (of ``size`` body bytes) here, before load counts."""
        ttft = max(self.latency(now) * score.size_factor(size, self.sample_size),
                   self.base_rate * score.size_units(size))
        return score.request_seconds(ttft, self.tpot(now), self.whole(now), tokens, stream)

    def cost(self, now: float, tokens: float = 0.0, stream: bool = True,
             size: int = 0) -> float:
        return self.cost_of(self.seconds(now, tokens, stream, size), stream)

    def cost_of(self, seconds: float, stream: bool = True) -> float:
        """The cost of a request expected to take ``seconds`` here before load counts."""
        if self.inflight and not (self.samples if stream else self.whole_samples):
            # Slow start: until its first answer of the kind says how fast it is, a backend
            # takes one request at a time. Its probe figure is no measure of a request's
            # time, and on it a slow card new to this replica would draw a burst of long
            # prompts it then serves late.
            return math.inf
        return score.cost(seconds, self.pending, self.inflight - self.pending, self.waiting,
                          self.kv)

    def observe(self, seconds: float, now: float, streamed: bool = True,
                size: int = 0) -> None:
        """Fold one time-to-first-byte sample into the peak-EWMA: streamed answers' into
        time to first byte, others' (whose first byte is the end of generation) apart."""
        if streamed:
            new = _peak(self.ewma_s, self.stamp, self.samples, seconds, now)
            if size:
                # The size the figure stands for moves with it: a peak takes the sample's
                # size, a blend blends the sizes with the same weight.
                size_f = float(max(size, score.SIZE_FLOOR))
                if not self.sample_size or new == seconds:
                    self.sample_size = size_f
                else:
                    w = math.exp(-(now - self.stamp) / DECAY_S)
                    self.sample_size = self.sample_size * w + size_f * (1.0 - w)
            rate = seconds / score.size_units(size)
            self.base_rate = (rate if not self.samples else self.base_rate
                              + (rate - self.base_rate) * (BASE_FALL if rate < self.base_rate
                                                           else BASE_RISE))
            self.ewma_s = new
            self.stamp = now
            self.samples += 1
        else:
            self.whole_s = _peak(self.whole_s, self.whole_stamp, self.whole_samples, seconds,
                                 now)
            self.whole_stamp = now
            self.whole_samples += 1

    def observe_decode(self, seconds_per_token: float, now: float) -> None:
        """Fold one stream's time per output token into its peak-EWMA."""
        if not math.isfinite(seconds_per_token) or seconds_per_token < 0:
            return
        # A plain average, not a peak: one stream slowed by a neighbour's long prefill says
        # little about the device's decode speed.
        self.tpot_s = (seconds_per_token if not self.tpot_samples
                       else self.tpot_s + (seconds_per_token - self.tpot_s) * TPOT_WEIGHT)
        self.tpot_stamp = now
        self.tpot_samples += 1


def _decayed(value: float, stamp: float, now: float) -> float:
    # Decay towards zero while idle (as Finagle does), so a backend that lost its traffic
    # after a slow spell is tried again eventually and can prove it has recovered.
    age = now - stamp
    return value * math.exp(-age / DECAY_S) if age > 0 else value


def _peak(value: float, stamp: float, samples: int, sample: float, now: float) -> float:
    """The peak-EWMA after ``sample``."""
    if not samples:
        return sample
    current = _decayed(value, stamp, now)
    if sample > current:
        # Peak sensitivity: a slow answer counts in full at once; only recovery is
        # smoothed, so a backend going bad loses traffic immediately.
        return sample
    w = math.exp(-(now - stamp) / DECAY_S)
    return current * w + sample * (1.0 - w)


def backend_from_record(key: str, record: BackendRecord) -> Backend:
    """A fresh Backend for a record (no measurements yet)."""
    b = Backend(key=key, node=record.node, name=record.name, url=record.url.rstrip("/"),
                models=tuple(record.models), ready=False)
    _refresh(b, record)
    return b


def _refresh(b: Backend, record: BackendRecord) -> None:
    b.url = record.url.rstrip("/")
    b.api = b.url + record.api_path
    b.models = tuple(record.models)
    b.deployment = record.deployment
    ready = record.state == "ready"
    if ready and not b.ready:
        b.ejection.lift()
        b.revivals += 1
    b.ready = ready
    # The figures come from the engine through its agent and are not to be trusted: a
    # negative queue or latency would give a negative cost and win every choice.
    b.waiting = _queue(record.load.waiting) if record.load else 0
    b.kv = _ratio(record.load.kv_cache_usage) if record.load else 0.0
    b.probe_latency_s = _probe_s(record.probe_latency_ms)


def _queue(value: int | None) -> int:
    """An engine's queue length, 0 when it says none or something impossible."""
    return value if value is not None and value > 0 else 0


def _ratio(value: float | None) -> float:
    """A KV-cache usage in 0..1; 0 (no reading) when absent or impossible."""
    if value is None or not 0.0 <= value <= 1.0:
        return 0.0
    return value


def _probe_s(ms: float | None) -> float | None:
    """A probe latency in seconds; None (so the default) unless it is a positive number."""
    if ms is None or not math.isfinite(ms) or ms <= 0:
        return None
    return ms / 1000.0


@dataclass(frozen=True, slots=True)
class Deployed:
    """A pool key for :meth:`Router.choose`: the backends of one deployment (a route's
    target), rather than every backend of a model."""

    name: str


# What a request chooses among: every backend of a model, or those of one deployment.
Pool = str | Deployed


class Router:
    """The table of backends indexed by model, and the P2C choice among them."""

    def __init__(self, rng: random.Random | None = None, *,
                 eject_threshold: int = 5, eject_base_s: float = 5.0,
                 eject_max_s: float = 60.0, max_inflight: int = 0) -> None:
        # Seeded from the OS per replica unless a test pins it: the anti-herding property.
        self.rng = rng or random.Random()
        self.backends: dict[str, Backend] = {}
        self._by_model: dict[str, list[Backend]] = {}
        # Per pool: the consistent-hash ring of its backends, built when first needed and
        # dropped when the pool's membership changes.
        self._rings: dict[Pool, tuple[list[int], list[int]]] = {}
        # Tokens of an answer, averaged over the streams seen (for requests with no limit).
        self.mean_output = float(score.DEFAULT_OUTPUT_TOKENS)
        self._by_deployment: dict[str, list[Backend]] = {}
        self._eject = (eject_threshold, eject_base_s, eject_max_s)
        self.max_inflight = max_inflight
        # Called with each backend that leaves the table, so its metric series can go too.
        self.on_remove: Callable[[Backend], None] = lambda _b: None

    # -- the table ---------------------------------------------------------------------------

    def upsert(self, key: str, record: BackendRecord) -> Backend:
        """Add or update a backend from its record, keeping this replica's measurements."""
        b = self.backends.get(key)
        if b is None:
            b = backend_from_record(key, record)
            b.ejection = Ejection(*self._eject)
            self.backends[key] = b
            self._index(b)
            return b
        old_models, old_deployment = b.models, b.deployment
        _refresh(b, record)
        if b.models != old_models or b.deployment != old_deployment:
            self._unindex(b, old_models, old_deployment)
            self._index(b)
        return b

    def remove(self, key: str) -> Backend | None:
        b = self.backends.pop(key, None)
        if b is not None:
            self._unindex(b, b.models, b.deployment)
            self.on_remove(b)
        return b

    def replace(self, records: Iterable[tuple[str, BackendRecord]]) -> None:
        """Make the table exactly ``records``, keeping measurements of backends that stay."""
        keep: set[str] = set()
        for key, record in records:
            self.upsert(key, record)
            keep.add(key)
        for key in [k for k in self.backends if k not in keep]:
            self.remove(key)

    def _index(self, b: Backend) -> None:
        for model in b.models:
            self._by_model.setdefault(model, []).append(b)
        if b.deployment is not None:
            self._by_deployment.setdefault(b.deployment, []).append(b)
        self._drop_rings(b.models, b.deployment)

    def _drop_rings(self, models: tuple[str, ...], deployment: str | None) -> None:
        for model in models:
            self._rings.pop(model, None)
        if deployment is not None:
            self._rings.pop(Deployed(deployment), None)

    def _unindex(self, b: Backend, models: tuple[str, ...], deployment: str | None) -> None:
        self._drop_rings(models, deployment)
        for index, names in ((self._by_model, models),
                             (self._by_deployment, () if deployment is None else (deployment,))):
            for name in names:
                group = index.get(name)
                if group is None:
                    continue
                group[:] = [x for x in group if x is not b]
                if not group:
                    del index[name]

    def _group(self, pool: Pool) -> list[Backend] | None:
        if isinstance(pool, Deployed):
            return self._by_deployment.get(pool.name)
        return self._by_model.get(pool)

    # -- queries -----------------------------------------------------------------------------

    def known(self, model: str) -> bool:
        """Whether any backend (in any state) says it serves ``model``."""
        return model in self._by_model

    def models(self) -> list[str]:
        """Models with at least one ready backend, sorted."""
        return sorted(m for m, group in self._by_model.items() if any(b.ready for b in group))

    def has_usable(self, pool: Pool, now: float) -> bool:
        """Whether ``pool`` has a backend a request could be sent to now."""
        return any(self.usable(b, now) for b in self._group(pool) or ())

    def deployment_models(self, name: str) -> tuple[str, ...]:
        """The models the backends of deployment ``name`` serve (first one first)."""
        group = self._by_deployment.get(name)
        return group[0].models if group else ()

    def usable(self, b: Backend, now: float) -> bool:
        return (b.ready and not b.ejection.ejected(now)
                and (not self.max_inflight or b.inflight < self.max_inflight))

    def hint(self, model: Pool, body: bytes,
             data: dict[str, Any] | None = None) -> Hint | None:
        """What the request says that matters to a choice (from ``data``, its body already
        parsed, when given); None (nothing looked at) when the pool has a single backend and
        there is no choice to make."""
        group = self._group(model)
        if group is None or len(group) < 2:
            return None
        return score.request_hint(body) if data is None else score.hint_of(data, len(body))

    def observe_output(self, tokens: int) -> None:
        """One stream's answer length, for requests that set no limit."""
        self.mean_output += (tokens - self.mean_output) * 0.05

    def choose(self, model: Pool, now: float, exclude: Collection[Backend] = (),
               hint: Hint | None = None) -> Backend | None:
        """The cheapest usable backend of ``model`` (a model id, or a :class:`Deployed` pool)
        not in ``exclude`` (all weighed, or d drawn), then the request's preferred backend by
        prefix, within bounds (module docstring)."""
        tokens = float(hint.max_tokens or self.mean_output) if hint else self.mean_output
        stream = hint.stream if hint else True
        size = hint.size if hint else 0
        best = self._p2c(model, now, exclude, tokens, stream, size)
        if best is None or hint is None or hint.key is None:
            return best
        group = self._group(model)
        assert group is not None
        ring = self._rings.get(model)
        if ring is None:
            ring = self._rings[model] = score.build_ring([b.key for b in group])
        best_unit = best.seconds(now, tokens, stream, size)
        best_cost = best.cost_of(best_unit, stream)
        tried = 0
        for i in score.ring_walk(ring[0], ring[1], hint.key):
            b = group[i]
            if b in exclude or not self.usable(b, now):
                continue
            if b is best:
                return b
            if score.within_slack(b.cost(now, tokens, stream, size), best_cost, best_unit):
                return b
            tried += 1
            if tried == 2:
                break
        return best

    def _p2c(self, model: Pool, now: float, exclude: Collection[Backend], tokens: float,
             stream: bool, size: int) -> Backend | None:
        group = self._group(model)
        if not group:
            return None
        n = len(group)
        rng = self.rng
        if n <= score.SCAN_ALL:
            return self._scan(group, now, exclude, tokens, stream, size)
        # A few random draws usually find two usable backends at once; scan only when most of
        # the group is unusable, so the common case stays O(1) in the size of the group.
        first = second = None
        for _ in range(4):
            b = group[int(rng.random() * n)]
            if b is first or b in exclude or not self.usable(b, now):
                continue
            if first is None:
                first = b
            else:
                second = b
                break
        if second is None and n > 1:
            pool = [b for b in group if b is not first and b not in exclude
                    and self.usable(b, now)]
            if first is not None and pool:
                second = pool[int(rng.random() * len(pool))]
            elif len(pool) >= 2:
                first, second = rng.sample(pool, 2)
            elif pool:
                first = pool[0]
        if first is None:
            return None
        if second is None:
            return first
        c1, c2 = (first.cost(now, tokens, stream, size),
                  second.cost(now, tokens, stream, size))
        if c1 == c2:
            best, c_best = (first, c1) if rng.random() < 0.5 else (second, c2)
        else:
            best, c_best = (first, c1) if c1 < c2 else (second, c2)
        # More random draws, up to score.CHOICES candidates in all (power of d choices): in a
        # pool of unlike devices, two draws land on two slow ones too often (with 4 slow of 6,
        # 40 % of the time), whatever their load. Still random, so replicas still spread.
        seen = [first, second]
        for _ in range(2 * (score.CHOICES - 2)):
            if len(seen) >= min(score.CHOICES, n):
                break
            b = group[int(rng.random() * n)]
            if b in seen or b in exclude or not self.usable(b, now):
                continue
            seen.append(b)
            c = b.cost(now, tokens, stream, size)
            if c < c_best:
                best, c_best = b, c
        return best

    def _scan(self, group: list[Backend], now: float, exclude: Collection[Backend],
              tokens: float, stream: bool, size: int) -> Backend | None:
        """The cheapest usable backend of a small pool; near-ties broken at random."""
        if len(group) == 1:  # nothing to weigh (the common single-replica model)
            b = group[0]
            return b if b not in exclude and self.usable(b, now) else None
        costs = [(b.cost(now, tokens, stream, size), b) for b in group
                 if b not in exclude and self.usable(b, now)]
        if not costs:
            return None
        if len(costs) == 1:
            return costs[0][1]
        bound = min(c for c, _ in costs) * (1.0 + score.NEAR_TIE)
        near = [b for c, b in costs if c <= bound]
        return near[int(self.rng.random() * len(near))]

    def next_change(self, model: Pool, now: float) -> float | None:
        """When the earliest ejection among ``model``'s ready backends ends, if any."""
        ends = [b.ejection.until for b in self._group(model) or ()
                if b.ready and b.ejection.ejected(now)]
        return min(ends) if ends else None

    def counts(self, now: float) -> dict[str, int]:
        """Backends by state as this replica sees them: ready, ejected, not_ready."""
        out = {"ready": 0, "ejected": 0, "not_ready": 0}
        for b in self.backends.values():
            if not b.ready:
                out["not_ready"] += 1
            elif b.ejection.ejected(now):
                out["ejected"] += 1
            else:
                out["ready"] += 1
        return out
