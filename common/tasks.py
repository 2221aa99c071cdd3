"""Guarded eternal tasks: if one ends, the daemon stops and exits for systemd to restart it.

A daemon's background loops (heartbeat, watch, probes) are meant to run forever. One that
returns or raises has left the daemon half-alive, which is worse than dead: the guard notes
the first such ending, and :func:`common.daemon.serve` then stops everything and exits 1.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from aiohttp import web

log = logging.getLogger(__name__)


class Guard:
    """Owns a daemon's eternal tasks and remembers the first one that ended."""

    def __init__(self) -> None:
        self._tasks: dict[str, asyncio.Task[Any]] = {}
        self._stopping = False
        self.failed = asyncio.Event()
        self.reason: str | None = None

    def spawn(self, name: str, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run ``coro`` as an eternal task named ``name``."""
        if name in self._tasks:
            coro.close()
            raise ValueError(f"task {name!r} already running")
        task = asyncio.create_task(coro, name=name)
        self._tasks[name] = task
        task.add_done_callback(self._ended)
        return task

    def _ended(self, task: asyncio.Task[Any]) -> None:
        if self._stopping or self._tasks.get(task.get_name()) is not task:
            return
        if task.cancelled():
            why = "was cancelled"
        elif task.exception() is not None:
            exc = task.exception()
            why = f"failed: {exc!r}"
            log.error("eternal task %s failed", task.get_name(), exc_info=exc)
        else:
            why = "returned"
        if self.reason is None:
            self.reason = f"task {task.get_name()} {why}"
            log.error("stopping: %s", self.reason)
        self.failed.set()

    @property
    def names(self) -> list[str]:
        return [name for name, task in self._tasks.items() if not task.done()]

    async def cancel(self, *names: str) -> None:
        """Stop the named tasks on purpose (a cleanup_ctx tearing down its own loops)."""
        tasks = [self._tasks.pop(name) for name in names if name in self._tasks]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def stop(self) -> None:
        """Cancel every task and wait for all of them to finish."""
        self._stopping = True
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for task, result in zip(tasks, results, strict=True):
            if isinstance(result, Exception):
                log.debug("task %s ended with %r while stopping", task.get_name(), result)
        self._tasks.clear()


GUARD: web.AppKey[Guard] = web.AppKey("guard", Guard)
