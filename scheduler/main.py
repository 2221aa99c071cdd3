"""``aivmm-scheduler``: load the config, serve the OpenAI endpoint until told to stop."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable

from common import logs
from common.cli import daemon_parser, load_or_exit
from common.daemon import run_main, serve
from scheduler import tls
from scheduler.app import build_app
from scheduler.config import SchedulerConfig

PROG = "aivmm-scheduler"
log = logging.getLogger("scheduler")


def _nothing_to_reload() -> None:
    log.info("SIGHUP: no TLS certificate to reload; scheduler.toml is read at start only")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    parser = daemon_parser(PROG, "/etc/aivmm/scheduler.toml",
                           "One OpenAI-compatible endpoint in front of the aivmm backends.")
    args = parser.parse_args(argv)
    config = load_or_exit(SchedulerConfig, args, prog=PROG)
    logs.setup(config.log_level, config.log_format)
    app = build_app(config)
    context = None
    reload: Callable[[], None]
    if config.tls_cert is not None and config.tls_key is not None:
        made = tls.tls_context(config.tls_cert, config.tls_key)
        assert not isinstance(made, str)  # the config check made one already
        context = made
        reload = functools.partial(tls.reloader, made, config.tls_cert, config.tls_key)
    else:
        # systemctl reload sends SIGHUP; unhandled it would end the process (and systemd
        # counts that as a clean exit, so Restart=on-failure would not bring it back).
        reload = _nothing_to_reload
    # A client that disconnects must stop its upstream request at once.
    return run_main(serve(app, config.listen, reuse_port=config.reuse_port,
                      handler_cancellation=True, shutdown_timeout=config.shutdown_timeout,
                      keepalive_timeout=config.keepalive_timeout,
                      header_timeout=config.header_timeout, ssl_context=context,
                      reload=reload))


if __name__ == "__main__":
    sys.exit(main())
