"""This node's share of the fleet's deployments: ``{prefix}/assignments/{node}/``.

Only the elected placer writes assignments; the agent follows its own node's with
``sync_prefix`` (so it resumes from the last revision after an outage, and takes a fresh
snapshot after a compaction) and hands the whole table to the supervisor on every change.
A record it cannot read is skipped and counted, never a crash.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from common.keys import Keys
from common.records import AssignmentRecord, RecordError, parse_assignment
from common.store import Event, Reset

log = logging.getLogger(__name__)


class SyncSource(Protocol):
    def sync_prefix(self, prefix: str) -> AsyncIterator[Reset | Event]: ...


class AssignmentTable:
    """The node's assignments by backend name, from the sync stream (pure, tested so)."""

    def __init__(self, keys: Keys, node: str,
                 on_bad_record: Callable[[str, str], None] = lambda key, why: None) -> None:
        self.keys = keys
        self.node = node
        self.on_bad_record = on_bad_record
        self.table: dict[str, AssignmentRecord] = {}

    def _parse(self, key: str, value: bytes) -> tuple[str, AssignmentRecord | None] | None:
        names = self.keys.split_assignment(key)
        if names is None or names[0] != self.node:
            return None
        try:
            record = parse_assignment(value)
        except RecordError as err:
            self.on_bad_record(key, str(err))
            return names[1], None
        if record.node != self.node or record.name != names[1]:
            self.on_bad_record(key, f"record names {record.node}/{record.name}")
            return names[1], None
        return names[1], record

    def apply(self, item: Reset | Event) -> None:
        if isinstance(item, Reset):
            self.table.clear()
            for kv in item.snapshot.items:
                parsed = self._parse(kv.key, kv.value)
                if parsed is not None and parsed[1] is not None:
                    self.table[parsed[0]] = parsed[1]
            return
        parsed = self._parse(item.key, item.value) if item.kind == "put" else None
        names = self.keys.split_assignment(item.key)
        if names is None or names[0] != self.node:
            return
        if parsed is None or parsed[1] is None:
            # Deleted, or unreadable: an assignment we cannot read is not run on old terms.
            self.table.pop(names[1], None)
        else:
            self.table[parsed[0]] = parsed[1]


async def follow_assignments(store: SyncSource, keys: Keys, node: str,
                             apply: Callable[[dict[str, AssignmentRecord]], None],
                             on_bad_record: Callable[[str, str], None]) -> None:
    """Call ``apply(table)`` with this node's assignments at start and on every change;
    runs forever (an eternal task)."""
    table = AssignmentTable(keys, node, on_bad_record)
    async for item in store.sync_prefix(keys.node_assignments(node)):
        table.apply(item)
        apply(dict(table.table))
    raise RuntimeError("the etcd assignment watch ended")
