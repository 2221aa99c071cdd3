"""The scheduler's pure decisions: P2C over peak-EWMA cost, ejection, retry budget, auth."""

from __future__ import annotations

import hashlib
import random
import zlib
from collections import Counter

import pytest

from common.keys import Keys
from common.records import BackendLoad, BackendRecord, dump
from common.store import Event, KeyValue, Reset, Snapshot
from scheduler.auth import Authenticator, BadKey
from scheduler.budget import RetryBudget
from scheduler.registry import Registry
from scheduler.routing import Ejection, Router


def rec(name: str, model: str = "m", *, state: str = "ready", latency_ms: float | None = 10.0,
        waiting: int | None = None, node: str = "n1") -> BackendRecord:
    # A distinct port per name: the registry routes only http(s)://HOST:PORT URLs.
    port = 20000 + zlib.crc32(f"{node}/{name}".encode()) % 40000
    return BackendRecord(node=node, name=name, models=[model], url=f"http://127.0.0.1:{port}",
                         state=state, engine="sim", probe_latency_ms=latency_ms,
                         load=BackendLoad(waiting=waiting) if waiting is not None else None)


def router_with(*records: BackendRecord, seed: int = 1) -> Router:
    r = Router(random.Random(seed))
    for record in records:
        r.upsert(f"{record.node}/{record.name}", record)
    return r


def picks(r: Router, model: str = "m", n: int = 2000, now: float = 100.0) -> Counter[str]:
    counts: Counter[str] = Counter()
    for _ in range(n):
        b = r.choose(model, now)
        counts[b.key if b else None] += 1
    return counts


def test_only_ready_backends_of_the_model_are_candidates() -> None:
    r = router_with(rec("a"), rec("b", state="starting"), rec("c", model="other"),
                    rec("d", state="unhealthy"))
    assert set(picks(r)) == {"n1/a"}
    assert r.known("m") and r.known("other") and not r.known("nope")
    assert r.choose("nope", 0.0) is None
    assert r.models() == ["m", "other"]


def test_no_candidate_gives_none() -> None:
    r = router_with(rec("a", state="starting"))
    assert r.choose("m", 0.0) is None
    assert r.known("m")
    assert r.models() == []


def test_faster_backend_gets_most_traffic_slower_still_some() -> None:
    # A small pool is weighed in full: the cheapest takes every request while it stays so.
    r = router_with(rec("fast", latency_ms=5), rec("slow", latency_ms=50), rec("mid",
                    latency_ms=20))
    assert picks(r, n=500) == {"n1/fast": 500}
    # A large pool draws a few candidates (power of d choices): the cheapest wins every draw
    # it is in, and the costliest wins only a draw of costliest ones.
    r = router_with(*[rec(f"fast{i}", latency_ms=5) for i in range(10)],
                    *[rec(f"mid{i}", latency_ms=20) for i in range(10)],
                    *[rec(f"slow{i}", latency_ms=50) for i in range(10)])
    kinds = Counter(key.removeprefix("n1/").rstrip("0123456789")
                    for key in picks(r, n=3000).elements())
    assert kinds["fast"] > kinds["mid"] > kinds["slow"]
    assert kinds["slow"] < 0.05 * 3000


def test_measured_latency_replaces_the_probe_seed() -> None:
    r = router_with(rec("a", latency_ms=1), rec("b", latency_ms=100))
    a, b = r.backends["n1/a"], r.backends["n1/b"]
    # The probe said a is fast, but this replica measures it slow: the measure wins.
    a.observe(0.5, now=100.0)
    b.observe(0.01, now=100.0)
    counts = picks(r, n=500, now=100.0)
    assert counts["n1/b"] == 500


def test_in_flight_requests_raise_the_cost() -> None:
    r = router_with(rec("a", latency_ms=10), rec("b", latency_ms=10))
    r.backends["n1/a"].inflight = 5
    counts = picks(r, n=500)
    assert counts["n1/b"] == 500


def test_engine_queue_is_a_penalty() -> None:
    r = router_with(rec("a", latency_ms=10, waiting=8), rec("b", latency_ms=10, waiting=0))
    assert picks(r, n=500)["n1/b"] == 500


def test_impossible_engine_figures_give_no_advantage() -> None:
    # Probing: an engine reporting a negative queue got a negative cost and every request.
    # The records come through the registry as an agent writes them (they parse: the
    # figures are the engine's, and only the router knows what they do to a choice).
    keys = Keys("/p")
    r = Router(random.Random(1))
    reg = Registry(r, keys)
    liar = BackendRecord(node="n1", name="liar", models=["m"], url="http://127.0.0.1:19999",
                         state="ready", engine="sim", probe_latency_ms=10.0,
                         load=BackendLoad(running=-3, waiting=-50, kv_cache_usage=7.5))
    honest = rec("honest", latency_ms=10.0, waiting=0)
    reg.apply(Reset(Snapshot(1, [KeyValue(keys.backend("n1", "liar"), dump(liar), 1),
                                 KeyValue(keys.backend("n1", "honest"), dump(honest), 1)])))
    assert r.backends["n1/liar"].cost(100.0) > 0
    counts = picks(r, n=2000)
    assert 800 < counts["n1/honest"] < 1200, counts  # equals: they share the traffic
    # A negative probe latency is no figure at all: the default stands in for it.
    r = router_with(rec("a", latency_ms=-5.0), rec("b", latency_ms=10.0))
    assert r.backends["n1/a"].cost(100.0) > 0
    assert picks(r, n=500)["n1/b"] == 500


def test_peak_ewma_jumps_up_at_once_and_decays_slowly() -> None:
    r = router_with(rec("a"))
    a = r.backends["n1/a"]
    a.observe(0.010, now=0.0)
    a.observe(0.500, now=1.0)
    assert a.latency(1.0) == pytest.approx(0.5)
    a.observe(0.010, now=2.0)
    # One fast answer right after a slow one does not erase the slow one.
    assert a.latency(2.0) > 0.3


def test_equal_backends_share_traffic_and_replicas_do_not_herd() -> None:
    records = [rec(f"b{i}", latency_ms=10) for i in range(4)]
    counts = picks(router_with(*records), n=4000)
    assert all(700 < counts[f"n1/b{i}"] < 1300 for i in range(4)), counts
    # Two replicas with the same view but their own generators pick differently.
    r1, r2 = router_with(*records, seed=1), router_with(*records, seed=2)
    seq1 = [r1.choose("m", 0.0).key for _ in range(50)]
    seq2 = [r2.choose("m", 0.0).key for _ in range(50)]
    assert seq1 != seq2


def test_exclude_skips_tried_backends() -> None:
    r = router_with(rec("a"), rec("b"), rec("c"))
    a, b = r.backends["n1/a"], r.backends["n1/b"]
    for _ in range(100):
        assert r.choose("m", 0.0, exclude=[a, b]).key == "n1/c"
    assert r.choose("m", 0.0, exclude=list(r.backends.values())) is None


def test_index_follows_updates_and_removal() -> None:
    r = router_with(rec("a", model="x"))
    r.upsert("n1/a", rec("a", model="y"))
    assert not r.known("x") and r.known("y")
    r.backends["n1/a"].observe(0.2, now=1.0)
    r.upsert("n1/a", rec("a", model="y", latency_ms=1))
    assert r.backends["n1/a"].samples == 1  # measurements survive a record update
    r.remove("n1/a")
    assert not r.known("y") and r.backends == {}


def test_replace_drops_backends_not_in_the_snapshot() -> None:
    r = router_with(rec("a"), rec("b"))
    r.replace([("n1/b", rec("b")), ("n1/c", rec("c"))])
    assert sorted(r.backends) == ["n1/b", "n1/c"]


def test_choice_does_not_scan_large_groups() -> None:
    # 10,000 backends of one model: choose must still only touch a few of them.
    r = router_with(*[rec(f"b{i}") for i in range(10_000)])
    touched = 0
    original = r.usable

    def counting(b, now):  # type: ignore[no-untyped-def]
        nonlocal touched
        touched += 1
        return original(b, now)

    r.usable = counting  # type: ignore[method-assign]
    for _ in range(100):
        r.choose("m", 0.0)
    assert touched <= 100 * 4


# -- ejection ----------------------------------------------------------------------------------

def test_ejection_after_consecutive_failures_with_doubling_backoff() -> None:
    e = Ejection(threshold=5, base_s=5.0, max_s=60.0)
    for _ in range(4):
        assert not e.failure(0.0)
    assert e.failure(0.0)
    assert e.ejected(4.9) and not e.ejected(5.0)
    # Back from ejection and failing again: out at once, for twice as long.
    assert e.failure(5.0)
    assert e.ejected(14.9) and not e.ejected(15.0)
    t = 15.0
    for _ in range(10):
        e.failure(t)
        t += e.backoff_s
    assert e.backoff_s == 60.0


def test_refused_connection_ejects_at_once_and_success_returns() -> None:
    e = Ejection()
    assert e.failure(0.0, refused=True)
    assert e.ejected(1.0)
    e.success()
    assert not e.ejected(1.0)
    # History forgotten: it takes a full run of failures again.
    assert not e.failure(2.0)


def test_success_breaks_a_run_of_failures() -> None:
    e = Ejection(threshold=3)
    e.failure(0.0)
    e.failure(0.0)
    e.success()
    assert not e.failure(0.0)
    assert not e.failure(0.0)
    assert e.failure(0.0)


def test_ejected_backend_is_not_chosen_until_it_returns() -> None:
    r = router_with(rec("a"), rec("b"))
    r.backends["n1/a"].ejection.failure(10.0, refused=True)
    assert set(picks(r, now=11.0, n=200)) == {"n1/b"}
    assert r.next_change("m", 11.0) == pytest.approx(15.0)
    assert "n1/a" in picks(r, now=15.0, n=200)
    assert r.counts(11.0) == {"ready": 1, "ejected": 1, "not_ready": 0}


def test_agent_reporting_ready_again_lifts_an_ejection_but_keeps_probation() -> None:
    # The crash that ejected a backend is what its agent repairs: once the agent's probe
    # says ready again, waiting out the rest of the ejection only wastes capacity.
    r = router_with(rec("a"), rec("b"))
    b = r.backends["n1/a"]
    assert b.ejection.failure(10.0, refused=True)
    assert set(picks(r, now=11.0)) == {"n1/b"}
    r.upsert("n1/a", rec("a", state="starting"))
    assert set(picks(r, now=11.5)) == {"n1/b"}
    r.upsert("n1/a", rec("a", state="ready"))
    assert set(picks(r, now=12.0)) == {"n1/a", "n1/b"}
    # Still on probation: the next failure ejects again, for twice as long.
    assert b.ejection.failure(12.5)
    assert b.ejection.backoff_s == 10.0


def test_a_ready_record_refreshed_does_not_lift_an_ejection() -> None:
    r = router_with(rec("a"), rec("b"))
    r.backends["n1/a"].ejection.failure(10.0, refused=True)
    r.upsert("n1/a", rec("a", latency_ms=12.0))  # a heartbeat, not a recovery
    assert set(picks(r, now=11.0)) == {"n1/b"}


def test_busy_backends_are_not_candidates() -> None:
    r = router_with(rec("a"))
    r.max_inflight = 2
    r.backends["n1/a"].inflight = 2
    assert r.choose("m", 0.0) is None


# -- retry budget ------------------------------------------------------------------------------

def test_budget_allows_a_share_of_requests_plus_a_floor() -> None:
    budget = RetryBudget(ratio=0.2, window_s=10, floor_per_s=0.5)  # floor: 5 per window
    for _ in range(100):
        budget.request(0.0)
    allowed = sum(budget.try_retry(0.0) for _ in range(100))
    assert allowed == 25


def test_budget_window_slides() -> None:
    budget = RetryBudget(ratio=0.0, window_s=10, floor_per_s=0.1)  # one retry per window
    assert budget.try_retry(0.0)
    assert not budget.try_retry(5.0)
    assert budget.try_retry(10.5)


# -- auth --------------------------------------------------------------------------------------

def test_auth_plain_and_hashed_keys() -> None:
    hashed = "sha256:" + hashlib.sha256(b"s3cret").hexdigest()
    auth = Authenticator(["plainkey", hashed])
    assert auth.allows("Bearer plainkey")
    assert auth.allows("bearer s3cret")
    assert not auth.allows("Bearer wrong")
    assert not auth.allows(None)
    assert not auth.allows("Basic plainkey")
    assert not auth.allows(f"Bearer {hashed}")  # the digest itself is not a key


def test_auth_off_without_keys_and_bad_digest_refused() -> None:
    assert Authenticator([]).allows(None)
    with pytest.raises(BadKey):
        Authenticator(["sha256:abc"])


# -- registry ----------------------------------------------------------------------------------

def test_registry_applies_snapshot_events_and_skips_bad_records() -> None:
    keys = Keys("/p")
    r = Router(random.Random(1))
    bad = []
    reg = Registry(r, keys, on_bad_record=lambda: bad.append(1))
    reg.apply(Reset(Snapshot(7, [
        KeyValue(keys.backend("n1", "a"), dump(rec("a")), 5),
        KeyValue(keys.backend("n1", "broken"), b"{not json", 6),
        KeyValue("/p/backends/too/many/parts", dump(rec("x")), 6),
    ])))
    assert sorted(r.backends) == ["n1/a"] and bad == [1] and reg.synced
    reg.apply(Event("put", keys.backend("n2", "b"), dump(rec("b", node="n2")), 8))
    assert sorted(r.backends) == ["n1/a", "n2/b"]
    reg.apply(Event("delete", keys.backend("n1", "a"), b"", 9))
    assert sorted(r.backends) == ["n2/b"]
    # A record turned unreadable stops being routed to.
    reg.apply(Event("put", keys.backend("n2", "b"), b'{"schema": 99}', 10))
    assert r.backends == {} and bad == [1, 1] and reg.revision == 10
