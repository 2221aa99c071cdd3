"""API keys and their usage as operators see them (docs/keys.md): each key's limits, and its
counts summed over the scheduler replicas' usage records. Shared by ``aivmmctl keys``/
``usage`` and the status page, so they agree; everything but :func:`read_keys` and
:func:`read_usage` is pure.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from common.keys import Keys
from common.records import KeyRecord, KeyUsage, RecordError, parse, parse_each, parse_key

# Usage records are per hour: ``{prefix}/key-usage/{bucket}/{replica}``.
USAGE_BUCKET_S = 3600
COUNTS = ("requests", "errors", "rate_limited", "prompt_tokens", "completion_tokens")


class PrefixReader(Protocol):
    async def get_prefix(self, prefix: str) -> Any: ...


def bucket_of(t: float) -> int:
    """The start (Unix seconds) of the usage bucket holding time ``t``."""
    return int(t) // USAGE_BUCKET_S * USAGE_BUCKET_S


@dataclass(slots=True)
class KeyRecords:
    keys: list[KeyRecord] = field(default_factory=list)
    skipped: int = 0


async def read_keys(store: PrefixReader, keys: Keys) -> KeyRecords:
    """Every key record, by name; unreadable ones counted in ``skipped``."""
    snap = await store.get_prefix(keys.api_keys)
    out = KeyRecords()
    out.keys, out.skipped = parse_each((kv.value for kv in snap.items), parse_key)
    out.keys.sort(key=lambda k: k.name)
    return out


async def read_usage(store: PrefixReader, keys: Keys, since: float | None = None
                     ) -> tuple[list[KeyUsage], int]:
    """The usage records of the buckets that end after ``since`` (all when None), and how
    many did not parse."""
    snap = await store.get_prefix(keys.key_usage)
    records: list[KeyUsage] = []
    skipped = 0
    first = None if since is None else bucket_of(since)
    for kv in snap.items:
        stamp = kv.key.removeprefix(keys.key_usage).partition("/")[0]
        if first is not None and stamp.isdigit() and int(stamp) < first:
            continue
        try:
            records.append(parse(kv.value, KeyUsage))
        except RecordError:
            skipped += 1
    return records, skipped


def sum_usage(records: Iterable[KeyUsage], since: float | None = None
              ) -> dict[str, dict[str, int]]:
    """Per key name, every count summed over replicas and buckets (the buckets that end
    after ``since``: ``since`` is rounded down to its hour)."""
    first = None if since is None else bucket_of(since)
    out: dict[str, dict[str, int]] = {}
    for r in records:
        if first is not None and r.bucket < first:
            continue
        for c in r.keys:
            total = out.setdefault(c.name, dict.fromkeys(COUNTS, 0))
            for name in COUNTS:
                total[name] += getattr(c, name)
    return out


def replicas_of(records: Iterable[KeyUsage]) -> int:
    return len({r.replica for r in records})


def key_views(records: Iterable[KeyRecord], usage: dict[str, dict[str, int]], now: float,
              file_keys: Iterable[str] = ()) -> list[dict[str, Any]]:
    """One dict per key (etcd keys, then names of config-file keys, then names seen only
    in the usage): its limits, state and usage. Never the hash."""
    views = []
    seen = set()
    for k in records:
        seen.add(k.name)
        expired = k.expires_at is not None and k.expires_at <= now
        views.append({
            "name": k.name, "prefix": k.prefix, "models": list(k.models), "rpm": k.rpm,
            "tpm": k.tpm, "max_parallel": k.max_parallel, "expires_at": k.expires_at,
            "created_at": k.created_at, "operator": k.operator, "source": "etcd",
            "state": "revoked" if k.revoked else "expired" if expired else "active",
            "usage": usage.get(k.name, dict.fromkeys(COUNTS, 0))})
    extra = [n for n in file_keys if n not in seen]
    extra += sorted(n for n in usage if n not in seen and n not in extra)
    for name in extra:
        views.append({
            "name": name, "prefix": "", "models": [], "rpm": None, "tpm": None,
            "max_parallel": None, "expires_at": None, "created_at": None,
            "operator": name.startswith("config-"),
            "source": "config" if name.startswith("config-") else "gone",
            "state": "active" if name.startswith("config-") else "deleted",
            "usage": usage.get(name, dict.fromkeys(COUNTS, 0))})
    return views
