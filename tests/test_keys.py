"""API keys (docs/keys.md), the pure parts: the sliding window on a fake clock, shares, the
key ring's lookups and limits, the usage chunk asked for and hidden, the usage summing."""

from __future__ import annotations

import orjson
import pytest

from common.keys import Keys
from common.keyview import bucket_of, key_views, sum_usage
from common.records import KeyCounts, KeyRecord, KeyUsage, RecordError, dump, parse_key
from common.store import Event, Reset, Snapshot
from scheduler.apikeys import (
    KeyRing,
    SlidingWindow,
    UsageHider,
    ask_for_usage,
    hash_key,
    new_key,
    share,
)
from scheduler.tap import Tap

KEYS = Keys("/t")


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_window_never_admits_more_than_the_limit_in_any_minute() -> None:
    w, clock, limit = SlidingWindow(), Clock(100.999), 30
    admitted: list[float] = []
    # Hammer every 10 ms for 5 minutes, admitting while the window is under the limit.
    while clock.t < 400:
        if w.used(clock.t) < limit:
            w.add(clock.t, 1)
            admitted.append(clock.t)
        clock.t += 0.01
    for i, t in enumerate(admitted):  # any 60 s interval starting at an admission
        inside = sum(1 for x in admitted[i:] if x - t <= 60.0)
        assert inside <= limit
    # ... and the sustained rate is close to the limit: about 30 per 61 s.
    assert len(admitted) >= limit * 299 // 61


def test_window_retry_after_says_when_a_slot_frees() -> None:
    w = SlidingWindow()
    w.add(10.2, 5)
    w.add(30.5, 5)
    assert w.used(31.0) == 10
    assert w.retry_after(31.0, 10) == pytest.approx(71 - 31.0)  # second 10 leaves at 71
    assert w.retry_after(31.0, 6) == pytest.approx(40.0)
    assert w.retry_after(31.0, 11) == 0.0
    assert w.used(71.0) == 5 and w.used(91.5) == 0
    w.add(500.0, 3)  # a long gap clears everything
    assert w.used(500.0) == 3


def test_share_is_the_ceiling_and_bounds_the_fleet() -> None:
    assert share(60, 2) == 30 and share(61, 2) == 31 and share(5, 10) == 1
    assert share(60, 0) == 60
    for limit in (1, 7, 60, 1000):
        for n in (1, 2, 3, 7):
            assert n * share(limit, n) < limit + n


def key_event(record: KeyRecord) -> Event:
    return Event("put", KEYS.api_key(record.name), dump(record), 1)


def ring_with(*records: KeyRecord, file_keys: tuple[str, ...] = (),
              clock: Clock | None = None) -> KeyRing:
    ring = KeyRing(KEYS, file_keys, replica="me", clock=clock or Clock(),
                   wall=lambda: 1_700_000_000.0)
    for r in records:
        ring.apply(key_event(r))
    return ring


def test_keys_are_random_hashed_and_parsed() -> None:
    a, b = new_key(), new_key()
    assert a != b and a.startswith("aivmm-") and len(a) == 6 + 43
    record = KeyRecord("team-a", hash_key(a), a[:12], rpm=60)
    assert parse_key(dump(record)) == record
    assert a not in dump(record).decode()
    with pytest.raises(RecordError, match="hash"):
        parse_key(dump(KeyRecord("x", "sha256:zz", "")))
    with pytest.raises(RecordError, match="rpm"):
        parse_key(dump(KeyRecord("x", hash_key(a), "", rpm=0)))


def test_ring_lookup_revoke_expiry_and_file_keys() -> None:
    secret = new_key()
    ring = ring_with()
    assert not ring.enabled and ring.allows(None)
    on: list[bool] = []
    ring.on_enabled = on.append
    ring.apply(key_event(KeyRecord("a", hash_key(secret), "")))
    assert ring.enabled and on == [True]
    assert not ring.allows(None) and not ring.allows("Bearer nope")
    key = ring.identify(f"Bearer {secret}")
    assert key is not None and key.name == "a"
    ring.apply(key_event(KeyRecord("a", hash_key(secret), "", revoked=True)))
    assert ring.identify(f"Bearer {secret}") is None and ring.enabled  # still on
    ring.apply(key_event(KeyRecord("a", hash_key(secret), "", expires_at=1_600_000_000.0)))
    assert ring.identify(f"Bearer {secret}") is None
    ring.apply(Event("delete", KEYS.api_key("a"), b"", 2))
    assert not ring.enabled and on == [True, False]
    # Config-file keys: unlimited operators, named config-N; a snapshot keeps them.
    ring = ring_with(file_keys=("k1", "sha256:" + hash_key("k2")[7:]))
    ring.apply(Reset(Snapshot(5, [])))
    k1, k2 = ring.identify("Bearer k1"), ring.identify("bearer k2")
    assert k1 is not None and k2 is not None and (k1.name, k2.name) == ("config-1", "config-2")
    assert k1.operator and k1.rpm is None and ring.enabled


def test_limits_take_this_replicas_share() -> None:
    secret, clock = new_key(), Clock(1000.0)
    ring = ring_with(KeyRecord("a", hash_key(secret), "", models=["m1"], rpm=10,
                               max_parallel=3), clock=clock)
    key = ring.identify(f"Bearer {secret}")
    assert key is not None
    assert ring.forbidden(key, "m1") is None
    refused = ring.forbidden(key, "m2")
    assert refused is not None and refused.status == 403
    assert orjson.loads(refused.body)["error"]["type"] == "permission_error"  # type: ignore[arg-type]
    ring.apply_presence(Reset(Snapshot(1, [])))
    ring.apply_presence(Event("put", KEYS.scheduler("me"), b"{}", 1))
    ring.apply_presence(Event("put", KEYS.scheduler("other"), b"{}", 1))
    assert ring.replicas == 2
    got = [ring.limit(key, clock.t) for _ in range(6)]
    assert [r is None for r in got] == [True] * 5 + [False]  # ceil(10 / 2)
    last = got[-1]
    assert last is not None and last.status == 429 and last.headers["Retry-After"] == "61"
    body = orjson.loads(last.body)  # type: ignore[arg-type]
    assert body["error"]["type"] == "rate_limit_error"
    assert body["error"]["code"] == "rate_limit_exceeded"
    ring.apply_presence(Event("delete", KEYS.scheduler("other"), b"", 2))
    assert ring.replicas == 1 and ring.limit(key, clock.t) is None  # the whole 10 now
    # Parallel: ceil(3 / 1) in flight at once.
    clock.t += 100
    key.inflight = 3
    refused = ring.limit(key, clock.t)
    assert refused is not None and refused.headers["Retry-After"] == "1"
    assert key.counts.rate_limited == 2


def test_tokens_per_minute_are_charged_from_usage() -> None:
    secret, clock = new_key(), Clock(50.0)
    ring = ring_with(KeyRecord("a", hash_key(secret), "", tpm=100), clock=clock)
    key = ring.identify(f"Bearer {secret}")
    assert key is not None
    tap = Tap(0.0)
    tap.first_byte(0.1, "n/b")
    tap.chunk(b'{"usage": {"prompt_tokens": 40, "completion_tokens": 70}}')
    assert ring.limit(key, clock.t) is None
    ring.account(key, 200, tap, clock.t)
    assert (key.counts.prompt_tokens, key.counts.completion_tokens) == (40, 70)
    refused = ring.limit(key, clock.t + 1)
    assert refused is not None and refused.status == 429
    assert ring.limit(key, clock.t + 61) is None
    # A stream: the usage chunk.
    stream = Tap(0.0)
    stream.first_byte(0.1, "n/b")
    stream.chunk(b'data: {"choices": [{"delta": {"content": "x"}}]}\n\n')
    stream.chunk(b'data: {"choices": [], "usage": {"prompt_tokens": 5, '
                 b'"completion_tokens": 9, "total_tokens": 14}}\n\ndata: [DONE]\n\n')
    ring.account(key, 200, stream, clock.t + 61)
    assert (key.counts.prompt_tokens, key.counts.completion_tokens) == (45, 79)
    assert key.counts.requests == 2 and key.counts.errors == 0


def test_usage_is_asked_for_and_hidden_from_a_client_that_did_not_ask() -> None:
    plain = orjson.dumps({"model": "m", "messages": []})
    assert ask_for_usage(plain) is None
    asked = ask_for_usage(orjson.dumps({"model": "m", "stream": True,
                                        "stream_options": {"x": 1}}))
    assert asked is not None
    assert orjson.loads(asked)["stream_options"] == {"x": 1, "include_usage": True}
    assert ask_for_usage(orjson.dumps({"model": "m", "stream": True, "stream_options":
                                       {"include_usage": True}})) is None
    assert ask_for_usage(orjson.dumps({"model": "m", "stream": False})) is None
    events = [b'data: {"choices": [{"delta": {"content": "a"}}], "usage": null}\n\n',
              b'data: {"choices": [{"delta": {}, "finish_reason": "stop"}]}\n\n',
              b'data: {"id": "x", "choices": [], "usage": {"prompt_tokens": 1}}\n\n',
              b"data: [DONE]\n\n"]
    whole = b"".join(events)
    expected = events[0] + events[1] + events[3]
    for cut in range(1, len(whole)):  # however the stream is split into pieces
        hider = UsageHider()
        out = hider.feed(whole[:cut]) + hider.feed(whole[cut:]) + hider.flush()
        assert out == expected, cut
    crlf = whole.replace(b"\n\n", b"\r\n\r\n")
    hider = UsageHider()
    assert hider.feed(crlf) + hider.flush() == expected.replace(b"\n\n", b"\r\n\r\n")


def test_usage_sums_over_replicas_and_hours() -> None:
    hour = bucket_of(1_700_000_000)
    records = [KeyUsage("r1", hour - 3600, keys=[KeyCounts("a", 5, 1, 0, 50, 60)]),
               KeyUsage("r1", hour, keys=[KeyCounts("a", 2, 0, 1, 20, 30)]),
               KeyUsage("r2", hour, keys=[KeyCounts("a", 3, 0, 0, 30, 40),
                                          KeyCounts("b", 1, 1, 1, 0, 0)])]
    total = sum_usage(records)
    assert total["a"] == {"requests": 10, "errors": 1, "rate_limited": 1,
                          "prompt_tokens": 100, "completion_tokens": 130}
    recent = sum_usage(records, since=hour + 10)  # rounded down to the hour
    assert recent["a"]["requests"] == 5 and recent["b"]["requests"] == 1
    views = key_views([KeyRecord("a", hash_key("x"), "aivmm-abc", rpm=5)], total,
                      1_700_000_000.0, ["config-1"])
    assert [(v["name"], v["state"], v["source"]) for v in views] == [
        ("a", "active", "etcd"), ("config-1", "active", "config"), ("b", "deleted", "gone")]
    assert "hash" not in views[0]
