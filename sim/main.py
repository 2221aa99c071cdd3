"""``aivmm-sim``: run the sim engine. Flags override ``SIM_*`` variables, which override defaults.

Every knob of :class:`sim.settings.SimSettings` has a flag (``--latency-ms``, ``--fail-mode``…);
``--model`` may repeat. ``SIM_HOST`` and ``SIM_PORT`` set where it listens (containers use the
variables). SIGTERM or SIGINT stops it promptly with status 0.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from aiohttp import web

from sim.server import create_app
from sim.settings import SettingsError, SimSettings, from_env

log = logging.getLogger("aivmm.sim")

# In-flight requests (a hanging one above all) get this long before shutdown cancels them.
SHUTDOWN_GRACE_S = 0.5


def parse_args(argv: Sequence[str] | None,
               env: Mapping[str, str]) -> tuple[str, int, SimSettings, str]:
    """(host, port, settings, log level) from flags over ``SIM_*`` variables over defaults."""
    parser = argparse.ArgumentParser(prog="aivmm-sim", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default=env.get("SIM_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(env.get("SIM_PORT", "8001")))
    parser.add_argument("--log-level", default=env.get("SIM_LOG_LEVEL", "info"))
    parser.add_argument("--model", dest="models", action="append", metavar="NAME",
                        help="a served model id (repeat for more)")
    for f in dataclasses.fields(SimSettings):
        if f.name == "models":
            continue
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, metavar="VALUE",
                            help=f"default {f.default!r}; env SIM_{f.name.upper()}")
    args = parser.parse_args(argv)
    if args.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        parser.exit(2, f"aivmm-sim: --log-level: expected debug, info, warning or error, "
                       f"got {args.log_level!r}\n")
    try:
        settings = from_env(env)
        changes: dict[str, Any] = {name: value for name, value in vars(args).items()
                                   if name not in ("host", "port", "log_level")
                                   and value is not None}
        settings = settings.updated(changes)
    except SettingsError as err:
        parser.exit(2, f"aivmm-sim: {err}\n")
    return args.host, args.port, settings, args.log_level


async def serve(host: str, port: int, settings: SimSettings) -> None:
    """Serve until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = web.AppRunner(create_app(settings), handler_cancellation=True,
                           shutdown_timeout=SHUTDOWN_GRACE_S, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        log.info("sim %r serving %s on http://%s:%d", settings.node_label,
                 ", ".join(settings.models), host, port)
        await stop.wait()
        log.info("stopping")
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point."""
    host, port, settings, level = parse_args(argv, os.environ)
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(serve(host, port, settings))
    except OSError as err:
        print(f"aivmm-sim: cannot listen on {host}:{port}: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
