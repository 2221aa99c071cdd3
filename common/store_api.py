"""What the daemons need of an etcd store, as a protocol.

The agent and the scheduler hold their store through this type, not ``EtcdStore``, so a test
(or another backend) can hand them anything with these methods; ``EtcdStore`` satisfies it
structurally, without inheriting from it.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Protocol, runtime_checkable

from common.store import Compare, Event, KeyValue, Reset, Snapshot, TxnResult


@runtime_checkable
class Store(Protocol):
    """A key-value store with leases and watches, as :class:`common.store.EtcdStore` is."""

    @property
    def connected(self) -> bool:
        """Whether the last exchange with the store succeeded."""
        ...

    async def connect(self) -> None: ...

    async def close(self) -> None: ...

    async def grant_lease(self, ttl: int) -> int: ...

    async def keep_alive(self, lease_id: int) -> int: ...

    async def revoke_lease(self, lease_id: int) -> None: ...

    async def put(self, key: str, value: bytes, *, lease: int | None = None) -> int: ...

    async def put_many(self, items: list[tuple[str, bytes]], *,
                       lease: int | None = None) -> int: ...

    async def get(self, key: str) -> bytes | None: ...

    async def get_prefix(self, prefix: str) -> Snapshot: ...

    async def get_last(self, prefix: str, count: int) -> Snapshot: ...

    async def delete(self, key: str) -> bool: ...

    async def delete_prefix(self, prefix: str) -> int: ...

    def sync_prefix(self, prefix: str) -> AsyncIterator[Reset | Event]: ...

    def watch_prefix(self, prefix: str, start_revision: int) -> AsyncGenerator[Event, None]: ...

    async def get_item(self, key: str) -> KeyValue | None: ...

    async def txn(self, when: Sequence[Compare], *, puts: Sequence[tuple[str, bytes]] = (),
                  deletes: Sequence[str] = (), lease: int | None = None) -> TxnResult: ...
