"""Command-line plumbing shared by the daemons: common flags and the exit-2 config error."""

from __future__ import annotations

import argparse
import os
import platform
import sys
from collections.abc import Mapping, Sequence
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as dist_version
from typing import TypeVar

from common import config

T = TypeVar("T")

EXIT_CONFIG = 2


def version_text(prog: str) -> str:
    """What --version prints: the installed aivmm version (pyproject.toml's, read from the
    package metadata) and the environment it runs from (/opt/aivmm/envs/... when installed
    with scripts/install)."""
    try:
        release = dist_version("aivmm")
    except PackageNotFoundError:
        release = "0+unknown"
    return f"{prog} {release} (python {platform.python_version()}, {sys.prefix})"


class VersionAction(argparse.Action):
    """--version: ``version_text`` on one line (argparse's own action wraps it)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 default: str = argparse.SUPPRESS, help: str = "print the version and exit"
                 ) -> None:
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        print(version_text(parser.prog))
        parser.exit()


def daemon_parser(prog: str, default_config: str, description: str) -> argparse.ArgumentParser:
    """An argument parser with the flags every daemon takes (docs/contracts.md: Commands)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--version", action=VersionAction)
    parser.add_argument("--config", metavar="PATH", default=None,
                        help=f"TOML config file (default {default_config})")
    parser.add_argument("--etcd", metavar="URL[,URL...]", help="etcd endpoints")
    parser.add_argument("--listen", metavar="HOST:PORT", help="address to serve on")
    parser.add_argument("--log-level", metavar="LEVEL",
                        help="debug, info, warning or error (any case)")
    parser.set_defaults(default_config=default_config)
    return parser


def load_config(
    cls: type[T],
    args: argparse.Namespace,
    *,
    flags: Sequence[str] = ("etcd", "listen", "log_level"),
    environ: Mapping[str, str] | None = None,
) -> T:
    """Load the daemon's config from its file, environment and flags; raises ConfigError."""
    path = args.config or args.default_config
    return config.load(
        cls,
        path,
        explicit=args.config is not None,
        environ=os.environ if environ is None else environ,
        flags={name: getattr(args, name, None) for name in flags},
    )


def load_or_exit(
    cls: type[T],
    args: argparse.Namespace,
    *,
    prog: str,
    flags: Sequence[str] = ("etcd", "listen", "log_level"),
    environ: Mapping[str, str] | None = None,
) -> T:
    """Load the daemon's config; on any error print one line and exit 2 (no traceback)."""
    try:
        loaded = load_config(cls, args, flags=flags, environ=environ)
        if isinstance(loaded, config.DaemonConfig):
            loaded.etcd_security(environ)  # the password must be there too (and readable)
        return loaded
    except config.ConfigError as err:
        print(f"{prog}: config error: {err}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None
