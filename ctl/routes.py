"""aivmmctl's route verbs: route, routes, unroute (docs/routes.md).

``route`` writes ``{prefix}/routes/{name}`` (compare-and-swap, with its audit entry in the
same transaction); ``routes`` shows every route's split and each target's figures, summed
over the figures the scheduler replicas publish under ``{prefix}/route-stats/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from common import audit
from common.keys import Keys
from common.records import (
    RecordError,
    RouteGuard,
    RouteRecord,
    RouteTarget,
    dump,
    parse,
    route_problem,
)
from common.routeview import read_routes, route_views
from common.store import Compare, EtcdStore

EXIT_USAGE = 2
VERBS = ("route", "routes", "unroute")
CAS_ATTEMPTS = 5

Table = Callable[[Sequence[str], Sequence[Sequence[str]]], str]


class UsageError(Exception):
    """Bad input: ``aivmmctl: <message>``, exit 2."""


class Conflict(Exception):
    """The route kept changing under a compare-and-swap."""


def _target_weight(text: str) -> tuple[str, int]:
    name, sep, weight = text.rpartition("=")
    try:
        value = int(weight)
    except ValueError:
        value = -1
    if not sep or not name.strip() or value < 0:
        raise argparse.ArgumentTypeError(
            f"expected TARGET=WEIGHT with an integer weight >= 0, got {text!r}")
    return name.strip(), value


def _positive(kind: type[float] | type[int]) -> Callable[[str], Any]:
    def check(text: str) -> float | int:
        try:
            value = kind(text)
        except ValueError:
            value = 0
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
        return value
    return check


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a share from 0 to 1, got {text!r}")
    return value


def add_parsers(verbs: Any) -> None:
    """Register the route verbs on aivmmctl's subparsers."""
    r = verbs.add_parser("route", help="create, replace or restore a route (a model name "
                         "split over targets)")
    r.add_argument("name", metavar="NAME", help="the model name clients ask for")
    r.add_argument("--to", action="append", type=_target_weight, default=[],
                   metavar="TARGET=WEIGHT",
                   help="a deployment or model id and its weight (repeatable)")
    r.add_argument("--fallback", action="append", default=[], metavar="TARGET",
                   help="tried in order when no weighted target has a ready backend "
                   "(repeatable)")
    r.add_argument("--guard-error-rate", type=_share, default=None, metavar="SHARE",
                   help="trip a target whose error rate over the window passes this")
    r.add_argument("--guard-p95-ttft-ms", type=_positive(float), default=None, metavar="MS",
                   help="trip a target whose p95 time to first token passes this")
    r.add_argument("--guard-window", type=_positive(float), default=60.0, metavar="SECONDS",
                   help="the guard's window (default 60)")
    r.add_argument("--guard-min-requests", type=_positive(int), default=20, metavar="N",
                   help="requests a window needs before the guard judges (default 20)")
    r.add_argument("--restore", action="append", default=[], metavar="TARGET",
                   help="give a target the guard tripped its weight back (repeatable)")
    ls = verbs.add_parser("routes", help="routes: split and each target's figures")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    u = verbs.add_parser("unroute", help="delete a route")
    u.add_argument("name", metavar="NAME")


def build_route(args: argparse.Namespace, now: float) -> RouteRecord:
    """The route the flags describe (without tripped targets); raises UsageError."""
    guard = None
    if args.guard_error_rate is not None or args.guard_p95_ttft_ms is not None:
        guard = RouteGuard(window_s=args.guard_window, min_requests=args.guard_min_requests,
                           max_error_rate=args.guard_error_rate,
                           max_p95_ttft_ms=args.guard_p95_ttft_ms)
    record = RouteRecord(name=args.name, targets=[RouteTarget(t, w) for t, w in args.to],
                         fallback=list(dict.fromkeys(args.fallback)), guard=guard,
                         created_at=now, updated_at=now)
    problem = route_problem(record)
    if problem:
        field, _, why = problem.removeprefix("field '").partition("': ")
        flag = {"name": "NAME", "targets": "--to", "guard": "--guard-*"}.get(field, field)
        raise UsageError(f"{flag}: {why}")
    return record


def describe(r: RouteRecord) -> str:
    """``a 90%, b 10%; fallback c; guard ...``: a route in one line."""
    tripped = {t.target for t in r.tripped}
    live = sum(t.weight for t in r.targets if t.target not in tripped)
    parts = [", ".join(
        f"{t.target} " + ("tripped" if t.target in tripped else
                          f"{100 * t.weight / live:.0f}%" if live else "0%")
        for t in r.targets)]
    if r.fallback:
        parts.append("fallback " + ", ".join(r.fallback))
    if r.guard is not None:
        parts.append("guard " + guard_text(r.guard))
    return "; ".join(parts)


def guard_text(g: RouteGuard) -> str:
    tests = []
    if g.max_error_rate is not None:
        tests.append(f"error rate > {g.max_error_rate:g}")
    if g.max_p95_ttft_ms is not None:
        tests.append(f"p95 TTFT > {g.max_p95_ttft_ms:g} ms")
    return f"{' or '.join(tests)} over {g.window_s:g}s (min {g.min_requests} requests)"


async def write_route(store: EtcdStore, keys: Keys, name: str, new: RouteRecord | None,
                      restore: Sequence[str]) -> tuple[str, RouteRecord]:
    """Create or replace the route (``new``), or only restore targets (``new`` None);
    returns ("created"|"updated"|"restored", the record written)."""
    key = keys.route(name)
    for _ in range(CAS_ATTEMPTS):
        kv = await store.get_item(key)
        old: RouteRecord | None = None
        if kv is not None:
            try:
                old = parse(kv.value, RouteRecord)
            except RecordError:
                old = None
        if new is None:
            if old is None:
                raise UsageError(f"no route {name}" if kv is None else
                                 f"{name}: its route record cannot be read; write it again "
                                 f"with 'aivmmctl route {name} --to ...'")
            record = dataclasses.replace(old, tripped=list(old.tripped), updated_at=time.time())
        else:
            record = new
            if old is not None:
                record.created_at = old.created_at or record.created_at
                keep = {t.target for t in record.targets} | set(record.fallback)
                record.tripped = [t for t in old.tripped if t.target in keep]
        unknown = [t for t in restore if t not in {x.target for x in record.tripped}]
        if unknown and new is None:
            raise UsageError(f"--restore: {', '.join(unknown)} not tripped in route {name}")
        record.tripped = [t for t in record.tripped if t.target not in restore]
        if new is None:
            verb, what = "restore", "restored"
            detail = f"restored {', '.join(restore)}: weight back to the configured one"
        else:
            verb, what = "route", "created" if kv is None else "updated"
            detail = f"{what}: {describe(record)}"
            if old is not None:
                detail = "updated: " + (audit.changed_fields(old, record) or "no field changed")
        change = audit.entry("aivmmctl", verb, name, old=old if old is not None else (
            None if kv is None else kv.value.decode(errors="replace")), new=record,
            detail=detail)
        result = await store.txn([Compare.modified(key, 0 if kv is None else kv.mod_revision)],
                                 puts=[(key, dump(record)), audit.audit_put(keys, change)])
        if result.succeeded:
            return what, record
    raise Conflict(name)


async def delete_route(store: EtcdStore, keys: Keys, name: str) -> None:
    key = keys.route(name)
    for _ in range(CAS_ATTEMPTS):
        kv = await store.get_item(key)
        if kv is None:
            raise UsageError(f"no route {name}")
        try:
            old: Any = parse(kv.value, RouteRecord)
        except RecordError:
            old = kv.value.decode(errors="replace")
        change = audit.entry("aivmmctl", "unroute", name, old=old,
                             detail="deleted: the name is no longer a route")
        result = await store.txn([Compare.modified(key, kv.mod_revision)], deletes=[key],
                                 puts=[audit.audit_put(keys, change)])
        if result.succeeded:
            return
    raise Conflict(name)


def _num(value: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if value is None else fmt.format(value)


def render_routes(views: list[dict[str, Any]], skipped: int, table: Table) -> str:
    """aivmmctl routes: one line per target, the split beside the figures."""
    rows = []
    for v in views:
        for t in v["targets"]:
            weight = "fallback " + str(t["fallback_rank"]) if t["weight"] is None else \
                str(t["weight"])
            trip = t["tripped"]
            rows.append([
                v["name"], t["target"], weight, f"{t['split_pct']:.1f}%",
                str(t["requests"]), _num(t["served_pct"], "{:.1f}%"), str(t["errors"]),
                _num(t["ttft_ms"]), _num(t["p95_ttft_ms"]), str(t["output_tokens"]),
                _num(t["tokens_per_s"]),
                f"TRIPPED {trip['reason']}" if trip else ""])
    out = [f"ROUTES ({len(views)})", table(
        ["ROUTE", "TARGET", "WEIGHT", "SPLIT", "REQUESTS", "SERVED", "ERRORS", "TTFT MS",
         "P95 MS", "TOKENS", "TOK/S", "GUARD"], rows)]
    guards = [f"{v['name']}: {guard_text(_guard(v['guard']))}" for v in views if v["guard"]]
    if guards:
        out += ["", "guards: " + "; ".join(guards)]
    replicas = max((v["replicas"] for v in views), default=0)
    out.append(f"figures summed over {replicas} scheduler replica(s) (since each started)")
    if skipped:
        out.append(f"warning: {skipped} record(s) could not be parsed and were skipped")
    return "\n".join(out)


def _guard(d: dict[str, Any]) -> RouteGuard:
    return RouteGuard(**d)


async def run(args: argparse.Namespace, endpoints: list[str], table: Table) -> int:
    """Run one route verb; StoreUnavailable propagates to main (exit 1)."""
    keys = Keys(args.prefix)
    try:
        async with EtcdStore(endpoints, timeout=args.timeout) as store:
            if args.verb == "route":
                new = build_route(args, time.time()) if args.to else None
                if new is None and not args.restore:
                    raise UsageError("--to: at least one TARGET=WEIGHT (or --restore TARGET)")
                what, record = await write_route(store, keys, args.name, new, args.restore)
                print(f"route {args.name} {what}: {describe(record)}")
            elif args.verb == "unroute":
                await delete_route(store, keys, args.name)
                print(f"route {args.name} deleted")
            else:
                records = await read_routes(store, keys)
                views = route_views(records.routes, records.stats)
                if args.json:
                    sys.stdout.write(orjson.dumps(
                        {"routes": views, "skipped": records.skipped},
                        option=orjson.OPT_INDENT_2).decode() + "\n")
                else:
                    print(render_routes(views, records.skipped, table))
    except UsageError as err:
        print(f"aivmmctl: {err}", file=sys.stderr)
        return EXIT_USAGE
    except Conflict as err:
        print(f"aivmmctl: route {err} kept changing while being written; try again",
              file=sys.stderr)
        return 1
    return 0
