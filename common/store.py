"""The etcd store both daemons use; the only module that imports the etcd client library.

SKELETON: the interface below is the contract the agent and the scheduler code against.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal


class StoreUnavailable(Exception):
    """No etcd endpoint answered (all were tried); callers retry with backoff."""


class LeaseLost(Exception):
    """The lease expired or was revoked; the owner must grant a new one and re-put its keys."""


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: str
    value: bytes
    mod_revision: int


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Every key under a prefix at one revision."""

    revision: int
    items: list[KeyValue]


@dataclass(frozen=True, slots=True)
class Event:
    kind: Literal["put", "delete"]
    key: str
    value: bytes  # b"" for a delete
    revision: int  # the mod revision of this change


@dataclass(frozen=True, slots=True)
class Reset:
    """The consumer must replace its whole view with this snapshot (start, or compaction)."""

    snapshot: Snapshot


class EtcdStore:
    """An asyncio etcd v3 client over a list of endpoints, failing over between them."""

    def __init__(self, endpoints: list[str], *, timeout: float = 5.0) -> None: ...

    async def connect(self) -> None: ...
    async def close(self) -> None: ...
    async def __aenter__(self) -> EtcdStore: ...
    async def __aexit__(self, *exc: object) -> None: ...

    async def grant_lease(self, ttl: int) -> int: ...
    async def keep_alive(self, lease_id: int) -> int:
        """Refresh the lease once; returns the remaining TTL; raises LeaseLost if it is gone."""
        ...
    async def revoke_lease(self, lease_id: int) -> None: ...

    async def put(self, key: str, value: bytes, *, lease: int | None = None) -> int: ...
    async def delete(self, key: str) -> bool: ...
    async def get(self, key: str) -> bytes | None: ...
    async def get_prefix(self, prefix: str) -> Snapshot: ...

    def watch_prefix(self, prefix: str, start_revision: int) -> AsyncIterator[Event]:
        """Raw watch from ``start_revision`` (inclusive); raises on a broken stream."""
        ...

    def sync_prefix(self, prefix: str) -> AsyncIterator[Reset | Event]:
        """A view that never ends: ``Reset`` first, then events; survives etcd restarts."""
        ...
