"""The systemd notify protocol: a datagram to ``$NOTIFY_SOCKET``; no libsystemd needed."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, Mapping


class Notifier:
    """Sends ``READY=1``, ``STATUS=…``, ``WATCHDOG=1``; does nothing outside systemd."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):  # abstract namespace socket
            address = "\0" + address[1:]
        self._address = address or None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        enabled = usec.isdigit() and (not pid or pid == str(os.getpid()))
        self.watchdog_interval: float | None = int(usec) / 2e6 if enabled else None
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, **fields: str | int) -> None:
        """Send ``KEY=value`` lines; errors are ignored (systemd may be restarting)."""
        if self._address is None:
            return
        payload = "\n".join(f"{k.upper()}={v}" for k, v in fields.items()).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(payload, self._address)
        except OSError:
            pass

    def ready(self, status: str = "") -> None:
        self.notify(ready=1, **({"status": status} if status else {}))

    def status(self, text: str) -> None:
        self.notify(status=text)

    def watchdog(self) -> None:
        self.notify(watchdog=1)

    def stopping(self) -> None:
        self.notify(stopping=1)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


async def notify_loop(notifier: Notifier, *, ready: Callable[[], bool],
                      status: Callable[[], str], poll: float = 0.1) -> None:
    """Eternal task: ``READY=1`` once ``ready()`` holds, ``STATUS=`` on change, watchdog pings.

    ``WATCHDOG=1`` goes out every half ``WATCHDOG_USEC`` from the start, so a slow start-up
    is bounded by ``TimeoutStartSec=`` and not mistaken for a hang; a daemon whose loop is
    stuck stops pinging and systemd kills and restarts it.
    """
    loop = asyncio.get_running_loop()
    period = min(5.0, notifier.watchdog_interval or 5.0)
    announced = False
    last = ""
    next_tick = loop.time()
    while True:
        if not announced and ready():
            last = status()
            notifier.ready(last)
            announced = True
        if loop.time() >= next_tick:
            line = status()
            if line != last:
                notifier.status(line)
                last = line
            if notifier.watchdog_interval is not None:
                notifier.watchdog()
            next_tick = loop.time() + period
        wait = next_tick - loop.time()
        await asyncio.sleep(max(0.0, wait if announced else min(poll, wait)))
