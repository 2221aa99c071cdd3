"""aivmmctl's deployment verbs: deploy, scale, undeploy, deployments.

An operator writes only the desired state, ``{prefix}/deployments/{name}``; the elected
placer turns it into assignments and the agents into containers (docs/deployments.md).
Bad input exits 2 with one line naming the flag; an unreachable etcd exits 1 (main's
handler).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from common import audit
from common.deployview import (
    DeploymentRecords,
    deployment_views,
    download_text,
    gpus_text,
    parse_backends,
    pending_text,
    read_records,
)
from common.keys import Keys
from common.records import (
    NAME,
    POLICIES,
    VENDORS,
    AutoscalePolicy,
    DeploymentRecord,
    RecordError,
    autoscale_problem,
    deployment_problem,
    dump,
    parse,
)
from common.store import Compare, EtcdStore
from ctl.args import count

EXIT_USAGE = 2
ENGINES = ("auto", "vllm", "sglang", "openvino", "llamacpp", "ipex-llm", "sim", "custom")
VERBS = ("deploy", "scale", "undeploy", "deployments", "autoscale")
CAS_ATTEMPTS = 5

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")
_UNITS = {"": 1, "b": 1,
          "k": 2**10, "ki": 2**10, "kib": 2**10, "kb": 10**3,
          "m": 2**20, "mi": 2**20, "mib": 2**20, "mb": 10**6,
          "g": 2**30, "gi": 2**30, "gib": 2**30, "gb": 10**9,
          "t": 2**40, "ti": 2**40, "tib": 2**40, "tb": 10**12}
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# deployment_problem names record fields; the operator typed flags.
_FLAGS = {"name": "NAME", "model": "--model", "replicas": "--replicas", "gpus": "--gpus",
          "memory_bytes": "--memory", "cpus": "--cpus"}


Table = Callable[[Sequence[str], Sequence[Sequence[str]]], str]


class UsageError(Exception):
    """Bad input: main prints ``aivmmctl: <message>`` and exits 2."""


class Conflict(Exception):
    """The deployment kept changing under a compare-and-swap."""


# -- argument types ----------------------------------------------------------------------------

def parse_size(text: str) -> int:
    """Bytes from '20GiB', '20G', '512MiB', '1.5GiB' or plain '21474836480'.

    K/M/G/T with or without 'i'/'iB' are binary (GPU memory is counted in GiB); 'KB', 'MB',
    'GB', 'TB' are decimal.
    """
    m = _SIZE.match(text)
    unit = _UNITS.get(m.group(2).lower()) if m else None
    if m is None or unit is None:
        raise argparse.ArgumentTypeError(
            f"expected a size such as 20GiB, 512MiB or 21474836480, got {text!r}")
    return round(float(m.group(1)) * unit)


_count = count()


def _cores(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number of cores such as 4 or 0.5, got {text!r}") from None
    if not 0.01 <= value <= 4096:
        raise argparse.ArgumentTypeError(f"expected 0.01 to 4096 cores, got {text!r}")
    return value


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value


def _env(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not _ENV_NAME.match(key):
        raise argparse.ArgumentTypeError(
            f"expected NAME=VALUE (NAME of letters, digits and '_'), got {text!r}")
    return key, value


def _node(text: str) -> str:
    if not NAME.match(text):
        raise argparse.ArgumentTypeError(f"expected a node name, got {text!r}")
    return text


def join_arg_values(argv: Sequence[str]) -> list[str]:
    """``--arg X`` as ``--arg=X`` after the deploy verb, so an engine flag such as
    ``--arg --dtype`` is taken as the value it is rather than as an aivmmctl option."""
    if "deploy" not in argv:
        return list(argv)
    at = list(argv).index("deploy") + 1
    out: list[str] = list(argv[:at])
    it = iter(argv[at:])
    for token in it:
        if token == "--":
            out.append(token)
            out.extend(it)
            break
        if token == "--arg":
            value = next(it, None)
            out.append(token if value is None else f"--arg={value}")
        else:
            out.append(token)
    return out


def add_parsers(verbs: Any) -> None:
    """Register the deployment verbs on aivmmctl's subparsers."""
    d = verbs.add_parser("deploy", help="create or update a deployment (desired state)")
    d.add_argument("name", metavar="NAME", help="deployment name (letters, digits, . _ -)")
    d.add_argument("--model", required=True, help="the model id clients ask for")
    d.add_argument("--replicas", type=_count, default=1, help="replicas wanted (default 1)")
    d.add_argument("--engine", choices=ENGINES, default="auto",
                   help="engine (default auto: any engine for the chosen GPU's vendor)")
    d.add_argument("--vendor", action="append", choices=VENDORS, default=[],
                   help="allowed GPU vendor (repeatable; default any)")
    d.add_argument("--node", action="append", type=_node, default=[],
                   help="allowed node (repeatable; default any)")
    d.add_argument("--gpus", type=_count, default=None, help="whole GPUs per replica (1)")
    d.add_argument("--memory", type=parse_size, default=None, metavar="SIZE",
                   help="memory per replica on one shared GPU, e.g. 20GiB (not with --gpus)")
    d.add_argument("--label", action="append", type=_label, default=[], metavar="KEY=VALUE",
                   help="node label required (repeatable)")
    d.add_argument("--policy", choices=POLICIES, default="spread",
                   help="spread replicas over nodes, or binpack them (default spread)")
    d.add_argument("--image", help="container image (default: the engine's)")
    d.add_argument("--arg", action="append", default=[], metavar="ARG",
                   help="engine argument (repeatable; --arg --dtype or --arg=--dtype=half)")
    d.add_argument("--env", action="append", type=_env, default=[], metavar="NAME=VALUE",
                   help="container environment variable (repeatable)")
    d.add_argument("--cpus", type=_cores, default=None, metavar="CORES",
                   help="CPU quota per replica in cores, fractions allowed (default none)")
    s = verbs.add_parser("scale", help="change a deployment's replicas")
    s.add_argument("name", metavar="NAME")
    s.add_argument("replicas", metavar="N", type=_count)
    a = verbs.add_parser("autoscale", help="scale a deployment on load (docs/autoscaling.md)")
    a.add_argument("name", metavar="NAME")
    a.add_argument("--min", type=_count, default=None, dest="min_replicas",
                   help="fewest replicas, 0 allowed (default 0)")
    a.add_argument("--max", type=_count, default=None, dest="max_replicas",
                   help="most replicas (default 4)")
    a.add_argument("--target", type=_positive, default=None, dest="target_load",
                   help="requests in flight + queued per replica (default 8)")
    a.add_argument("--scale-down-delay", type=_seconds, default=None, metavar="SECONDS",
                   dest="scale_down_delay_s",
                   help="load below the target this long before a scale-down (default 60)")
    a.add_argument("--idle", type=_seconds, default=None, metavar="SECONDS",
                   dest="idle_seconds",
                   help="no request this long scales to zero when --min is 0 (default 300)")
    a.add_argument("--scale-up-delay", type=_seconds, default=None, metavar="SECONDS",
                   dest="scale_up_delay_s",
                   help="load above the target this long before a scale-up (default 2)")
    a.add_argument("--off", action="store_true",
                   help="stop autoscaling: the count is 'replicas' again (aivmmctl scale)")
    u = verbs.add_parser("undeploy", help="delete a deployment (its replicas are removed)")
    u.add_argument("name", metavar="NAME")
    ls = verbs.add_parser("deployments", help="deployments: desired, placed, ready, where")
    ls.add_argument("--json", action="store_true", help="machine-readable output")


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text!r}")
    return value


_POLICY_FLAGS = {"min_replicas": "--min", "max_replicas": "--max", "target_load": "--target",
                 "scale_down_delay_s": "--scale-down-delay", "idle_seconds": "--idle",
                 "scale_up_delay_s": "--scale-up-delay"}


def autoscale_policy(args: argparse.Namespace, old: AutoscalePolicy | None
                     ) -> AutoscalePolicy | None:
    """The policy the flags ask for: flags given over the deployment's current policy over
    the defaults; None with --off. Raises UsageError naming the flag."""
    if args.off:
        return None
    policy = dataclasses.replace(old) if old is not None else AutoscalePolicy()
    for field_name in _POLICY_FLAGS:
        value = getattr(args, field_name)
        if value is not None:
            setattr(policy, field_name, value)
    if args.max_replicas is None and policy.max_replicas < policy.min_replicas:
        policy.max_replicas = policy.min_replicas
    problem = autoscale_problem(policy)
    if problem:
        field_name, _, why = problem.removeprefix("field 'autoscale.").partition("': ")
        raise UsageError(f"{_POLICY_FLAGS.get(field_name, field_name)}: {why}")
    return policy


async def autoscale_deployment(store: EtcdStore, keys: Keys, args: argparse.Namespace
                               ) -> DeploymentRecord:
    """Set (or with --off remove) an existing deployment's autoscale policy, keeping every
    other field (compare-and-swap, with the audit entry in the same transaction)."""
    def edit(record: DeploymentRecord) -> str:
        old = dataclasses.replace(record)
        record.autoscale = autoscale_policy(args, record.autoscale)
        return audit.changed_fields(old, record) or "no field changed"

    return await _change_deployment(store, keys, args.name, "autoscale", edit)


async def _change_deployment(store: EtcdStore, keys: Keys, name: str, verb: str,
                             edit: Callable[[DeploymentRecord], str]) -> DeploymentRecord:
    """Read the deployment, ``edit`` it in place (returning the audit detail) and write it
    back only if nobody changed it meanwhile, with its audit entry in the same transaction;
    raises UsageError when it is absent or unreadable."""
    key = keys.deployment(name)
    for _ in range(CAS_ATTEMPTS):
        kv = await store.get_item(key)
        if kv is None:
            raise UsageError(f"no deployment {name}")
        try:
            record = parse(kv.value, DeploymentRecord)
        except RecordError as err:
            raise UsageError(f"{name}: its deployment record cannot be read ({err}); "
                             f"write it again with 'aivmmctl deploy {name} ...'") from None
        old = dataclasses.replace(record)
        detail = edit(record)
        record.updated_at = time.time()
        change = audit.entry("aivmmctl", verb, name, old=old, new=record, detail=detail)
        if await _put_if_unchanged(store, key, dump(record), kv.mod_revision,
                                   audit.audit_put(keys, change)):
            return record
    raise Conflict(name)


def build_record(args: argparse.Namespace, now: float) -> DeploymentRecord:
    """The deployment the flags describe; raises UsageError naming the flag."""
    if args.gpus is not None and args.memory is not None:
        raise UsageError("--memory: cannot be combined with --gpus (a replica takes either "
                         "whole GPUs or memory of one shared GPU)")
    record = DeploymentRecord(
        name=args.name, model=args.model, engine=args.engine, replicas=args.replicas,
        gpus=1 if args.gpus is None else args.gpus, memory_bytes=args.memory,
        vendors=list(dict.fromkeys(args.vendor)), nodes=list(dict.fromkeys(args.node)),
        labels=dict(args.label), image=args.image or None, args=list(args.arg),
        env=dict(args.env), placement=args.policy, cpus=args.cpus, created_at=now,
        updated_at=now)
    problem = deployment_problem(record)
    if problem:
        field, _, why = problem.removeprefix("field '").partition("': ")
        flag = _FLAGS.get(field, field)
        value = {"NAME": args.name, "--model": args.model}.get(flag)
        raise UsageError(f"{flag}: {why}" + ("" if value is None else f", got {value!r}"))
    return record


# -- etcd ----------------------------------------------------------------------------------------

async def _put_if_unchanged(store: EtcdStore, key: str, value: bytes, mod_revision: int,
                            audit: tuple[str, bytes]) -> bool:
    """Write ``key`` and its audit entry, in one transaction, only if the key was last
    written at ``mod_revision`` (0: still absent)."""
    result = await store.txn([Compare.modified(key, mod_revision)],
                             puts=[(key, value), audit])
    return result.succeeded


def _old_record(raw: bytes) -> DeploymentRecord | Any:
    """The record being replaced, for the audit entry (its raw JSON if it does not parse)."""
    try:
        return parse(raw, DeploymentRecord)
    except RecordError:
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            return raw.decode(errors="replace")


async def write_deployment(store: EtcdStore, keys: Keys, record: DeploymentRecord) -> bool:
    """Create or replace the deployment, keeping an existing record's created_at; True when
    it was created. The audit entry is written in the same transaction."""
    key = keys.deployment(record.name)
    for _ in range(CAS_ATTEMPTS):
        kv = await store.get_item(key)
        old: Any = None
        if kv is not None:
            old = _old_record(kv.value)
            try:  # a record that fails today's checks still tells when it was created
                record.created_at = parse(kv.value, DeploymentRecord).created_at or \
                    record.updated_at
            except RecordError:
                record.created_at = record.updated_at
        if old is None:
            detail = f"created: {record.replicas} replica(s) of {record.model}"
        elif isinstance(old, DeploymentRecord):
            detail = "updated: " + (audit.changed_fields(old, record) or "no field changed")
        else:
            detail = "updated (the old record did not parse)"
        change = audit.entry("aivmmctl", "deploy", record.name, old=old, new=record,
                             detail=detail)
        if await _put_if_unchanged(store, key, dump(record),
                                   0 if kv is None else kv.mod_revision,
                                   audit.audit_put(keys, change)):
            return kv is None
    raise Conflict(record.name)


async def scale_deployment(store: EtcdStore, keys: Keys, name: str, replicas: int
                           ) -> tuple[int, int]:
    """Set the replicas of an existing deployment, keeping every other field as it is now
    (compare-and-swap, with the audit entry in the same transaction). Returns (before,
    after); raises UsageError when it is absent."""
    before = 0

    def edit(record: DeploymentRecord) -> str:
        nonlocal before
        before, record.replicas = record.replicas, replicas
        return f"replicas {before} -> {replicas}"

    await _change_deployment(store, keys, name, "scale", edit)
    return before, replicas


async def delete_deployment(store: EtcdStore, keys: Keys, name: str) -> None:
    """Delete the deployment and write its audit entry in one transaction; raises
    UsageError when it is absent."""
    key = keys.deployment(name)
    for _ in range(CAS_ATTEMPTS):
        kv = await store.get_item(key)
        if kv is None:
            raise UsageError(f"no deployment {name}")
        change = audit.entry("aivmmctl", "undeploy", name, old=_old_record(kv.value),
                             detail="deleted: its replicas are removed")
        result = await store.txn([Compare.modified(key, kv.mod_revision)], deletes=[key],
                                 puts=[audit.audit_put(keys, change)])
        if result.succeeded:
            return
    raise Conflict(name)


async def read_views(store: EtcdStore, keys: Keys) -> tuple[list[dict[str, Any]], int]:
    """The deployment views (common.deployview) and how many records did not parse."""
    records: DeploymentRecords = await read_records(store, keys)
    backend_snap = await store.get_prefix(keys.backends)
    backends, bad = parse_backends(kv.value for kv in backend_snap.items)
    return deployment_views(records, backends), records.skipped + bad


# -- output --------------------------------------------------------------------------------------

def render_summary(views: list[dict[str, Any]], table: Table) -> str:
    """aivmmctl status's DEPLOYMENTS section."""
    return "\n".join([f"DEPLOYMENTS ({len(views)})", table(
        ["NAME", "MODEL", "DESIRED/PLACED/READY", "PENDING"],
        [[v["name"], v["model"], f"{v['desired']}/{v['placed']}/{v['ready']}",
          pending_text(v)] for v in views])])


def render_deployments(views: list[dict[str, Any]], skipped: int, table: Table) -> str:
    """aivmmctl deployments: one line per deployment, then one per replica."""
    out = [f"DEPLOYMENTS ({len(views)})", table(
        ["NAME", "MODEL", "ENGINE", "POLICY", "DESIRED", "PLACED", "READY", "PENDING"],
        [[v["name"], v["model"], v["engine"], v["policy"], str(v["desired"]),
          str(v["placed"]), str(v["ready"]), pending_text(v)] for v in views])]
    rows = [[v["name"], "-" if r["replica"] is None else str(r["replica"]), r["node"],
             r["vendor"] or "-", gpus_text(r), r["backend"],
             (_state_text(r) + ("" if r.get("current", True) else " (old generation)"))
             if r["assigned"] else f"{r['state']} (removing)",
             r["error"] or ""]
            for v in views for r in v["replicas"]]
    out += ["", f"REPLICAS ({len(rows)})",
            table(["DEPLOYMENT", "REPLICA", "NODE", "VENDOR", "GPUS", "BACKEND", "STATE",
                   "ERROR"], rows)]
    if skipped:
        out += ["", f"warning: {skipped} record(s) could not be parsed and were skipped"]
    return "\n".join(out)


def _state_text(replica: dict[str, Any]) -> str:
    if replica["state"] == "downloading":
        return download_text(replica.get("bytes_done"), replica.get("bytes_total"),
                             replica.get("download_rate"))
    return str(replica["state"] or "assigned")


async def run(args: argparse.Namespace, endpoints: list[str], table: Table) -> int:
    """Run one deployment verb; StoreUnavailable propagates to main (exit 1)."""
    keys = Keys(args.prefix)
    try:
        record = build_record(args, time.time()) if args.verb == "deploy" else None
        async with EtcdStore(endpoints, timeout=args.timeout) as store:
            if record is not None:
                created = await write_deployment(store, keys, record)
                print(f"deployment {record.name} {'created' if created else 'updated'}: "
                      f"{record.replicas} replica(s) of {record.model}")
            elif args.verb == "scale":
                before, after = await scale_deployment(store, keys, args.name, args.replicas)
                print(f"deployment {args.name} scaled: {before} -> {after} replica(s)")
            elif args.verb == "autoscale":
                done = await autoscale_deployment(store, keys, args)
                a = done.autoscale
                print(f"deployment {done.name}: autoscaling off, {done.replicas} replica(s)"
                      if a is None else
                      f"deployment {done.name} autoscaled: {a.min_replicas}..{a.max_replicas} "
                      f"replicas, target {a.target_load:g} requests each, scale down after "
                      f"{a.scale_down_delay_s:g}s, idle {a.idle_seconds:g}s")
            elif args.verb == "undeploy":
                await delete_deployment(store, keys, args.name)
                print(f"deployment {args.name} deleted: its replicas are being removed")
            else:
                views, skipped = await read_views(store, keys)
                if args.json:
                    sys.stdout.write(_json({"deployments": views, "skipped": skipped}))
                else:
                    print(render_deployments(views, skipped, table))
    except UsageError as err:
        print(f"aivmmctl: {err}", file=sys.stderr)
        return EXIT_USAGE
    except Conflict as err:
        print(f"aivmmctl: deployment {err} kept changing while being written; try again",
              file=sys.stderr)
        return 1
    return 0


def _json(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_INDENT_2).decode() + "\n"
