"""aivmmctl models: what each node's models_dir holds, and removing an unused model.

``aivmmctl models [--json]`` reads the agents' ``{prefix}/models/{node}`` records;
``aivmmctl models rm NODE MODEL`` writes a removal request (with its audit entry, in one
transaction) that the node's agent acts on: it deletes the files unless one of its backends
uses the model or it is being fetched, records why in the audit trail and deletes the
request (docs/models.md).
"""

from __future__ import annotations

import asyncio
import datetime
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from common import audit
from common.keys import Keys
from common.records import (
    ModelRemoval,
    ModelsRecord,
    dump,
    parse_each,
    parse_models,
    to_dict,
)
from common.store import Compare, EtcdStore

VERBS = ("models",)
EXIT_USAGE = 2
WAIT_S = 15.0
Table = Callable[[Sequence[str], Sequence[Sequence[str]]], str]


def add_parsers(verbs: Any) -> None:
    m = verbs.add_parser("models", help="models in each node's models_dir; 'rm' removes one")
    m.add_argument("--json", action="store_true", help="machine-readable output")
    sub = m.add_subparsers(dest="models_verb")
    rm = sub.add_parser("rm", help="delete a model no backend uses from a node's models_dir")
    rm.add_argument("node")
    rm.add_argument("model")
    rm.add_argument("--wait", type=float, default=WAIT_S, metavar="SECONDS",
                    help=f"how long to wait for the agent (default {WAIT_S:g})")


async def read_models(store: EtcdStore, keys: Keys) -> tuple[list[ModelsRecord], int]:
    snap = await store.get_prefix(keys.models)
    out, bad = parse_each((kv.value for kv in snap.items), parse_models)
    return sorted(out, key=lambda r: r.node), bad


def _size(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def _when(t: float | None) -> str:
    return "never" if t is None else datetime.datetime.fromtimestamp(t).strftime(
        "%Y-%m-%d %H:%M")


def render(records: list[ModelsRecord], skipped: int, table: Table) -> str:
    rows = [[r.node, c.model, c.state, _size(c.size_bytes), _when(c.last_used),
             ",".join(c.in_use) or "-"] for r in records for c in r.models]
    out = [f"MODELS ({len(rows)})",
           table(["NODE", "MODEL", "STATE", "SIZE", "LAST USED", "IN USE BY"], rows)]
    storages: dict[str, list[ModelsRecord]] = {}
    for r in records:
        storages.setdefault(r.storage, []).append(r)
    out += ["", f"STORAGE ({len(storages)})", table(
        ["STORAGE", "NODES", "MODELS_DIR", "FREE"],
        [[sid, ",".join(r.node for r in rs), rs[0].models_dir, _size(rs[0].free_bytes)]
         for sid, rs in sorted(storages.items())])]
    if skipped:
        out += ["", f"warning: {skipped} record(s) could not be parsed and were skipped"]
    return "\n".join(out)


async def remove(store: EtcdStore, keys: Keys, node: str, model: str, wait: float
                 ) -> tuple[int, str]:
    records, _ = await read_models(store, keys)
    mine = next((r for r in records if r.node == node), None)
    if mine is None:
        return EXIT_USAGE, f"no models record of node {node!r} (is its agent running?)"
    copy = next((c for c in mine.models if c.model == model), None)
    if copy is None:
        return EXIT_USAGE, f"{node} holds no model {model!r}"
    if copy.in_use:
        return EXIT_USAGE, f"{model} is in use on {node} by {', '.join(copy.in_use)}"
    key = keys.model_removal(node, model)
    request = ModelRemoval(node=node, model=model, requested_at=time.time(),
                           actor=audit.actor())
    change = audit.entry("aivmmctl", "model-rm", f"{node}/{model}", new=request,
                         detail=f"asked {node} to remove {model} ({_size(copy.size_bytes)})")
    await store.txn([Compare.created(key, 0)],
                    puts=[(key, dump(request)), audit.audit_put(keys, change)])
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if await store.get(key) is None:
            break
        await asyncio.sleep(0.2)
    else:
        return 1, f"{node}'s agent has not acted on the request yet (it stays queued)"
    records, _ = await read_models(store, keys)
    mine = next((r for r in records if r.node == node), None)
    left = mine is not None and any(c.model == model for c in mine.models)
    if left:
        return 1, f"{node} did not remove {model} (see 'aivmmctl audit --target {node}')"
    return 0, f"{model} removed from {node} ({_size(copy.size_bytes)} freed)"


async def run(args: Any, endpoints: list[str], table: Table) -> int:
    keys = Keys(args.prefix)
    async with EtcdStore(endpoints, timeout=args.timeout) as store:
        if args.models_verb == "rm":
            code, text = await remove(store, keys, args.node, args.model, args.wait)
            print(text if code == 0 else f"aivmmctl: {text}",
                  file=sys.stdout if code == 0 else sys.stderr)
            return code
        records, skipped = await read_models(store, keys)
    if args.json:
        sys.stdout.write(orjson.dumps({"nodes": [to_dict(r) for r in records],
                                       "skipped": skipped},
                                      option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print(render(records, skipped, table))
    return 0
