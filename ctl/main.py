"""aivmmctl: the operator's view of the cluster, read straight from etcd."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import orjson

from common.keys import Keys
from common.records import BackendRecord, NodeRecord, RecordError, parse_backend, parse_node
from common.store import EtcdStore, StoreUnavailable

EXIT_UNREACHABLE = 1


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
           now: float) -> str:
    """The human-readable status: nodes, GPUs, backends."""
    out = [f"NODES ({len(nodes)})"]
    out.append(table(
        ["NODE", "GPUS", "AGENT", "HEARTBEAT"],
        [[n.node, str(len(n.gpus)), n.agent_version, f"{max(0.0, now - n.heartbeat_at):.0f}s ago"]
         for n in nodes]))
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
    backend_rows = []
    for b in backends:
        load = "-"
        if b.load is not None:
            load = f"run {_num(b.load.running)} wait {_num(b.load.waiting)}"
        backend_rows.append([
            f"{b.node}/{b.name}", ",".join(b.models), b.state, b.engine,
            _num(b.probe_latency_ms, "{:.1f}ms"), load, b.url, b.error or ""])
    out += ["", f"BACKENDS ({len(backends)})",
            table(["BACKEND", "MODELS", "STATE", "ENGINE", "LATENCY", "LOAD", "URL", "ERROR"],
                  backend_rows)]
    if skipped:
        out += ["", f"warning: {skipped} record(s) could not be parsed and were skipped"]
    return "\n".join(out)


async def fetch(endpoints: list[str], prefix: str, deadline: float) -> dict[str, Any]:
    keys = Keys(prefix)
    store = EtcdStore(endpoints, timeout=deadline)
    try:
        await store.connect()
        node_snap = await store.get_prefix(keys.nodes)
        backend_snap = await store.get_prefix(keys.backends)
    finally:
        await store.close()
    nodes, backends, skipped = [], [], 0
    for kv in node_snap.items:
        try:
            nodes.append(parse_node(kv.value))
        except RecordError:
            skipped += 1
    for kv in backend_snap.items:
        try:
            backends.append(parse_backend(kv.value))
        except RecordError:
            skipped += 1
    return {"nodes": nodes, "backends": backends, "skipped": skipped}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="aivmmctl", description="Inspect an aivmm cluster.")
    parser.add_argument("--etcd", default=os.environ.get("AIVMM_ETCD", "http://127.0.0.1:2379"),
                        metavar="URL[,URL...]", help="etcd endpoints (env AIVMM_ETCD)")
    parser.add_argument("--prefix", default=os.environ.get("AIVMM_ETCD_PREFIX", "/aivmm/v1"),
                        help="etcd key prefix (env AIVMM_ETCD_PREFIX)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for etcd")
    verbs = parser.add_subparsers(dest="verb", required=True)
    status = verbs.add_parser("status", help="nodes, GPUs and backends")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)

    endpoints = [u.strip() for u in args.etcd.split(",") if u.strip()]
    try:
        view = asyncio.run(fetch(endpoints, args.prefix, args.timeout))
    except StoreUnavailable:
        print(f"aivmmctl: cannot reach etcd at {', '.join(endpoints)}", file=sys.stderr)
        return EXIT_UNREACHABLE
    if args.json:
        sys.stdout.write(orjson.dumps(view, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print(render(view["nodes"], view["backends"], view["skipped"], time.time()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
