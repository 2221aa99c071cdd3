"""Cleanup contexts both daemons share: the etcd store and the systemd notifications.

Both apps wire them the same way: :func:`init_daemon` at build time, then
``app.cleanup_ctx`` holds :func:`store_ctx` before the contexts that use the store and
:func:`notify_ctx` last (so that on the way out ``STOPPING=1`` goes first). A part whose
AppKey is already set when the app starts (a test's store or notifier) is used as it is and
left for its owner to close; the contexts close only what they made.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from aiohttp import web

from common.daemon import LISTENING, STOPPING
from common.sdnotify import Notifier, notify_loop
from common.store import EtcdSecurity, EtcdStore
from common.store_api import Store
from common.tasks import GUARD, Guard


def _always(app: web.Application) -> bool:
    return True


@dataclass(frozen=True, slots=True)
class DaemonSpec:
    """What the shared contexts need to know of one daemon."""

    etcd: list[str]
    """The etcd endpoints :func:`store_ctx` connects to."""
    status: Callable[[web.Application], str]
    """One line for ``systemctl status``."""
    ready: Callable[[web.Application], bool] = field(default=_always)
    """Besides listening, what must hold before ``READY=1``."""
    security: EtcdSecurity | None = None
    """TLS material and credentials for etcd (docs/security.md)."""


SPEC: web.AppKey[DaemonSpec] = web.AppKey("daemon_spec", DaemonSpec)
STORE: web.AppKey[Store] = web.AppKey("store", Store)
NOTIFIER: web.AppKey[Notifier] = web.AppKey("notifier", Notifier)


def init_daemon(app: web.Application, spec: DaemonSpec) -> None:
    """The state every daemon app holds: guard, listening/stopping flags, its spec."""
    app[SPEC] = spec
    app[GUARD] = Guard()
    app[LISTENING] = asyncio.Event()
    app[STOPPING] = asyncio.Event()


def etcd_connected(app: web.Application) -> bool:
    """Whether the app's store says etcd answers; False before it is opened."""
    return STORE in app and app[STORE].connected


async def store_ctx(app: web.Application) -> AsyncIterator[None]:
    """Open an EtcdStore on the spec's endpoints unless a store was set; close only ours."""
    own = STORE not in app
    if own:
        store = EtcdStore(app[SPEC].etcd, security=app[SPEC].security)
        await store.connect()
        app[STORE] = store
    yield
    if own:
        await app[STORE].close()


def notify_ready(app: web.Application) -> bool:
    """``READY=1`` may go out: the socket listens and the daemon's own condition holds."""
    return app[LISTENING].is_set() and app[SPEC].ready(app)


async def notify_ctx(app: web.Application) -> AsyncIterator[None]:
    """READY=1 once :func:`notify_ready`, STATUS= on change, WATCHDOG=1; STOPPING=1 on exit."""
    own = NOTIFIER not in app
    if own:
        app[NOTIFIER] = Notifier()
    notifier = app[NOTIFIER]
    status = app[SPEC].status
    if notifier.enabled:
        app[GUARD].spawn("sd-notify", notify_loop(notifier, ready=lambda: notify_ready(app),
                                                  status=lambda: status(app)))
    yield
    if notifier.enabled:
        await app[GUARD].cancel("sd-notify")
        notifier.stopping()
    if own:
        notifier.close()
