"""aivmmctl: the operator's view of the cluster, read straight from etcd."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, NoReturn

import orjson

from common import audit
from common.cli import VersionAction
from common.config import check_etcd_security, read_etcd_security
from common.deployview import deployment_views, download_text, parse_backends, read_records
from common.endpoints import etcd_target
from common.keys import Keys
from common.records import (
    AuditEntry,
    BackendRecord,
    DrainRecord,
    NodeRecord,
    RecordError,
    dump,
    parse_drain,
    parse_each,
    parse_node,
)
from common.routeview import backend_costs, read_routes, route_views
from common.store import Compare, EtcdStore, StoreError, StoreUnavailable
from ctl import deployments, etcdroles, models, routes
from ctl import keys as keyverbs
from ctl.args import count

EXIT_UNREACHABLE = 1
EXIT_USAGE = 2


def _gib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**30:.1f}"


def _num(value: float | None, fmt: str = "{:.0f}") -> str:
    return "-" if value is None else fmt.format(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns, two spaces apart, a header line first."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=False)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in [headers, *rows]]
    return "\n".join(lines)


def render(nodes: list[NodeRecord], backends: list[BackendRecord], skipped: int,
           now: float, drained: Sequence[str] = (),
           deployment_views: Sequence[dict[str, Any]] = (),
           route_views: Sequence[dict[str, Any]] = (),
           costs: Sequence[dict[str, Any]] = ()) -> str:
    """The human-readable status: nodes, GPUs, backends, and deployments, routes and costs
    when there are."""
    out = [f"NODES ({len(nodes)})"]
    out.append(table(
        ["NODE", "GPUS", "AGENT", "HEARTBEAT", "COST/H", ""],
        [[n.node, str(len(n.gpus)), n.agent_version, f"{max(0.0, now - n.heartbeat_at):.0f}s ago",
          _num(n.cost_per_hour, "{:.2f}"), "drained" if n.node in drained else ""]
         for n in nodes]))
    gone = [d for d in drained if d not in {n.node for n in nodes}]
    if gone:
        out.append(f"drained, not running: {', '.join(gone)}")
    gpu_rows = [
        [n.node, str(g.index), g.vendor, g.name, f"{_gib(g.memory_used_bytes)}/"
         f"{_gib(g.memory_total_bytes)}", _num(None if g.utilization is None
                                                else g.utilization * 100, "{:.0f}%"),
         _num(g.temperature_c, "{:.0f}C"), _num(g.power_w, "{:.0f}W"),
         "integrated" if g.integrated else ""]
        for n in nodes for g in n.gpus]
    out += ["", f"GPUS ({len(gpu_rows)})",
            table(["NODE", "IDX", "VENDOR", "NAME", "MEM GiB", "UTIL", "TEMP", "POWER", ""],
                  gpu_rows)]
    out += ["", f"BACKENDS ({len(backends)})", render_backends(backends)]
    if deployment_views:
        out += ["", deployments.render_summary(list(deployment_views), table)]
    if route_views:
        out += ["", routes.render_routes(list(route_views), 0, table)]
    priced = [c for c in costs if c["cost_per_hour"] is not None]
    if priced:
        out += ["", f"COSTS ({len(priced)})", table(
            ["BACKEND", "COST/H", "OUTPUT TOKENS", "TOK/S", "COST/MTOK"],
            [[c["backend"], f"{c['cost_per_hour']:.3f}", str(c["output_tokens"]),
              _num(c["tokens_per_s"], "{:.1f}"), _num(c["cost_per_mtok"], "{:.3f}")]
             for c in priced])]
    if skipped:
        out += ["", f"warning: {skipped} record(s) could not be parsed and were skipped"]
    return "\n".join(out)


async def fetch(endpoints: list[str], prefix: str, deadline: float) -> dict[str, Any]:
    """Nodes, backends, drain requests and deployments as etcd has them now."""
    keys = Keys(prefix)
    async with EtcdStore(endpoints, timeout=deadline) as store:
        node_snap = await store.get_prefix(keys.nodes)
        backend_snap = await store.get_prefix(keys.backends)
        drain_snap = await store.get_prefix(keys.drains)
        records = await read_records(store, keys)
        routed = await read_routes(store, keys)
    nodes, skipped = parse_each((kv.value for kv in node_snap.items), parse_node)
    backends, bad = parse_backends(kv.value for kv in backend_snap.items)
    drained = sorted(kv.key.removeprefix(keys.drains) for kv in drain_snap.items)
    return {"nodes": nodes, "backends": backends, "drained": drained,
            "deployments": deployment_views(records, backends),
            "routes": route_views(routed.routes, routed.stats),
            "costs": backend_costs(nodes, backends, routed.stats),
            "skipped": skipped + bad + records.skipped + routed.skipped}


def render_backends(backends: list[BackendRecord]) -> str:
    """One line per backend: state, model, latency, engine queue."""
    rows = []
    for b in backends:
        load = "-"
        if b.load is not None:
            load = f"run {_num(b.load.running)} wait {_num(b.load.waiting)}"
        state = download_text(b.bytes_done, b.bytes_total, b.download_rate) \
            if b.state == "downloading" else b.state
        rows.append([f"{b.node}/{b.name}", ",".join(b.models), state, b.engine,
                     _num(b.probe_latency_ms, "{:.1f}ms"), load, b.url, b.error or ""])
    return table(["BACKEND", "MODELS", "STATE", "ENGINE", "LATENCY", "LOAD", "URL", "ERROR"],
                 rows)


def file_sd(nodes: list[NodeRecord]) -> list[dict[str, Any]]:
    """Prometheus file_sd targets for the agents, from the ``agent_url`` of node records."""
    groups = []
    for n in sorted(nodes, key=lambda n: n.node):
        if not n.agent_url:
            continue
        target = n.agent_url.split("://", 1)[-1].rstrip("/")
        groups.append({"targets": [target], "labels": {"node": n.node}})
    return groups


async def set_drain(endpoints: list[str], prefix: str, deadline: float, node: str,
                    reason: str | None) -> bool:
    """Write (reason given) or delete the drain key, with its audit entry in the same
    transaction; True when the node has a record. Undraining a node that is not drained
    changes nothing and records nothing."""
    keys = Keys(prefix)
    key = keys.drain(node)
    async with EtcdStore(endpoints, timeout=deadline) as store:
        known = await store.get(keys.node(node)) is not None
        for _ in range(deployments.CAS_ATTEMPTS):
            kv = await store.get_item(key)
            old: Any = None
            if kv is not None:
                try:
                    old = parse_drain(kv.value)
                except RecordError:
                    old = kv.value.decode(errors="replace")
            if reason is None:
                if kv is None:
                    return known
                change = audit.entry("aivmmctl", "undrain", node, old=old,
                                     detail="undrained: its backends run again")
                result = await store.txn([Compare.modified(key, kv.mod_revision)],
                                         deletes=[key], puts=[audit.audit_put(keys, change)])
            else:
                record = DrainRecord(node=node, requested_at=time.time(), reason=reason or None)
                change = audit.entry("aivmmctl", "drain", node, old=old, new=record,
                                     detail=f"drained: {reason or 'no reason given'}")
                result = await store.txn(
                    [Compare.modified(key, 0 if kv is None else kv.mod_revision)],
                    puts=[(key, dump(record)), audit.audit_put(keys, change)])
            if result.succeeded:
                return known
    raise deployments.Conflict(node)


async def read_audit(endpoints: list[str], prefix: str, deadline: float
                     ) -> tuple[list[AuditEntry], int]:
    """Every audit entry, oldest first, and how many did not parse."""
    keys = Keys(prefix)
    async with EtcdStore(endpoints, timeout=deadline) as store:
        snap = await store.get_prefix(keys.audit)
    return audit.parse_entries((kv.key, kv.value) for kv in snap.items)


def show_audit(args: argparse.Namespace, endpoints: list[str]) -> int:
    """aivmmctl audit: the trail, filtered, newest last (StoreUnavailable goes to main)."""
    try:
        since = None if args.since is None else audit.parse_since(args.since, time.time())
    except ValueError as err:
        print(f"aivmmctl: --since: {err}", file=sys.stderr)
        return EXIT_USAGE
    entries, skipped = asyncio.run(read_audit(endpoints, args.prefix, args.timeout))
    chosen = [e for e in entries if audit.matches(e, since=since, target=args.target)]
    if args.limit:
        chosen = chosen[-args.limit:]
    if args.json:
        sys.stdout.write(_json({"entries": chosen, "skipped": skipped}))
        return 0
    print(f"AUDIT ({len(chosen)})")
    print(table(["TIME", "ACTOR", "VERB", "TARGET", "DETAIL/CHANGE"], audit.render_rows(chosen)))
    if skipped:
        print(f"warning: {skipped} entr(ies) could not be parsed and were skipped")
    return 0


_limit = count("0: all")


class Parser(argparse.ArgumentParser):
    """Bad input is one line naming the flag, exit 2 (not argparse's usage block)."""

    def error(self, message: str) -> NoReturn:
        print(f"aivmmctl: {message.removeprefix('argument ')}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="aivmmctl", description="Inspect and steer an aivmm cluster.")
    p.add_argument("--version", action=VersionAction)
    p.add_argument("--etcd", default=os.environ.get("AIVMM_ETCD", "http://127.0.0.1:2379"),
                   metavar="URL[,URL...]", help="etcd endpoints (env AIVMM_ETCD)")
    p.add_argument("--prefix", default=os.environ.get("AIVMM_ETCD_PREFIX", "/aivmm/v1"),
                   help="etcd key prefix (env AIVMM_ETCD_PREFIX)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for etcd")
    env = os.environ.get
    p.add_argument("--etcd-ca", default=env("AIVMM_ETCD_CA"), metavar="FILE",
                   help="CA of etcd's server certificate, for https:// (env AIVMM_ETCD_CA)")
    p.add_argument("--etcd-cert", default=env("AIVMM_ETCD_CERT"), metavar="FILE",
                   help="client certificate for mutual TLS (env AIVMM_ETCD_CERT)")
    p.add_argument("--etcd-key", default=env("AIVMM_ETCD_KEY"), metavar="FILE",
                   help="its private key (env AIVMM_ETCD_KEY)")
    p.add_argument("--etcd-user", default=env("AIVMM_ETCD_USER"), metavar="USER",
                   help="etcd user (env AIVMM_ETCD_USER)")
    p.add_argument("--etcd-password-file", default=env("AIVMM_ETCD_PASSWORD_FILE"),
                   metavar="FILE", help="file holding the user's password (env "
                   "AIVMM_ETCD_PASSWORD_FILE; or AIVMM_ETCD_PASSWORD holds it)")
    verbs = p.add_subparsers(dest="verb", required=True)
    status = verbs.add_parser("status", help="nodes, GPUs and backends")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    backends = verbs.add_parser("backends", help="backends, optionally of one model")
    backends.add_argument("--model", help="only the backends serving this model")
    backends.add_argument("--json", action="store_true", help="machine-readable output")
    drain = verbs.add_parser("drain", help="stop a node's backends until undrained")
    drain.add_argument("node")
    drain.add_argument("--reason", default="", help="shown in the backends' error")
    undrain = verbs.add_parser("undrain", help="let a drained node run its backends again")
    undrain.add_argument("node")
    targets = verbs.add_parser("prometheus-targets",
                               help="Prometheus file_sd JSON of every agent, from etcd")
    targets.add_argument("--output", "-o", help="file to write (atomically); default stdout")
    deployments.add_parsers(verbs)
    routes.add_parsers(verbs)
    keyverbs.add_parsers(verbs)
    models.add_parsers(verbs)
    etcdroles.add_parser(verbs)
    trail = verbs.add_parser("audit", help="who changed what and when (the audit trail)")
    trail.add_argument("--since", metavar="AGE|DATE",
                       help="only entries since then: 30m, 1h, 2d, 1w or an ISO date")
    trail.add_argument("--target", metavar="NAME",
                       help="only entries about this deployment or node (and its backends)")
    trail.add_argument("--limit", type=_limit, default=50, metavar="N",
                       help="the newest N entries (default 50; 0: all)")
    trail.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def _json(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_INDENT_2).decode() + "\n"


def _security(args: argparse.Namespace, endpoints: list[str]) -> str | None:
    """Check the --etcd-* flags and make every store of this run present them; the
    problem (one line naming the flag) when they cannot be used."""
    flags = {k: "--" + k.replace("_", "-") for k in
             ("etcd", "etcd_ca", "etcd_cert", "etcd_key", "etcd_user", "etcd_password_file")}
    given = argparse.Namespace(etcd=endpoints, etcd_ca=args.etcd_ca, etcd_cert=args.etcd_cert,
                               etcd_key=args.etcd_key, etcd_user=args.etcd_user,
                               etcd_password_file=args.etcd_password_file)
    try:
        check_etcd_security(given, keys=flags)
    except ValueError as err:
        flag, _, expected = str(err).partition(": ")
        return f"{flag}: expected {expected}"
    EtcdStore.default_security = read_etcd_security(
        args.etcd_ca, args.etcd_cert, args.etcd_key, args.etcd_user, args.etcd_password_file)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    finally:
        EtcdStore.default_security = None  # set from this run's flags only


def _main(argv: Sequence[str] | None) -> int:
    args = parser().parse_args(deployments.join_arg_values(
        sys.argv[1:] if argv is None else argv))
    endpoints = [u.strip() for u in args.etcd.split(",") if u.strip()]
    for url in endpoints:
        try:
            etcd_target(url)
        except ValueError as err:
            print(f"aivmmctl: --etcd: {err}", file=sys.stderr)
            return EXIT_USAGE
    problem = _security(args, endpoints)
    if problem:
        print(f"aivmmctl: {problem}", file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.verb in deployments.VERBS:
            return asyncio.run(deployments.run(args, endpoints, table))
        if args.verb in routes.VERBS:
            return asyncio.run(routes.run(args, endpoints, table))
        if args.verb in keyverbs.VERBS:
            return asyncio.run(keyverbs.run(args, endpoints, table))
        if args.verb in models.VERBS:
            return asyncio.run(models.run(args, endpoints, table))
        if args.verb == "etcd-roles":
            return asyncio.run(etcdroles.run(args, endpoints))
        if args.verb == "audit":
            return show_audit(args, endpoints)
        if args.verb in ("drain", "undrain"):
            known = asyncio.run(set_drain(endpoints, args.prefix, args.timeout, args.node,
                                          args.reason if args.verb == "drain" else None))
            done = ("drained: its agent stops its backends until 'aivmmctl undrain "
                    f"{args.node}'" if args.verb == "drain"
                    else "undrained: its agent starts its backends again")
            print(f"{args.node} {done}")
            if not known:
                print(f"aivmmctl: note: no node {args.node!r} is registered now; its agent "
                      "will follow this when it starts", file=sys.stderr)
            return 0
        view = asyncio.run(fetch(endpoints, args.prefix, args.timeout))
    except StoreUnavailable:
        print(f"aivmmctl: cannot reach etcd at {', '.join(endpoints)}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except StoreError as err:  # refused: credentials, permissions (docs/security.md)
        print(f"aivmmctl: etcd refused the request: {err}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except deployments.Conflict as err:
        print(f"aivmmctl: the drain request of {err} kept changing while being written; "
              "try again", file=sys.stderr)
        return 1
    if args.verb == "prometheus-targets":
        text = _json(file_sd(view["nodes"]))
        if args.output:
            tmp = f"{args.output}.tmp"
            try:
                with open(tmp, "w") as f:
                    f.write(text)
                os.replace(tmp, args.output)  # Prometheus never reads a half-written file
            except OSError as err:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                print(f"aivmmctl: cannot write {args.output}: {err.strerror or err}",
                      file=sys.stderr)
                return 1
        else:
            sys.stdout.write(text)
        return 0
    if args.verb == "backends":
        chosen = [b for b in view["backends"] if args.model is None or args.model in b.models]
        if args.json:
            sys.stdout.write(_json(chosen))
        elif not chosen and args.model:
            print(f"no backend serves {args.model!r}")
        else:
            print(render_backends(chosen))
        return 0
    if args.json:
        sys.stdout.write(_json(view))
    else:
        print(render(view["nodes"], view["backends"], view["skipped"], time.time(),
                     view["drained"], view["deployments"], view["routes"], view["costs"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
