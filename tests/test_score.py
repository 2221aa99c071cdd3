"""The routing score (scheduler/score.py) and how Router.choose uses it: prefix locality that
replicas compute alike, bounded by load; decode speed; non-streamed samples kept apart; KV."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections import Counter

import orjson
import pytest

from common.records import BackendLoad, BackendRecord
from scheduler import score
from scheduler.routing import Router
from scheduler.score import Hint, request_hint

SYSTEM = {"role": "system", "content": "You are a helpful assistant. " * 40}


def chat(*turns: str, **extra: object) -> bytes:
    messages: list[dict[str, str]] = [SYSTEM]
    for i, text in enumerate(turns):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    return orjson.dumps({"model": "m", "messages": messages, **extra})


def rec(name: str, *, kv: float | None = None, latency_ms: float = 10.0) -> BackendRecord:
    return BackendRecord(node="n1", name=name, models=["m"], url=f"http://127.0.0.1/{name}",
                         state="ready", engine="sim", probe_latency_ms=latency_ms,
                         load=BackendLoad(kv_cache_usage=kv) if kv is not None else None)


def router(names: list[str], seed: int = 1) -> Router:
    r = Router(random.Random(seed))
    for name in names:
        r.upsert(f"n1/{name}", rec(name))
    return r


NAMES = [f"b{i}" for i in range(8)]


# --- the request's hint -------------------------------------------------------------------------

def test_a_conversation_keeps_its_key_as_it_grows() -> None:
    first = request_hint(chat("What is a fleet?", stream=True, max_tokens=50))
    later = request_hint(chat("What is a fleet?", "A group of machines.", "And a node?"))
    other = request_hint(chat("What is a node?"))
    assert first.key is not None and first.key == later.key != other.key
    assert first.stream and first.max_tokens == 50
    assert not later.stream and later.max_tokens is None
    # max_completion_tokens (the newer name) wins; nonsense limits are none.
    assert request_hint(chat("x", max_completion_tokens=7, max_tokens=9)).max_tokens == 7
    assert request_hint(chat("x", max_tokens=-1)).max_tokens is None


def test_text_prompts_key_on_their_opening_and_junk_has_no_key() -> None:
    opening = "x" * score.TEXT_KEY_CHARS
    a = request_hint(orjson.dumps({"model": "m", "prompt": opening + " one"}))
    b = request_hint(orjson.dumps({"model": "m", "prompt": [opening + " two"]}))
    assert a.key is not None and a.key == b.key
    for body in (b"not json", b"[1, 2]", orjson.dumps({"model": "m"}),
                 orjson.dumps({"model": "m", "messages": ["bad"]})):
        assert request_hint(body) == Hint(size=len(body))


def test_the_hash_is_the_same_in_every_process() -> None:
    # Python's hash() is salted per process; replicas must agree on ring points and keys.
    code = ("from scheduler.score import stable_hash, prefix_hash; "
            "print(stable_hash(b'aivmm'), prefix_hash('aivmm'))")
    seen = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True, env={**os.environ, "PYTHONHASHSEED": seed}).stdout
            for seed in ("1", "2")}
    assert seen == {f"{score.stable_hash(b'aivmm')} {score.prefix_hash('aivmm')}\n"}
    # Keys land all over the ring's 64 bits, not in a corner of it.
    keys = [score.prefix_hash(f"conversation {i}") for i in range(1000)]
    assert min(keys) < 2**60 and max(keys) > 2**64 - 2**60 and len(set(keys)) == 1000


# --- prefix locality ----------------------------------------------------------------------------

def test_replicas_agree_on_the_preferred_backend_without_sharing_state() -> None:
    one = router(NAMES, seed=1)
    two = router(list(reversed(NAMES)), seed=99)  # other order, other random draws
    for i in range(50):
        hint = request_hint(chat(f"session {i}", stream=True))
        a, b = one.choose("m", 100.0, hint=hint), two.choose("m", 100.0, hint=hint)
        assert a is not None and b is not None and a.key == b.key


def test_sessions_spread_over_the_backends() -> None:
    r = router(NAMES)
    counts: Counter[str] = Counter()
    for i in range(800):
        b = r.choose("m", 100.0, hint=request_hint(chat(f"session {i}")))
        assert b is not None
        counts[b.key] += 1
    assert len(counts) == len(NAMES) and max(counts.values()) < 3 * min(counts.values())


def test_a_backend_joining_moves_only_its_share_of_keys() -> None:
    before, after = router(NAMES), router([*NAMES, "new"])
    hints = [request_hint(chat(f"s{i}")) for i in range(600)]
    moved = 0
    for hint in hints:
        a, b = before.choose("m", 100.0, hint=hint), after.choose("m", 100.0, hint=hint)
        assert a is not None and b is not None
        if a.key != b.key:
            assert b.key == "n1/new"  # keys move only to the newcomer
            moved += 1
    assert 0 < moved < len(hints) * 0.25


def test_a_busy_preferred_backend_spills_over_to_the_cheapest() -> None:
    r = router(NAMES)
    for b in r.backends.values():
        b.observe(0.5, 100.0, streamed=False)  # each answered once: past its slow start
    hint = request_hint(chat("hot session"))
    preferred = r.choose("m", 100.0, hint=hint)
    assert preferred is not None
    preferred.inflight = 1  # within the bound: still preferred
    assert r.choose("m", 100.0, hint=hint) is preferred
    preferred.inflight = 20  # far above what the others cost: goes elsewhere
    picks = Counter(r.choose("m", 100.0, hint=hint) for _ in range(200))
    assert preferred not in picks


def test_excluded_or_ejected_preferred_backend_is_skipped() -> None:
    r = router(NAMES)
    hint = request_hint(chat("retry me"))
    preferred = r.choose("m", 100.0, hint=hint)
    assert preferred is not None
    other = r.choose("m", 100.0, exclude=[preferred], hint=hint)
    assert other is not None and other is not preferred
    preferred.ejection.failure(100.0, refused=True)
    assert r.choose("m", 100.0, hint=hint) is not preferred


def test_ring_follows_removal() -> None:
    r = router(NAMES)
    hint = request_hint(chat("moving"))
    preferred = r.choose("m", 100.0, hint=hint)
    assert preferred is not None
    r.remove(preferred.key)
    again = r.choose("m", 100.0, hint=hint)
    assert again is not None and again.key in r.backends


# --- decode speed, non-streamed samples, KV -----------------------------------------------------

def test_a_fast_first_byte_with_slow_decoding_does_not_win_long_answers() -> None:
    r = router(["quick", "steady"])
    quick, steady = r.backends["n1/quick"], r.backends["n1/steady"]
    quick.observe(0.05, 100.0)
    steady.observe(0.20, 100.0)
    quick.observe_decode(0.100, 100.0)   # 10 tokens/s
    steady.observe_decode(0.010, 100.0)  # 100 tokens/s
    long = Hint(max_tokens=500, stream=True)
    short = Hint(max_tokens=1, stream=True)
    assert {r.choose("m", 100.0, hint=long) for _ in range(100)} == {steady}
    assert {r.choose("m", 100.0, hint=short) for _ in range(100)} == {quick}


def test_non_streamed_samples_are_kept_apart_from_time_to_first_byte() -> None:
    r = router(["a", "b"])
    a, b = r.backends["n1/a"], r.backends["n1/b"]
    a.observe(0.02, 100.0)
    b.observe(0.03, 100.0)
    # a's non-streamed answers take 4 s (that is the whole generation, not its first byte).
    a.observe(4.0, 100.0, streamed=False)
    assert a.latency(100.0) == pytest.approx(0.02)
    assert {r.choose("m", 100.0, hint=Hint(stream=True)) for _ in range(50)} == {a}
    # A non-streamed request is weighed by non-streamed times where there are some.
    b.observe(1.0, 100.0, streamed=False)
    assert {r.choose("m", 100.0, hint=Hint(stream=False)) for _ in range(50)} == {b}


def test_a_nearly_full_kv_cache_costs_more() -> None:
    r = Router(random.Random(1))
    r.upsert("n1/full", rec("full", kv=0.99))
    r.upsert("n1/room", rec("room", kv=0.5))
    assert {r.choose("m", 100.0) for _ in range(50)} == {r.backends["n1/room"]}
    assert score.kv_factor(0.5) == 1.0 and score.kv_factor(1.0) == pytest.approx(2.0)
    # An impossible reading is no reading.
    r.upsert("n1/full", rec("full", kv=7.0))
    assert r.backends["n1/full"].kv == 0.0


def test_decode_samples_learn_and_reject_nonsense() -> None:
    r = router(["a"])
    a = r.backends["n1/a"]
    assert a.tpot(100.0) == 0.0
    a.observe_decode(0.02, 100.0)
    a.observe_decode(float("nan"), 100.0)
    a.observe_decode(-1.0, 100.0)
    assert a.tpot(100.0) == pytest.approx(0.02) and a.tpot_samples == 1
    before = r.mean_output
    r.observe_output(1000)
    assert r.mean_output > before


def test_a_long_prompt_goes_where_prefill_is_fast() -> None:
    r = router(["small", "big"])
    small, big = r.backends["n1/small"], r.backends["n1/big"]
    # small answered short prompts in 0.1 s, big 40 kB prompts in 0.3 s: small's first byte
    # looks faster, but per byte of prompt big prefills 13 times faster.
    small.observe(0.1, 100.0, size=1000)
    big.observe(0.3, 100.0, size=40_000)
    assert small.latency(100.0) < big.latency(100.0)
    assert {r.choose("m", 100.0, hint=Hint(stream=True, size=40_000))
            for _ in range(50)} == {big}
    # Unknown sizes compare the figures as they are.
    assert {r.choose("m", 100.0, hint=Hint(stream=True)) for _ in range(50)} == {small}
    assert score.size_factor(0, 5000.0) == 1.0 and score.size_factor(100, 0.0) == 1.0
    assert score.size_factor(100, 2048.0) == 1.0  # under the floor: fixed costs only


# --- load as a batching engine serves it; a small pool weighed in full ---------------------------

def test_requests_decoding_in_a_batch_weigh_less_than_requests_waiting() -> None:
    r = router(["busy", "idle"])
    busy, idle = r.backends["n1/busy"], r.backends["n1/idle"]
    busy.observe(0.10, 100.0)
    idle.observe(0.20, 100.0)
    # Five answers already streaming from busy's batch slow its steps a little: the next
    # request still starts and ends sooner there than on the slower idle device.
    busy.inflight, busy.pending = 5, 0
    assert {r.choose("m", 100.0) for _ in range(50)} == {busy}
    # Five waiting for their first token are a queue the next request joins behind.
    busy.pending = 5
    assert {r.choose("m", 100.0) for _ in range(50)} == {idle}


def test_an_idle_slow_device_does_not_come_to_look_fast() -> None:
    r = router(["fast", "slow"])
    fast, slow = r.backends["n1/fast"], r.backends["n1/slow"]
    for t in range(5):
        fast.observe(0.05, 100.0 + t, size=4000)
        slow.observe(1.00, 100.0 + t, size=4000)
    fast.inflight = 4  # decoding
    # A minute later slow has had no traffic and its peak-EWMA has decayed to almost
    # nothing; its floor, learnt from its own best answers, still says what it is.
    later = 160.0
    assert slow.latency(later) < 0.01
    hint = Hint(stream=True, size=4000)
    assert {r.choose("m", later, hint=hint) for _ in range(50)} == {fast}
    assert slow.seconds(later, size=4000) == pytest.approx(1.0)


def test_the_floor_falls_to_a_faster_answer_and_rises_slowly() -> None:
    r = router(["a"])
    a = r.backends["n1/a"]
    a.observe(0.2, 100.0, size=2048)
    a.observe(0.1, 100.0, size=2048)
    assert a.base_rate * 2048 == pytest.approx(0.15)
    for _ in range(3):
        a.observe(2.0, 100.0, size=2048)  # a loaded spell
    assert a.base_rate * 2048 < 0.5
    # The floor is per unit of prompt: a long prompt's answer floors a short one's time in
    # proportion, long after the peak has decayed.
    b = router(["b"]).backends["n1/b"]
    b.observe(1.0, 100.0, size=20_480)
    assert b.seconds(1000.0, size=20_480) == pytest.approx(1.0)
    assert b.seconds(1000.0, size=4096) == pytest.approx(0.2)


def test_a_small_pool_of_unlike_devices_never_draws_only_slow_ones() -> None:
    # Two fast devices and four slow ones, all idle: four random candidates of six hold no
    # fast one about one time in fifteen. Weighed in full, none of 1,000 goes to a slow one.
    r = Router(random.Random(3))
    for name, ms in (("fast0", 10.0), ("fast1", 10.0), ("slow0", 80.0), ("slow1", 80.0),
                     ("slow2", 80.0), ("slow3", 80.0)):
        r.upsert(f"n1/{name}", rec(name, latency_ms=ms))
    counts = Counter(b.name for b in (r.choose("m", 100.0) for _ in range(1000)) if b)
    assert set(counts) == {"fast0", "fast1"}
    assert 400 < counts["fast0"] < 600  # like backends share the traffic


def test_a_first_byte_ends_the_wait_but_not_the_request() -> None:
    r = router(["a"])
    a = r.backends["n1/a"]
    a.observe(0.1, 100.0)
    a.inflight, a.pending = 1, 1
    waiting = a.cost(100.0)
    a.pending = 0
    assert a.cost(100.0) < waiting
    a.inflight = 0
    assert a.cost(100.0) < waiting


def test_a_backend_takes_one_request_at_a_time_until_its_first_answer() -> None:
    r = router(["known", "new"])
    known, new = r.backends["n1/known"], r.backends["n1/new"]
    known.observe(0.5, 100.0)
    known.observe(3.0, 100.0, streamed=False)
    known.inflight = 6  # decoding: cost 1.6 x 0.5 s, far above new's 10 ms probe figure
    assert r.choose("m", 100.0) is new
    new.inflight = new.pending = 1
    # Its probe figure says nothing of a request's time: no second one before it answers.
    assert {r.choose("m", 100.0) for _ in range(50)} == {known}
    new.observe(0.2, 100.0)
    new.pending = 0
    assert r.choose("m", 100.0) is new
    # A kind of request it has not answered yet (non-streamed) starts slow again.
    assert {r.choose("m", 100.0, hint=Hint(stream=False)) for _ in range(50)} == {known}
