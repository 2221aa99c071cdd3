"""Which models the fleet's deployments promise, so that a model still starting is told apart
from a model nobody serves: the first gets 503 "model is starting" (clients retry), the second
404 (they do not)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from common.keys import Keys
from common.records import DeploymentRecord, RecordError, parse_deployment
from common.store import Event, Reset

log = logging.getLogger(__name__)


class SyncSource(Protocol):
    def sync_prefix(self, prefix: str) -> AsyncIterator[Reset | Event]: ...


class DeployedModels:
    """Deployments by name, kept from etcd; ``deployment_of(model)`` answers the proxy."""

    def __init__(self, keys: Keys, on_bad_record: Callable[[], None] = lambda: None) -> None:
        self.keys = keys
        self.on_bad_record = on_bad_record
        self.deployments: dict[str, DeploymentRecord] = {}

    def deployment_of(self, model: str) -> DeploymentRecord | None:
        """A deployment (with replicas wanted, or autoscaled) that serves ``model``, or
        None; an autoscaled one first."""
        found = None
        for d in self.deployments.values():
            if d.model == model and d.autoscale is not None:
                return d
            if d.model == model and d.replicas > 0 and found is None:
                found = d
        return found

    def autoscaled(self, model: str) -> DeploymentRecord | None:
        """The autoscaled deployment that serves ``model``, or None."""
        for d in self.deployments.values():
            if d.model == model and d.autoscale is not None:
                return d
        return None

    def _put(self, key: str, value: bytes) -> None:
        name = key.removeprefix(self.keys.deployments)
        try:
            self.deployments[name] = parse_deployment(value)
        except RecordError as err:
            log.warning("skipping unusable deployment", extra={"key": key, "error": str(err)})
            self.deployments.pop(name, None)
            self.on_bad_record()

    def apply(self, item: Reset | Event) -> None:
        if isinstance(item, Reset):
            self.deployments.clear()
            for kv in item.snapshot.items:
                self._put(kv.key, kv.value)
        elif item.kind == "delete":
            self.deployments.pop(item.key.removeprefix(self.keys.deployments), None)
        else:
            self._put(item.key, item.value)

    async def run(self, source: SyncSource) -> None:
        """Follow etcd forever (an eternal task)."""
        async for item in source.sync_prefix(self.keys.deployments):
            self.apply(item)
        raise RuntimeError("the etcd deployment watch ended")
