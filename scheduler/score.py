"""The score of a backend for one request, and the request's prefix key: pure functions.

What a choice weighs (docs/scheduler.md, "Routing", says why):

- **expected time of this request on the backend**: time to first token (peak-EWMA of
  streamed answers only) plus the answer's expected tokens times the backend's time per
  output token (learnt from streams). A backend that answers its first byte fast but decodes
  slowly is no longer chosen for long answers. A non-streamed request is weighed by the
  backend's non-streamed answer times, kept apart: their first byte is the end of generation,
  and mixed into time to first token they would make a backend look slow for streams.
  Idle, the time to first token decays towards the device's own speed (a floor learnt from
  its fastest answers per byte of prompt), not towards zero: an idle slow card must not look
  fast because it has been idle.
- **load**: that time times the queue the request would join, as a batching engine serves
  it: 1 + requests this replica sent there still waiting for their first token + the
  engine's own queue + ``DECODE_SHARE`` for each request already decoding (it shares the
  batch and slows each step a little, where the one-at-a-time model counted it in full and
  sent work to idle slow cards); times a penalty once the engine's KV cache is nearly full
  (it is about to queue or preempt).
- **candidates**: every usable backend of a pool of up to ``SCAN_ALL``, power of
  ``CHOICES`` random choices in a larger one; near-ties broken at random.
- **prefix locality**: a request's key is a hash of the opening of its prompt (chat: the
  messages up to and including the first user message; text: its first ``TEXT_KEY_CHARS``
  characters; none under ``MIN_KEY_CHARS``), which every later turn of the same conversation
  repeats. Its preferred
  backends are the first ones clockwise from the key on a consistent-hash ring of the model's
  backends: the ring depends only on the backends' keys, so every replica computes the same
  preference with no shared state, and a backend joining or leaving moves only its own share
  of keys. The preferred backend is taken unless its cost is more than ``LOCALITY_SLACK``
  (plus one request's time there) above that of the power-of-d-choices pick: a bounded
  load, so a hot key or a busy backend spills over to the cheaper one instead.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

# Candidates drawn at random per choice in a large pool (power of d choices; 2 is classic
# P2C).
CHOICES = 4
# A pool of up to this many usable backends is weighed in full: a random draw of a few would
# now and then hold only slow devices, and the few costs are cheap to compute.
SCAN_ALL = 16
# Costs within this share of the lowest count as a tie, broken at random: replicas with the
# same view spread their picks over like backends instead of herding onto one.
NEAR_TIE = 0.1
# What a request past its first token (decoding in the engine's batch) adds to the cost of
# the next one there, against 1 for a request still waiting for its first token: a batching
# engine decodes its running sequences together, each adding a few per cent to a step, but
# prefills (or, on a server of one slot, serves) the waiting ones in turn.
DECODE_SHARE = 0.1
# Points per backend on the ring: enough for an even share of keys with a few backends.
RING_POINTS = 16
# The preferred backend is taken while its cost is at most this much above the P2C pick's.
LOCALITY_SLACK = 0.5
# Ring steps walked looking for a usable preferred backend before giving up on locality.
RING_WALK = 32
# An opening shorter than this has no key: a few blocks of prefix save next to nothing, and
# such requests are better spread by load alone.
MIN_KEY_CHARS = 256
# The opening of a text prompt that keys it.
TEXT_KEY_CHARS = 1024
# Longest opening hashed for a chat key (a longer system prompt keys on its start alone).
MAX_KEY_CHARS = 32768
# Answer length assumed before any stream was measured and when a request sets no limit.
DEFAULT_OUTPUT_TOKENS = 256
# Bodies up to this size cost the same time to first token (the step, the queue); above it,
# time to first token grows with the prompt.
SIZE_FLOOR = 2048
# KV-cache usage from which a backend's cost grows (x2 at 100 %).
KV_SOFT = 0.9


@dataclass(frozen=True, slots=True)
class Hint:
    """What the body says that matters to a choice."""

    key: int | None = None      # prefix key (None: no locality)
    max_tokens: int | None = None
    stream: bool = False
    size: int = 0               # body bytes: the prompt's size, for its prefill time


def stable_hash(data: bytes) -> int:
    """A 64-bit hash that is the same in every process (Python's ``hash`` is salted)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def prefix_hash(text: str) -> int:
    """A request's prefix key: a 64-bit position on the ring, the same in every process.
    CRC-32 spread over 64 bits by a Fibonacci multiplier, not blake2b: a third of the time
    for a long system prompt, and a collision only shares a preferred backend."""
    return (zlib.crc32(text.encode()) * 0x9E3779B97F4A7C15) & 0xFFFF_FFFF_FFFF_FFFF


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content
                       if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def prefix_text(data: dict[str, Any]) -> str | None:
    """The opening of the request's prompt that later turns repeat, or None."""
    messages = data.get("messages")
    if isinstance(messages, list) and messages:
        parts: list[str] = []
        size = 0
        for m in messages:
            if not isinstance(m, dict):
                return None
            text = _text(m.get("content"))
            parts.append(str(m.get("role", "")))
            parts.append(text)
            size += len(text)
            if m.get("role") == "user" or size >= MAX_KEY_CHARS:
                break
        return "\x00".join(parts)[:MAX_KEY_CHARS]
    prompt = data.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str) and prompt:
        return prompt[:TEXT_KEY_CHARS]
    return None


def request_hint(body: bytes) -> Hint:
    """The :class:`Hint` of a request body (an empty one for anything unusable)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return Hint(size=len(body))
    if not isinstance(data, dict):
        return Hint(size=len(body))
    return hint_of(data, len(body))


def hint_of(data: dict[str, Any], size: int) -> Hint:
    """The :class:`Hint` of a request already parsed (``size``: its body's bytes)."""
    text = prefix_text(data)
    limit = data.get("max_completion_tokens") or data.get("max_tokens")
    return Hint(key=prefix_hash(text) if text and len(text) >= MIN_KEY_CHARS else None,
                max_tokens=limit if isinstance(limit, int) and limit > 0 else None,
                stream=data.get("stream") is True, size=size)


# -- the ring --------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1 << 16)
def ring_points(key: str) -> tuple[int, ...]:
    """A backend's points on the ring (from its key alone)."""
    return tuple(stable_hash(f"{key}#{i}".encode()) for i in range(RING_POINTS))


def build_ring(keys: Sequence[str]) -> tuple[list[int], list[int]]:
    """(sorted points, index into ``keys`` of each point's backend)."""
    pairs = sorted((p, i) for i, k in enumerate(keys) for p in ring_points(k))
    return [p for p, _ in pairs], [i for _, i in pairs]


def ring_walk(points: list[int], owners: list[int], key: int,
              limit: int = RING_WALK) -> Iterator[int]:
    """Indices of backends clockwise from ``key``, each once, at most ``limit`` steps."""
    n = len(points)
    if not n:
        return
    start = bisect.bisect_left(points, key)
    seen: set[int] = set()
    for step in range(min(limit, n)):
        owner = owners[(start + step) % n]
        if owner not in seen:
            seen.add(owner)
            yield owner


# -- the cost --------------------------------------------------------------------------------

def size_units(size: int) -> float:
    """The prompt size a time to first token is counted per: the body's bytes, at least the
    floor of fixed costs (the floor for an unknown size)."""
    return float(max(size, SIZE_FLOOR))


def size_factor(size: int, sampled_size: float) -> float:
    """How much longer than its sampled requests' a request of ``size`` bytes takes to its
    first token: prefill is proportional to the prompt, above a floor of fixed costs."""
    if not size or not sampled_size:
        return 1.0
    return min(max(max(size, SIZE_FLOOR) / sampled_size, 0.1), 10.0)


def request_seconds(ttft_s: float, tpot_s: float, whole_s: float | None, tokens: float,
                    stream: bool) -> float:
    """Expected time of one request on a backend, before load is counted."""
    if not stream and whole_s is not None:
        return whole_s
    return ttft_s + tokens * tpot_s


def kv_factor(kv: float) -> float:
    """1 below ``KV_SOFT`` usage, rising linearly to 2 at a full cache."""
    if kv <= KV_SOFT:
        return 1.0
    return 1.0 + (min(kv, 1.0) - KV_SOFT) / (1.0 - KV_SOFT)


def cost(seconds: float, pending: int, decoding: int, waiting: int, kv: float) -> float:
    """A backend's cost for a request: its expected time times the queue it would join, in
    which requests still waiting for their first token (``pending``) and the engine's own
    queue count in full and requests already decoding count ``DECODE_SHARE`` each."""
    return seconds * (1 + pending + waiting + DECODE_SHARE * decoding) * kv_factor(kv)


def within_slack(preferred: float, best: float, unit: float,
                 slack: float = LOCALITY_SLACK) -> bool:
    """Whether the preferred backend's cost is close enough to the best alternative's: at
    most ``slack`` above it plus ``unit``, one request's time on the best alternative (so one
    request in flight on a like backend never outweighs a cached prefix, but an idle slow
    backend does not take a request a fast one would finish far sooner)."""
    return preferred <= best * (1.0 + slack) + unit
