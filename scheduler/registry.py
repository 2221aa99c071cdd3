"""The backend table, kept in step with etcd: read the prefix, then apply the watch.

The store's ``sync_prefix`` yields a ``Reset`` (a whole snapshot, at start and after a
compaction or reconnect) and then single events. This module turns them into router
updates. If etcd goes away the router keeps the last view (static stability): routing goes
on, and only the health report says the view may be stale.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Protocol

from common.keys import Keys
from common.records import BackendRecord, RecordError, parse_backend
from common.store import Event, Reset
from scheduler.netpolicy import Network, backend_problem
from scheduler.routing import Router

log = logging.getLogger(__name__)


class SyncSource(Protocol):
    def sync_prefix(self, prefix: str) -> AsyncIterator[Reset | Event]: ...


class Registry:
    """Applies etcd changes to a Router; ``on_change`` is called after every change."""

    def __init__(self, router: Router, keys: Keys, *,
                 on_change: Callable[[], None] = lambda: None,
                 on_bad_record: Callable[[], None] = lambda: None,
                 on_reset: Callable[[], None] = lambda: None,
                 networks: Sequence[Network] = ()) -> None:
        self.router = router
        # Where a record may send requests (docs/security.md); [] = anywhere not link-local.
        self.networks = list(networks)
        self.keys = keys
        self.on_change = on_change
        self.on_bad_record = on_bad_record
        self.on_reset = on_reset
        self.synced = False
        self.revision = 0

    def _parse(self, key: str, value: bytes) -> tuple[str, BackendRecord] | None:
        names = self.keys.split_backend(key)
        if names is None:
            return None
        try:
            record = parse_backend(value)
        except RecordError as err:
            log.warning("skipping unusable backend record", extra={"key": key, "error": str(err)})
            self.on_bad_record()
            return None
        problem = backend_problem(record.url, record.api_path, self.networks)
        if problem is not None:
            # A record that would send clients' prompts somewhere it must not: never routed.
            log.warning("skipping backend record: %s", problem, extra={"key": key})
            self.on_bad_record()
            return None
        return f"{names[0]}/{names[1]}", record

    def apply(self, item: Reset | Event) -> None:
        """Apply one item of the sync stream to the router."""
        if isinstance(item, Reset):
            parsed = [p for kv in item.snapshot.items
                      if (p := self._parse(kv.key, kv.value)) is not None]
            self.router.replace(parsed)
            self.revision = item.snapshot.revision
            self.synced = True
            self.on_reset()
            log.info("backend table loaded",
                     extra={"backends": len(parsed), "revision": self.revision})
        else:
            self.revision = item.revision
            names = self.keys.split_backend(item.key)
            if names is None:
                return
            if item.kind == "delete":
                self.router.remove(f"{names[0]}/{names[1]}")
            else:
                entry = self._parse(item.key, item.value)
                if entry is None:
                    # A record we cannot read must not keep routing to its old contents.
                    self.router.remove(f"{names[0]}/{names[1]}")
                else:
                    self.router.upsert(*entry)
        self.on_change()

    async def run(self, source: SyncSource) -> None:
        """Follow etcd forever (the store resynchronises across outages by itself)."""
        async for item in source.sync_prefix(self.keys.backends):
            self.apply(item)
        raise RuntimeError("the etcd sync stream ended")
