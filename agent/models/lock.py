"""One download of a model per models_dir: an etcd lock under the agent's lease.

``{prefix}/model-locks/{storage}/{model}`` is created in a transaction that succeeds only
while the key is absent (``Compare.created(key, 0)``), under the agent's heartbeat lease: an
agent that dies lets go within ``lease_ttl``. ``storage`` is the models_dir's id
(``.aivmm/storage-id``), the same for every agent sharing it (NFS, Ceph) and distinct for
local disks, which then fetch in parallel. Waiters poll the key (once a second) and look
at the files on disk meanwhile; the holder checks now and then that it still holds it (a
lease lost while etcd was away) and stops fetching if not.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import orjson

from common.keys import Keys
from common.store import Compare
from common.store_api import Store


@dataclass(frozen=True, slots=True)
class Held:
    key: str
    revision: int  # the create revision: the lock is ours while the key has it


@dataclass(frozen=True, slots=True)
class Busy:
    holder: str  # the node that fetches it


class NoLease(Exception):
    """The agent has no lease yet (etcd not reached): try again shortly."""


class ModelLocks:
    def __init__(self, store: Store, keys: Keys, node: str,
                 lease: Callable[[], int | None]) -> None:
        self.store = store
        self.keys = keys
        self.node = node
        self.lease = lease

    async def acquire(self, storage: str, model: str) -> Held | Busy:
        """Take the lock, or say who holds it. Raises NoLease, StoreError."""
        lease = self.lease()
        if lease is None:
            raise NoLease()
        key = self.keys.model_lock(storage, model)
        value = orjson.dumps({"node": self.node, "model": model, "since": time.time()})
        result = await self.store.txn([Compare.created(key, 0)], puts=[(key, value)],
                                      lease=lease)
        if result.succeeded:
            return Held(key, result.revision)
        kv = await self.store.get_item(key)
        if kv is None:
            return Busy("")  # just released: the caller tries again
        try:
            holder = str(orjson.loads(kv.value).get("node", ""))
        except (orjson.JSONDecodeError, AttributeError):
            holder = ""
        if holder == self.node:  # our own, from before an agent restart under this lease
            return Held(key, kv.create_revision)
        return Busy(holder)

    async def held(self, h: Held) -> bool:
        kv = await self.store.get_item(h.key)
        return kv is not None and kv.create_revision == h.revision

    async def busy(self, storage: str, model: str) -> bool:
        return await self.store.get_item(self.keys.model_lock(storage, model)) is not None

    async def release(self, h: Held) -> None:
        await self.store.txn([Compare.created(h.key, h.revision)], deletes=[h.key])
