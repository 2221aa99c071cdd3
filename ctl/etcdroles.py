"""aivmmctl etcd-roles: least-privilege etcd roles and users for the agents, the schedulers
and operators (docs/security.md).

Roles, under the key prefix P:

- ``aivmm-scheduler``: reads all of P; writes only what a scheduler writes: the placer's
  ``assignments/``, ``placement/``, ``placer/`` (the election) and ``audit/`` (its entries
  and their retention), its ``load/``, ``route-stats/`` and ``schedulers/`` records,
  ``key-usage/``, and ``routes/`` (a guard appends its trips to a route record).
- ``aivmm-agent-{node}``, one per node: writes its own ``nodes/{node}``,
  ``backends/{node}/``, ``models/{node}`` and ``model-rm/{node}/`` (it deletes the removal
  requests it carried out), takes download locks under ``model-locks/``, appends to
  ``audit/``; reads its ``assignments/{node}/`` and ``drain/{node}``. Nothing else: not
  another node's keys, not ``deployments/``, not ``routes/``.
- ``aivmm-operator``: reads and writes all of P (drain, deploy, routes, audit).

Each role has a user of the same name. With ``--password-dir DIR`` a user's password is
``DIR/<user>`` (made, 0600, when absent); without it the users get no password and log in
only with a client certificate whose CN is the user's name (etcd's --client-cert-auth).
``--enable-auth`` also makes the ``root`` user (password ``DIR/root``) and turns etcd's
authentication on. Running it again brings every role's permissions back to these.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from pathlib import Path
from typing import Any

from common.store import EtcdStore, Permission

SCHEDULER = "aivmm-scheduler"
OPERATOR = "aivmm-operator"
ROOT = "root"


def agent_role(node: str) -> str:
    return f"aivmm-agent-{node}"


def role_grants(prefix: str, nodes: list[str]) -> dict[str, list[Permission]]:
    """Every role's permissions under ``prefix`` (pure; tested)."""
    p = prefix
    roles: dict[str, list[Permission]] = {
        SCHEDULER: [Permission(f"{p}/", "read")] + [
            Permission(f"{p}/{part}/", "readwrite")
            for part in ("assignments", "placement", "placer", "audit", "load", "route-stats",
                         "routes", "schedulers", "key-usage")],
        OPERATOR: [Permission(f"{p}/", "readwrite")],
    }
    for node in nodes:
        roles[agent_role(node)] = [
            # Exact keys where a longer node name would share the prefix (n1, n10).
            Permission(f"{p}/nodes/{node}", "readwrite", prefix=False),
            Permission(f"{p}/backends/{node}/", "readwrite"),
            Permission(f"{p}/models/{node}", "readwrite", prefix=False),
            Permission(f"{p}/model-rm/{node}/", "readwrite"),
            Permission(f"{p}/model-locks/", "readwrite"),
            Permission(f"{p}/audit/", "write"),
            Permission(f"{p}/assignments/{node}/", "read"),
            # The agent watches its drain key as a range: a read of n1 also covers n10's
            # drain key, which says nothing secret.
            Permission(f"{p}/drain/{node}", "read"),
        ]
    return roles


def _password(directory: Path | None, user: str) -> str | None:
    """The user's password from DIR/<user>, made (random, 0600) when absent."""
    if directory is None:
        return None
    path = directory / user
    if path.exists():
        text = path.read_text(encoding="utf-8").strip()
        if text:
            return text
    password = secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(password + "\n")
    return password


async def apply(store: EtcdStore, prefix: str, nodes: list[str], directory: Path | None,
                enable: bool) -> list[str]:
    """Create or update the roles and users; returns one line per thing done."""
    done = []
    for role, grants in role_grants(prefix, nodes).items():
        await store.ensure_role(role, grants)
        await store.ensure_user(role, _password(directory, role), [role])
        done.append(f"role and user {role}: {len(grants)} permission(s)")
    if enable:
        await store.ensure_role(ROOT, [])
        await store.ensure_user(ROOT, _password(directory, ROOT), [ROOT])
        await store.enable_auth()
        done.append("user root ready; authentication enabled")
    return done


def add_parser(verbs: Any) -> None:
    p = verbs.add_parser("etcd-roles", help="least-privilege etcd roles and users "
                         "(docs/security.md)")
    p.add_argument("--node", action="append", default=[], metavar="NODE",
                   help="a node whose agent gets a role and user (repeat)")
    p.add_argument("--password-dir", metavar="DIR", type=Path,
                   help="passwords as DIR/<user> (made when absent); without it users "
                   "log in by client certificate only")
    p.add_argument("--enable-auth", action="store_true",
                   help="also make the root user and turn etcd's authentication on")


async def run(args: argparse.Namespace, endpoints: list[str]) -> int:
    if args.password_dir is not None and not args.password_dir.is_dir():
        print(f"aivmmctl: --password-dir: {args.password_dir} is not a directory", file=sys.stderr)
        return 2
    if args.enable_auth and args.password_dir is None:
        print("aivmmctl: --enable-auth needs --password-dir (for root's password)", file=sys.stderr)
        return 2
    async with EtcdStore(endpoints, timeout=args.timeout) as store:
        for line in await apply(store, args.prefix, args.node, args.password_dir,
                                args.enable_auth):
            print(line)
    return 0
