"""Client API keys (docs/keys.md): who may call which model, how fast, and what they used.

Keys live in etcd (``{prefix}/keys/{name}``, :class:`KeyRecord`, only a SHA-256 of the key)
and in the scheduler's config file (``api_keys``, ``api_keys_file``: unlimited operator
keys). :class:`KeyRing` follows the etcd records and the live scheduler replicas
(``{prefix}/schedulers/``), looks a presented key up by its digest, and enforces its limits
with this replica's **share** of each: ``ceil(limit / live replicas)``, so no shared counter
sits on the request path. :class:`SlidingWindow` is the pure counter behind requests and
tokens per minute. The counts per key go to Prometheus (:class:`KeyCollector`) and, every
few seconds, to ``{prefix}/key-usage/{hour}/{replica}`` (:class:`UsagePublisher`).

Why a plain SHA-256 and no slow KDF: the keys are 32 random bytes, so there is nothing to
guess; a slow KDF protects low-entropy passwords from dictionary attacks, and would cost
milliseconds of CPU on every request. A digest lookup in a dict is not a timing oracle
worth having either: it could at most tell an attacker about the digest of the key they
sent, never about a stored key.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any, Protocol

import orjson
from aiohttp import web
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from common.keys import Keys
from common.keyview import USAGE_BUCKET_S, bucket_of, key_views, read_usage, sum_usage
from common.records import (
    KeyCounts,
    KeyRecord,
    KeyUsage,
    RecordError,
    SchedulerPresence,
    dump,
    parse_key,
)
from common.store import Event, LeaseLost, Reset, StoreError
from scheduler.auth import digest_of
from scheduler.errors import error_response
from scheduler.request import REQUEST_DATA
from scheduler.tap import TAP, Tap

log = logging.getLogger(__name__)

KEY_PREFIX = "aivmm-"
SHOWN_PREFIX = 12  # characters of a key kept in its record, to recognise it
WINDOW_SPAN = 61  # one-second buckets: the window is between 60 and 61 s, never less
PRESENCE_TTL = 5
USAGE_SHOWN_S = 86400.0  # the status page shows the last day's usage
VIEW_CACHE_S = 3.0

_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')
_NO_CHOICES = re.compile(rb'"choices"\s*:\s*\[\s*\]')
_EVENT_END = re.compile(rb"(?<=\n\n)|(?<=\r\n\r\n)")


def new_key() -> str:
    """A fresh client key: ``aivmm-`` and 32 random bytes, URL-safe base64 (43 characters)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """What a key record stores: ``sha256:`` and the key's SHA-256 in hex."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


# -- the pure parts ------------------------------------------------------------------------------

class SlidingWindow:
    """Amounts (requests, tokens) added over the last minute, in one-second buckets.

    A 61st bucket is kept, so the sum covers between 60 and 61 s: whatever the timing, no
    60-second interval holds more than the limit admitted against it.
    """

    __slots__ = ("_buckets", "_second", "total")

    def __init__(self) -> None:
        self._buckets = [0] * WINDOW_SPAN
        self._second = 0
        self.total = 0

    def _advance(self, second: int) -> None:
        gap = second - self._second
        if gap <= 0:
            return
        if gap >= WINDOW_SPAN:
            self._buckets = [0] * WINDOW_SPAN
            self.total = 0
        else:
            b = self._buckets
            for s in range(self._second + 1, second + 1):
                i = s % WINDOW_SPAN
                self.total -= b[i]
                b[i] = 0
        self._second = second

    def used(self, now: float) -> int:
        """The amount in the window at ``now``."""
        self._advance(int(now))
        return self.total

    def add(self, now: float, amount: int) -> None:
        sec = int(now)
        self._advance(sec)
        self._buckets[sec % WINDOW_SPAN] += amount
        self.total += amount

    def retry_after(self, now: float, limit: int) -> float:
        """Seconds from ``now`` until the window holds less than ``limit``."""
        sec = int(now)
        self._advance(sec)
        left = self.total
        if left < limit:
            return 0.0
        for k in range(WINDOW_SPAN):
            left -= self._buckets[(sec - WINDOW_SPAN + 1 + k) % WINDOW_SPAN]
            if left < limit:
                # That bucket leaves the window when the current second is its own + 61.
                return max(sec + k + 1 - now, 0.0)
        return float(WINDOW_SPAN)


def share(limit: int, replicas: int) -> int:
    """This replica's part of a limit enforced by ``replicas`` replicas: ceil(limit / n).
    The fleet admits at most n * ceil(limit / n) < limit + n."""
    return -(-limit // max(1, replicas))


def ask_for_usage(body: bytes, data: dict[str, Any] | None = None) -> bytes | None:
    """The body of a streamed request that does not ask for the usage chunk, changed to ask
    for it (``stream_options.include_usage``); None for any other body. ``data`` is the body
    already parsed, if it was."""
    if data is None:
        if b'"stream"' not in body:
            return None
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
    if not isinstance(data, dict) or data.get("stream") is not True:
        return None
    options = data.get("stream_options")
    if options is None:
        options = {}
    if not isinstance(options, dict) or options.get("include_usage"):
        return None
    data["stream_options"] = {**options, "include_usage": True}
    return orjson.dumps(data)


class UsageHider:
    """Takes the usage-only event (``"choices": []`` with a ``usage`` object) out of an SSE
    stream whose client did not ask for it. Events are passed on whole, as they complete."""

    __slots__ = ("_pending",)

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, data: bytes) -> bytes:
        buf = self._pending + data if self._pending else data
        cut = max(buf.rfind(b"\n\n") + 2, buf.rfind(b"\r\n\r\n") + 4, 0)
        self._pending = buf[cut:]
        done = buf[:cut]
        if b'"usage"' not in done:
            return done
        return b"".join(e for e in _EVENT_END.split(done)
                        if not (_USAGE_OBJECT.search(e) and _NO_CHOICES.search(e)))

    def flush(self) -> bytes:
        rest, self._pending = self._pending, b""
        if _USAGE_OBJECT.search(rest) and _NO_CHOICES.search(rest):
            return b""
        return rest


HIDE_USAGE: web.RequestKey[UsageHider] = web.RequestKey("aivmm_hide_usage", UsageHider)


# -- the keys ------------------------------------------------------------------------------------

class KeyState:
    """One usable key as a replica holds it: the record's terms and this replica's counters."""

    __slots__ = ("counts", "digest", "expires_at", "inflight", "max_parallel", "models", "name",
                 "operator", "requests", "revoked", "rpm", "tokens", "tpm")

    def __init__(self, name: str, digest: bytes, counts: KeyCounts) -> None:
        self.name = name
        self.digest = digest
        self.models: frozenset[str] | None = None  # None: every model
        self.rpm: int | None = None
        self.tpm: int | None = None
        self.max_parallel: int | None = None
        self.expires_at: float | None = None
        self.revoked = False
        self.operator = True
        self.inflight = 0
        self.requests = SlidingWindow()
        self.tokens = SlidingWindow()
        self.counts = counts

    def update(self, r: KeyRecord) -> None:
        self.models = frozenset(r.models) if r.models else None
        self.rpm, self.tpm, self.max_parallel = r.rpm, r.tpm, r.max_parallel
        self.expires_at, self.revoked, self.operator = r.expires_at, r.revoked, r.operator


class SyncSource(Protocol):
    def sync_prefix(self, prefix: str) -> AsyncIterator[Reset | Event]: ...


class KeyRing:
    """Every key this replica accepts, and their limits and counts.

    With no key at all (none in the config, no record in etcd) every request passes. A key
    record of any kind, revoked ones included, turns checking on: revoking the last key
    does not open the door.
    """

    def __init__(self, keys: Keys, file_keys: Iterable[str] = (), *, replica: str = "",
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time,
                 on_bad_record: Callable[[], None] = lambda: None,
                 on_enabled: Callable[[bool], None] = lambda _on: None) -> None:
        self.keys = keys
        self.replica = replica
        self.clock = clock
        self.wall = wall
        self.on_bad_record = on_bad_record
        self.on_enabled = on_enabled
        # Lifetime counts by key name; they outlive a key's record (usage is kept).
        self.counts: dict[str, KeyCounts] = {}
        self.records: dict[str, KeyRecord] = {}  # etcd's, by name
        self.states: dict[str, KeyState] = {}  # usable keys by name, file keys included
        self._by_digest: dict[bytes, KeyState] = {}
        self.file_names: list[str] = []
        for i, key in enumerate(dict.fromkeys(file_keys), start=1):
            name = f"config-{i}"
            self.file_names.append(name)
            self._add(KeyState(name, digest_of(key), self._counts(name)))
        self.presence: set[str] = set()
        self.enabled = bool(self.states)
        self._view: tuple[float, list[dict[str, Any]]] | None = None

    # -- what etcd says ----------------------------------------------------------------------

    def _counts(self, name: str) -> KeyCounts:
        c = self.counts.get(name)
        if c is None:
            c = self.counts[name] = KeyCounts(name)
        return c

    def _add(self, state: KeyState) -> None:
        self.states[state.name] = state
        self._by_digest[state.digest] = state

    def _remove(self, name: str) -> None:
        state = self.states.pop(name, None)
        if state is not None and self._by_digest.get(state.digest) is state:
            del self._by_digest[state.digest]

    def _put(self, key: str, value: bytes) -> None:
        name = key.removeprefix(self.keys.api_keys)
        try:
            record = parse_key(value)
            if record.name != name:
                raise RecordError("field 'name': differs from the key's name")
        except RecordError as err:
            log.warning("skipping unusable key record", extra={"key": key, "error": str(err)})
            self._drop(name)
            self.records[name] = KeyRecord(name, "", "", revoked=True)  # still turns keys on
            self.on_bad_record()
            return
        self.records[name] = record
        if name in self.file_names:
            log.warning("key record named like a config-file key ignored", extra={"key": key})
            return
        digest = bytes.fromhex(record.hash.removeprefix("sha256:"))
        state = self.states.get(name)
        if state is None or state.digest != digest:
            self._drop(name)
            state = KeyState(name, digest, self._counts(name))
            self._add(state)
        state.update(record)

    def _drop(self, name: str) -> None:
        if name not in self.file_names:
            self._remove(name)

    def apply(self, item: Reset | Event) -> None:
        """A change of ``{prefix}/keys/`` (a snapshot, or one key written or deleted)."""
        if isinstance(item, Reset):
            for name in list(self.records):
                self._drop(name)
            self.records.clear()
            for kv in item.snapshot.items:
                self._put(kv.key, kv.value)
        elif item.kind == "delete":
            name = item.key.removeprefix(self.keys.api_keys)
            self.records.pop(name, None)
            self._drop(name)
        else:
            self._put(item.key, item.value)
        self._view = None
        on = bool(self.file_names) or bool(self.records)
        if on != self.enabled:
            self.enabled = on
            self.on_enabled(on)

    def apply_presence(self, item: Reset | Event) -> None:
        """A change of ``{prefix}/schedulers/``: the live replicas."""
        if isinstance(item, Reset):
            self.presence = {kv.key.removeprefix(self.keys.schedulers)
                             for kv in item.snapshot.items}
        elif item.kind == "delete":
            self.presence.discard(item.key.removeprefix(self.keys.schedulers))
        else:
            self.presence.add(item.key.removeprefix(self.keys.schedulers))

    @property
    def replicas(self) -> int:
        """Live scheduler replicas, this one always included."""
        n = len(self.presence)
        return n if self.replica in self.presence else n + 1

    async def run(self, source: SyncSource) -> None:
        """Follow the key records forever (an eternal task)."""
        async for item in source.sync_prefix(self.keys.api_keys):
            self.apply(item)
        raise RuntimeError("the etcd key watch ended")

    async def run_presence(self, source: SyncSource) -> None:
        """Follow the live replicas forever (an eternal task)."""
        async for item in source.sync_prefix(self.keys.schedulers):
            self.apply_presence(item)
        raise RuntimeError("the etcd scheduler presence watch ended")

    # -- a request ---------------------------------------------------------------------------

    def identify(self, authorization: str | None) -> KeyState | None:
        """The key the header carries, if it is a usable one (not revoked, not expired)."""
        if not authorization or authorization[:7].lower() != "bearer ":
            return None
        digest = hashlib.sha256(authorization[7:].strip().encode()).digest()
        state = self._by_digest.get(digest)
        if state is None or state.revoked:
            return None
        if state.expires_at is not None and self.wall() >= state.expires_at:
            return None
        return state

    def allows(self, authorization: str | None) -> bool:
        """Whether the header may pass: anything while no key exists, else a usable key."""
        return not self.enabled or self.identify(authorization) is not None

    def forbidden(self, key: KeyState, model: str) -> web.Response | None:
        """403 when ``model`` is not one of the key's models."""
        if key.models is None or model in key.models:
            return None
        return error_response(
            403, f"The API key '{key.name}' may not use the model '{model}'",
            "model_not_allowed", param="model")

    def limit(self, key: KeyState, now: float) -> web.Response | None:
        """429 when this replica's share of a limit is used up; else the request is taken
        (counted against requests per minute)."""
        n = self.replicas
        if key.max_parallel is not None:
            part = share(key.max_parallel, n)
            if key.inflight >= part:
                return self._refuse(key, "parallel requests", key.max_parallel, part, n, 1.0)
        if key.rpm is not None:
            part = share(key.rpm, n)
            if key.requests.used(now) >= part:
                return self._refuse(key, "requests per minute (RPM)", key.rpm, part, n,
                                    key.requests.retry_after(now, part))
        if key.tpm is not None:
            part = share(key.tpm, n)
            if key.tokens.used(now) >= part:
                return self._refuse(key, "tokens per minute (TPM)", key.tpm, part, n,
                                    key.tokens.retry_after(now, part))
        if key.rpm is not None:
            key.requests.add(now, 1)
        return None

    def _refuse(self, key: KeyState, what: str, limit: int, part: int, n: int,
                wait: float) -> web.Response:
        key.counts.rate_limited += 1
        seconds = max(1, math.ceil(wait))
        return error_response(
            429, f"Rate limit reached for API key '{key.name}' on {what}: limit {limit} "
            f"over {n} scheduler replica(s), {part} on this one. Please try again in "
            f"{seconds}s.", "rate_limit_exceeded", headers={"Retry-After": str(seconds)})

    def account(self, key: KeyState, status: int, tap: Tap | None, now: float) -> None:
        """Count one answered request of ``key``; its tokens go against its TPM."""
        c = key.counts
        c.requests += 1
        if status >= 400 or (tap is not None and tap.broken):
            c.errors += 1
        if tap is None or tap.first_at is None:
            return
        prompt, completion = tap.prompt_tokens(), tap.output_tokens()
        c.prompt_tokens += prompt
        c.completion_tokens += completion
        if key.tpm is not None and prompt + completion:
            key.tokens.add(now, prompt + completion)

    async def serve(self, request: web.Request, key: KeyState, body: bytes,
                    forward: Callable[[bytes], Any]) -> web.StreamResponse:
        """Forward an admitted request of ``key`` within its limits, and count it."""
        now = self.clock()
        refused = self.limit(key, now)
        if refused is not None:
            self.account(key, refused.status, None, now)
            return refused
        asked = ask_for_usage(body, request.get(REQUEST_DATA))
        if asked is not None:
            # Tokens of a stream come from its usage chunk; the client did not ask for it,
            # so it is taken out of what the client gets.
            body = asked
            request[HIDE_USAGE] = UsageHider()
        key.inflight += 1
        status = 499
        try:
            resp: web.StreamResponse = await forward(body)
            status = resp.status
            return resp
        finally:
            key.inflight -= 1
            self.account(key, status, request.get(TAP), self.clock())

    def rejected(self, request: web.Request, status: int) -> None:
        """An answer given before forwarding (400, 403, 404, 413, 503) to a known key."""
        key = request.get(CALLER)
        if key is not None:
            self.account(key, status, None, self.clock())

    # -- the operator's view -----------------------------------------------------------------

    async def view(self, store: Any) -> list[dict[str, Any]]:
        """Every key with its limits and its last day's usage over all replicas (read from
        the usage records, cached a few seconds), and this replica's requests in flight."""
        mono = time.monotonic()
        if self._view is not None and mono - self._view[0] < VIEW_CACHE_S:
            return self._view[1]
        since = self.wall() - USAGE_SHOWN_S
        try:
            records, _ = await asyncio.wait_for(read_usage(store, self.keys, since), 2.0)
        except (StoreError, TimeoutError, OSError):
            records = []
        views = key_views(sorted(self.records.values(), key=lambda r: r.name),
                          sum_usage(records, since), self.wall(), self.file_names)
        for v in views:
            state = self.states.get(v["name"])
            v["inflight"] = 0 if state is None else state.inflight
        self._view = (mono, views)
        return views


CALLER: web.RequestKey[KeyState] = web.RequestKey("aivmm_caller", KeyState)


# -- metrics -------------------------------------------------------------------------------------

class KeyCollector:
    """Per-key counters for Prometheus, made at scrape time from the plain counts (the request
    path only adds to integers). Labelled by the key's name, never the key."""

    def __init__(self, ring: KeyRing) -> None:
        self.ring = ring

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        ring = self.ring
        families = {
            "requests": CounterMetricFamily(
                "aivmm_key_requests", "Requests made with the key (answered)", labels=["key"]),
            "errors": CounterMetricFamily(
                "aivmm_key_errors", "Of those, answers with status >= 400 or a broken stream",
                labels=["key"]),
            "rate_limited": CounterMetricFamily(
                "aivmm_key_rate_limited", "Of those, 429s for the key's limits",
                labels=["key"]),
            "prompt_tokens": CounterMetricFamily(
                "aivmm_key_prompt_tokens", "Prompt tokens, from the answers' usage",
                labels=["key"]),
            "completion_tokens": CounterMetricFamily(
                "aivmm_key_completion_tokens", "Completion tokens, from the answers' usage",
                labels=["key"]),
        }
        for name, c in ring.counts.items():
            if c.requests:
                for field_name, family in families.items():
                    family.add_metric([name], getattr(c, field_name))
        yield from families.values()
        inflight = GaugeMetricFamily("aivmm_key_inflight",
                                     "Requests of the key in flight at this replica",
                                     labels=["key"])
        for state in ring.states.values():
            if state.inflight:
                inflight.add_metric([state.name], state.inflight)
        yield inflight
        yield GaugeMetricFamily("aivmm_scheduler_replicas",
                                "Live scheduler replicas this one counts for key limit shares",
                                value=ring.replicas)


# -- publishing ----------------------------------------------------------------------------------

class UsageStore(Protocol):
    async def put(self, key: str, value: bytes, *, lease: int | None = None) -> int: ...

    async def delete_prefix(self, prefix: str) -> int: ...


class UsagePublisher:
    """Writes this replica's per-key counts of the current hour to
    ``{prefix}/key-usage/{hour}/{replica}`` every ``interval`` seconds when they changed (no
    lease: usage outlives the replica), and deletes hours past ``keep_days``."""

    def __init__(self, store: UsageStore, ring: KeyRing, replica: str, *,
                 interval: float = 2.0, keep_days: float = 90.0,
                 wall: Callable[[], float] = time.time) -> None:
        self.store = store
        self.ring = ring
        self.replica = replica
        self.interval = interval
        self.keep_days = keep_days
        self.wall = wall
        self.bucket = bucket_of(wall())
        self._base: dict[str, tuple[int, ...]] = {}  # lifetime counts when the hour began
        self._written: list[KeyCounts] | None = None
        self.writes = 0

    def _now_counts(self) -> dict[str, tuple[int, ...]]:
        return {n: (c.requests, c.errors, c.rate_limited, c.prompt_tokens, c.completion_tokens)
                for n, c in self.ring.counts.items()}

    def record(self, counts: dict[str, tuple[int, ...]]) -> KeyUsage:
        """The current hour's record from the lifetime ``counts``."""
        out = []
        for name, now in sorted(counts.items()):
            base = self._base.get(name, (0, 0, 0, 0, 0))
            diff = tuple(a - b for a, b in zip(now, base, strict=True))
            if any(diff):
                out.append(KeyCounts(name, *diff))
        return KeyUsage(replica=self.replica, bucket=self.bucket, updated_at=self.wall(),
                        keys=out)

    async def flush(self) -> None:
        """Write the record if it changed; at an hour's turn, close the old one first."""
        counts = self._now_counts()
        bucket = bucket_of(self.wall())
        if bucket != self.bucket:
            old = self.record(counts)
            if old.keys and old.keys != self._written:
                await self.store.put(self.ring.keys.key_usage_of(self.bucket, self.replica),
                                     dump(old))
                self.writes += 1
            self.bucket, self._base, self._written = bucket, counts, None
            await self.prune()
            return
        rec = self.record(counts)
        if rec.keys and rec.keys != self._written:
            await self.store.put(self.ring.keys.key_usage_of(self.bucket, self.replica),
                                 dump(rec))
            self._written = rec.keys
            self.writes += 1

    async def prune(self) -> None:
        """Delete the hours that fell out of ``keep_days`` (a day of them, so hours no replica
        was up to delete go too)."""
        last = self.bucket - int(self.keep_days * 86400) // USAGE_BUCKET_S * USAGE_BUCKET_S
        for k in range(24):
            await self.store.delete_prefix(
                self.ring.keys.key_usage_bucket(last - k * USAGE_BUCKET_S))

    async def run(self) -> None:
        """The eternal task; a last write on the way out."""
        try:
            while True:
                await asyncio.sleep(self.interval)
                try:
                    await self.flush()
                except StoreError as err:
                    log.info("key usage not written yet: %s", err)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.flush(), 2.0)


class PresenceStore(Protocol):
    async def grant_lease(self, ttl: int) -> int: ...

    async def keep_alive(self, lease_id: int) -> int: ...

    async def revoke_lease(self, lease_id: int) -> None: ...

    async def put(self, key: str, value: bytes, *, lease: int | None = None) -> int: ...


async def publish_presence(store: PresenceStore, keys: Keys, replica: str, listen: str) -> None:
    """Keep ``{prefix}/schedulers/{replica}`` under a lease of PRESENCE_TTL seconds while
    this replica runs (an eternal task); revoked on the way out, so the other replicas take
    its share back at once."""
    record = dump(SchedulerPresence(replica=replica, listen=listen, started_at=time.time()))
    lease: int | None = None
    try:
        while True:
            try:
                if lease is None:
                    lease = await store.grant_lease(PRESENCE_TTL)
                    await store.put(keys.scheduler(replica), record, lease=lease)
                else:
                    await store.keep_alive(lease)
            except LeaseLost:
                lease = None
                continue
            except StoreError as err:
                log.info("scheduler presence not written: %s", err)
                lease = None
            await asyncio.sleep(PRESENCE_TTL / 4)
    finally:
        if lease is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(store.revoke_lease(lease), 2.0)
