"""The audit trail: who changed what, when, and why (docs/operations.md: Audit trail).

Entries are :class:`AuditEntry` records under ``{prefix}/audit/``, keyed by time. aivmmctl
writes its entry in the same transaction as the change (:func:`audit_put` gives the put);
the placer and the agents record what they did on their own. Everything here but
:class:`AuditWriter` is pure: building entries, the JSON of old and new values, filtering,
and which entries retention removes (:func:`to_compact`).
"""

from __future__ import annotations

import asyncio
import datetime
import getpass
import logging
import os
import re
import secrets
import socket
import time
from collections.abc import Iterable, Sequence
from typing import Any

import orjson

from common.backoff import Backoff
from common.keys import Keys
from common.records import AuditEntry, AuditSource, RecordError, parse_audit, to_dict
from common.store import StoreClosed, StoreError, StoreUnavailable
from common.store_api import Store

log = logging.getLogger(__name__)

# Environment variables whose values an audit entry never shows (tokens, passwords).
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSW|KEY|CREDENTIAL|AUTH", re.IGNORECASE)
REDACTED = "<redacted>"
# Fields that change on every write and say nothing about what changed.
_STAMPS = frozenset({"created_at", "updated_at", "requested_at", "schema"})
_SINCE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def actor() -> str:
    """Who runs this process: ``user@host`` (the etcd user, once etcd auth exists)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a uid without a passwd entry (some containers)
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def _redact(value: Any) -> Any:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if k == "env" and isinstance(v, dict):
                out[k] = {n: REDACTED if SECRET_NAME.search(n) else x for n, x in v.items()}
            else:
                out[k] = _redact(v)
        return out
    if isinstance(value, list):
        return [_redact(v) for v in value]
    return value


def value_text(value: Any) -> str | None:
    """Compact JSON of a record (or plain value) for ``old``/``new``; None stays None.

    Secret-looking environment values are shown as ``<redacted>``, never as they are.
    """
    if value is None:
        return None
    plain = to_dict(value) if hasattr(value, "__dataclass_fields__") else value
    return orjson.dumps(_redact(plain), option=orjson.OPT_SORT_KEYS).decode()


def changed_fields(old: Any, new: Any) -> str:
    """``replicas 1 -> 3, model a -> b``: the fields two records differ in (stamps aside)."""
    a = to_dict(old) if hasattr(old, "__dataclass_fields__") else dict(old)
    b = to_dict(new) if hasattr(new, "__dataclass_fields__") else dict(new)
    parts = []
    for name in sorted(set(a) | set(b)):
        if name in _STAMPS or a.get(name) == b.get(name):
            continue
        if name == "env":  # names only: a value may be a token under an innocent name
            x, y = a.get(name) or {}, b.get(name) or {}
            names = sorted(n for n in set(x) | set(y) if x.get(n) != y.get(n))
            parts.append(f"env {', '.join(names)} changed")
            continue
        parts.append(f"{name} {_short(a.get(name))} -> {_short(b.get(name))}")
    return ", ".join(parts)


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else orjson.dumps(value).decode()
    return text if len(text) <= 60 else text[:57] + "..."


def entry(source: AuditSource, verb: str, target: str, *, old: Any = None, new: Any = None,
          detail: str = "", who: str | None = None, now: float | None = None) -> AuditEntry:
    """An entry for a change; ``old``/``new`` are records or values (None: absent)."""
    return AuditEntry(time=time.time() if now is None else now,
                      actor=actor() if who is None else who, source=source, verb=verb,
                      target=target, old=value_text(old), new=value_text(new), detail=detail)


def audit_put(keys: Keys, e: AuditEntry) -> tuple[str, bytes]:
    """The (key, value) to put for ``e``, in the caller's transaction."""
    key = keys.audit_entry(int(e.time * 1_000_000_000), secrets.token_hex(3))
    return key, orjson.dumps(e)


# -- reading ----------------------------------------------------------------------------------

def parse_since(text: str, now: float) -> float:
    """Unix seconds from ``30m``, ``1h``, ``2d``, ``1w`` (ago) or an ISO date/time (local
    time unless it names its zone); raises ValueError naming what is expected."""
    m = _SINCE.match(text)
    if m:
        return now - float(m.group(1)) * _UNIT_S[m.group(2)]
    try:
        when = datetime.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"expected a duration such as 30m, 1h, 2d or an ISO date such as "
                         f"2024-05-01T12:00, got {text!r}") from None
    return when.timestamp()  # a naive time is taken as local time


def matches(e: AuditEntry, *, since: float | None = None, target: str | None = None) -> bool:
    """Whether ``e`` is at or after ``since`` and about ``target`` (a target ``n1`` also
    takes ``n1/<backend>``)."""
    if since is not None and e.time < since:
        return False
    return target is None or e.target == target or e.target.startswith(target + "/")


def parse_entries(items: Iterable[tuple[str, bytes]]) -> tuple[list[AuditEntry], int]:
    """The readable entries of (key, value) pairs, oldest first, and how many were not."""
    out: list[tuple[str, AuditEntry]] = []
    bad = 0
    for key, value in items:
        try:
            out.append((key, parse_audit(value)))
        except RecordError:
            bad += 1
    out.sort(key=lambda kv: kv[0])
    return [e for _, e in out], bad


def to_compact(keys_with_times: Sequence[tuple[str, float]], now: float, keep_seconds: float,
               keep_count: int) -> list[str]:
    """The entries retention removes, oldest first: older than ``keep_seconds``, or beyond
    the newest ``keep_count``. ``keys_with_times`` is (key, Unix seconds) in any order."""
    ordered = sorted(keys_with_times, key=lambda kt: (kt[1], kt[0]))
    excess = max(0, len(ordered) - max(0, keep_count))
    cutoff = now - keep_seconds
    return [key for i, (key, t) in enumerate(ordered) if i < excess or t < cutoff]


def key_times(keys: Keys, names: Iterable[str]) -> list[tuple[str, float]]:
    """(key, Unix seconds) of the audit keys among ``names``; other keys are left out."""
    out = []
    for key in names:
        ns = keys.audit_time_ns(key)
        if ns is not None:
            out.append((key, ns / 1e9))
    return out


def render_rows(entries: Sequence[AuditEntry]) -> list[list[str]]:
    """Rows of TIME ACTOR VERB TARGET DETAIL/CHANGE for aivmmctl audit."""
    rows = []
    for e in entries:
        when = datetime.datetime.fromtimestamp(e.time).strftime("%Y-%m-%d %H:%M:%S")
        change = e.detail or f"{_short(e.old or '-')} -> {_short(e.new or '-')}"
        rows.append([when, e.actor, e.verb, e.target, change])
    return rows


# -- the agent's writer -----------------------------------------------------------------------

class AuditWriter:
    """Puts entries into etcd from a bounded queue, in order, retrying while etcd is away.

    :meth:`add` never blocks: when the queue is full (etcd away for long) the entry is
    dropped and counted, and the first drop of an outage is logged.
    """

    def __init__(self, store: Store, keys: Keys, *, size: int = 1000,
                 backoff: Backoff | None = None) -> None:
        self.store = store
        self.keys = keys
        self.queue: asyncio.Queue[AuditEntry] = asyncio.Queue(maxsize=size)
        self.backoff = backoff or Backoff(initial=0.5, cap=10.0, jitter=0.5)
        self.written = 0
        self.dropped = 0
        self._dropping = False

    def add(self, e: AuditEntry) -> None:
        try:
            self.queue.put_nowait(e)
        except asyncio.QueueFull:
            self.dropped += 1
            if not self._dropping:
                self._dropping = True
                log.warning("audit entries dropped: etcd has been away too long",
                            extra={"queued": self.queue.qsize(), "verb": e.verb,
                                   "target": e.target})

    async def run(self) -> None:
        """The eternal task: write each entry, oldest first."""
        while True:
            e = await self.queue.get()
            key, value = audit_put(self.keys, e)
            while True:
                try:
                    await self.store.put(key, value)
                    self.written += 1
                    break
                except (StoreUnavailable, StoreClosed) as err:
                    delay = self.backoff.next()
                    log.debug("audit entry not written yet: %s", err)
                    await asyncio.sleep(delay)
                except StoreError as err:  # refused: retrying would not help
                    self.dropped += 1
                    log.warning("audit entry refused by etcd; dropped",
                                extra={"verb": e.verb, "target": e.target, "error": str(err)})
                    break
            self.backoff.reset()
            if self._dropping and self.queue.qsize() < self.queue.maxsize // 2:
                log.warning("audit entries are written again", extra={"dropped": self.dropped})
                self._dropping = False

