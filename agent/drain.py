"""The operator's drain request: ``{prefix}/drain/{node}`` present means stop the backends.

``aivmmctl drain NODE`` writes the key and ``aivmmctl undrain NODE`` deletes it; the agent
follows it with ``sync_prefix``, so a request made while the agent or etcd was away is seen
as soon as both are back. The key is not bound to any lease: a drain outlives agent restarts.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from common.keys import Keys
from common.records import RecordError, parse_drain
from common.store import Event, Reset

log = logging.getLogger(__name__)


class SyncSource(Protocol):
    def sync_prefix(self, prefix: str) -> AsyncIterator[Reset | Event]: ...


def drain_reason(raw: bytes) -> str:
    """Why the node is drained, for the backends' ``error``; any value at the key drains."""
    try:
        record = parse_drain(raw)
    except RecordError as err:
        log.warning("unreadable drain request; draining anyway", extra={"error": str(err)})
        return "drained by an operator"
    return f"drained by an operator: {record.reason}" if record.reason else \
        "drained by an operator"


async def follow_drain(store: SyncSource, keys: Keys, node: str,
                       apply: Callable[[str | None], None]) -> None:
    """Call ``apply(reason)`` when this node's drain key appears, ``apply(None)`` when it
    goes; runs forever (an eternal task)."""
    key = keys.drain(node)
    # The prefix also matches longer node names ("n1" and "n10"): compare whole keys.
    async for item in store.sync_prefix(key):
        if isinstance(item, Reset):
            found = [kv.value for kv in item.snapshot.items if kv.key == key]
            apply(drain_reason(found[0]) if found else None)
        elif isinstance(item, Event) and item.key == key:
            apply(None if item.kind == "delete" else drain_reason(item.value))
    raise RuntimeError("the etcd drain watch ended")
