"""aivmmctl's API key verbs: ``keys create|list|revoke|update`` and ``usage`` (docs/keys.md).

A key is made here and printed once; etcd gets only its SHA-256 (``{prefix}/keys/{name}``),
written in a compare-and-swap transaction together with its audit entry (which never holds
the key either). ``usage`` sums the scheduler replicas' per-key usage records.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from common import audit
from common.keys import Keys
from common.keyview import COUNTS, key_views, read_keys, read_usage, replicas_of, sum_usage
from common.records import KeyRecord, RecordError, dump, key_problem, parse_key
from common.store import Compare, EtcdStore
from ctl.args import count
from scheduler.apikeys import SHOWN_PREFIX, hash_key, new_key

EXIT_USAGE = 2
VERBS = ("keys", "usage")
CAS_ATTEMPTS = 5

Table = Callable[[Sequence[str], Sequence[Sequence[str]]], str]


class UsageError(Exception):
    """Bad input: ``aivmmctl: <message>``, exit 2."""


class Conflict(Exception):
    """The key record kept changing under a compare-and-swap."""


_count = count("0: no limit")


def _models(text: str) -> list[str]:
    return [m.strip() for m in text.split(",") if m.strip()]


def parse_expires(text: str, now: float) -> float | None:
    """``never``, an age from now (``30d``, ``12h``) or an ISO date/time; Unix seconds."""
    if text.strip().lower() in ("never", "none", ""):
        return None
    try:
        # parse_since reads an age as "ago"; an expiry is that far ahead.
        return 2 * now - audit.parse_since(text, now) if text.strip()[-1] in "smhdw" \
            else audit.parse_since(text, now)
    except ValueError as err:
        raise UsageError(f"--expires: {err}") from None


def add_parsers(verbs: Any) -> None:
    """Register ``keys`` and ``usage`` on aivmmctl's subparsers."""
    k = verbs.add_parser("keys", help="client API keys: create, list, revoke, update")
    actions = k.add_subparsers(dest="action", required=True)
    for action in ("create", "update"):
        a = actions.add_parser(action, help=f"{action} a key" + (
            " (prints the new key once)" if action == "create" else
            " (only the flags given change)"))
        a.add_argument("name", metavar="NAME")
        a.add_argument("--models", type=_models, default=None, metavar="A,B",
                       help="the models the key may call (default: every model; '' for all)")
        for flag, what in (("--rpm", "requests per minute"), ("--tpm", "tokens per minute "
                           "(prompt + completion)"), ("--max-parallel", "requests at once")):
            a.add_argument(flag, type=_count, default=None, metavar="N",
                           help=f"{what}, over every scheduler replica (0: no limit)")
        a.add_argument("--expires", default=None, metavar="DATE|AGE",
                       help="an ISO date/time, an age from now (30d, 12h), or never")
        a.add_argument("--operator", action=argparse.BooleanOptionalAction, default=None,
                       help="may see every key's usage on the status page")
    ls = actions.add_parser("list", help="every key with its limits and state")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    rv = actions.add_parser("revoke", help="refuse a key from now on (every replica, ~1 s)")
    rv.add_argument("name", metavar="NAME")
    u = verbs.add_parser("usage", help="per-key requests and tokens, summed over schedulers")
    u.add_argument("--since", metavar="AGE|DATE", default=None,
                   help="only usage since then (whole hours): 1h, 2d or an ISO date")
    u.add_argument("--json", action="store_true", help="machine-readable output")


def _limit(value: int | None) -> int | None:
    return value if value else None


async def write_key(store: EtcdStore, keys: Keys, args: argparse.Namespace, now: float
                    ) -> tuple[KeyRecord, str | None]:
    """Create (with a new key, returned) or update ``args.name``; the audit entry goes in
    the same transaction."""
    key = keys.api_key(args.name)
    expires = None if args.expires is None else parse_expires(args.expires, now)
    for _ in range(CAS_ATTEMPTS):
        kv = await store.get_item(key)
        secret: str | None = None
        if args.action == "create":
            if kv is not None:
                raise UsageError(f"key {args.name} exists (aivmmctl keys update, or revoke it "
                                 "and create another name)")
            secret = new_key()
            old = None
            record = KeyRecord(name=args.name, hash=hash_key(secret),
                               prefix=secret[:SHOWN_PREFIX], models=args.models or [],
                               rpm=_limit(args.rpm), tpm=_limit(args.tpm),
                               max_parallel=_limit(args.max_parallel), expires_at=expires,
                               created_at=now, updated_at=now, operator=bool(args.operator))
            detail = f"created: {describe(record)}"
        else:
            if kv is None:
                raise UsageError(f"no key {args.name}")
            try:
                old = parse_key(kv.value)
            except RecordError as err:
                raise UsageError(f"{args.name}: its record cannot be read ({err})") from None
            changes: dict[str, Any] = {"updated_at": now}
            if args.models is not None:
                changes["models"] = args.models
            for name in ("rpm", "tpm", "max_parallel"):
                if getattr(args, name) is not None:
                    changes[name] = _limit(getattr(args, name))
            if args.expires is not None:
                changes["expires_at"] = expires
            if args.operator is not None:
                changes["operator"] = args.operator
            record = dataclasses.replace(old, **changes)
            detail = "updated: " + (audit.changed_fields(old, record) or "no field changed")
        problem = key_problem(record)
        if problem:
            raise UsageError(problem.replace("field 'name'", "NAME"))
        change = audit.entry("aivmmctl", f"key-{args.action}", args.name, old=old, new=record,
                             detail=detail)
        result = await store.txn([Compare.modified(key, 0 if kv is None else kv.mod_revision)],
                                 puts=[(key, dump(record)), audit.audit_put(keys, change)])
        if result.succeeded:
            return record, secret
    raise Conflict(args.name)


async def revoke_key(store: EtcdStore, keys: Keys, name: str, now: float) -> bool:
    """Mark ``name`` revoked; False when it already was."""
    key = keys.api_key(name)
    for _ in range(CAS_ATTEMPTS):
        kv = await store.get_item(key)
        if kv is None:
            raise UsageError(f"no key {name}")
        try:
            old = parse_key(kv.value)
        except RecordError as err:
            raise UsageError(f"{name}: its record cannot be read ({err})") from None
        if old.revoked:
            return False
        record = dataclasses.replace(old, revoked=True, updated_at=now)
        change = audit.entry("aivmmctl", "key-revoke", name, old=old, new=record,
                             detail="revoked: every scheduler refuses it from now on")
        result = await store.txn([Compare.modified(key, kv.mod_revision)],
                                 puts=[(key, dump(record)), audit.audit_put(keys, change)])
        if result.succeeded:
            return True
    raise Conflict(name)


def describe(k: KeyRecord) -> str:
    """``models a, b; 60 rpm; 10000 tpm; 4 parallel; expires ...`` in one line."""
    parts = ["models " + ", ".join(k.models) if k.models else "every model"]
    parts += [f"{v} {u}" for v, u in ((k.rpm, "rpm"), (k.tpm, "tpm"),
                                     (k.max_parallel, "parallel")) if v is not None]
    if not any(v is not None for v in (k.rpm, k.tpm, k.max_parallel)):
        parts.append("no limits")
    if k.expires_at is not None:
        parts.append("expires " + _date(k.expires_at))
    if k.operator:
        parts.append("operator")
    return "; ".join(parts)


def _date(t: float | None) -> str:
    if t is None:
        return "-"
    return datetime.datetime.fromtimestamp(t).astimezone().strftime("%Y-%m-%d %H:%M")


def _lim(v: int | None) -> str:
    return "-" if v is None else str(v)


def render_keys(views: list[dict[str, Any]], table: Table) -> str:
    rows = [[v["name"], v["prefix"] + "…" if v["prefix"] else "", v["state"],
             ",".join(v["models"]) or "*", _lim(v["rpm"]), _lim(v["tpm"]),
             _lim(v["max_parallel"]), _date(v["expires_at"]), "yes" if v["operator"] else ""]
            for v in views if v["source"] == "etcd"]
    return "\n".join([f"KEYS ({len(rows)})", table(
        ["NAME", "KEY", "STATE", "MODELS", "RPM", "TPM", "PARALLEL", "EXPIRES", "OPERATOR"],
        rows)])


def render_usage(views: list[dict[str, Any]], replicas: int, since: float | None,
                 table: Table) -> str:
    rows = [[v["name"], v["state"], *(str(v["usage"][c]) for c in COUNTS)]
            for v in views if any(v["usage"].values())]
    span = "since they were counted" if since is None else f"since {_date(since)}"
    return "\n".join([f"USAGE ({len(rows)} key(s))", table(
        ["KEY", "STATE", "REQUESTS", "ERRORS", "RATE LIMITED", "PROMPT TOKENS",
         "COMPLETION TOKENS"], rows),
        f"summed over {replicas} scheduler replica record(s), {span}"])


async def run(args: argparse.Namespace, endpoints: list[str], table: Table) -> int:
    """Run one key verb; StoreUnavailable propagates to main (exit 1)."""
    keys = Keys(args.prefix)
    now = time.time()
    try:
        since = None
        if args.verb == "usage" and args.since is not None:
            try:
                since = audit.parse_since(args.since, now)
            except ValueError as err:
                raise UsageError(f"--since: {err}") from None
        async with EtcdStore(endpoints, timeout=args.timeout) as store:
            if args.verb == "usage":
                records = await read_keys(store, keys)
                usage, skipped = await read_usage(store, keys, since)
                views = key_views(records.keys, sum_usage(usage, since), now)
                if args.json:
                    sys.stdout.write(orjson.dumps(
                        {"keys": [{"name": v["name"], "state": v["state"], **v["usage"]}
                                  for v in views],
                         "totals": {c: sum(v["usage"][c] for v in views) for c in COUNTS},
                         "replicas": replicas_of(usage), "since": since,
                         "skipped": skipped + records.skipped},
                        option=orjson.OPT_INDENT_2).decode() + "\n")
                else:
                    print(render_usage(views, replicas_of(usage), since, table))
            elif args.action in ("create", "update"):
                record, secret = await write_key(store, keys, args, now)
                print(f"key {record.name} {args.action}d: {describe(record)}")
                if secret is not None:
                    print(secret)
                    print("(shown once: aivmm keeps only its SHA-256)", file=sys.stderr)
            elif args.action == "revoke":
                done = await revoke_key(store, keys, args.name, now)
                print(f"key {args.name} " + ("revoked" if done else "was already revoked"))
            else:
                records = await read_keys(store, keys)
                views = key_views(records.keys, {}, now)
                if args.json:
                    sys.stdout.write(orjson.dumps(
                        {"keys": [{k: v for k, v in x.items() if k != "usage"} for x in views],
                         "skipped": records.skipped},
                        option=orjson.OPT_INDENT_2).decode() + "\n")
                else:
                    print(render_keys(views, table))
    except UsageError as err:
        print(f"aivmmctl: {err}", file=sys.stderr)
        return EXIT_USAGE
    except Conflict as err:
        print(f"aivmmctl: key {err} kept changing while being written; try again",
              file=sys.stderr)
        return 1
    return 0
