"""Fleet deployments: an elected placer turning deployments into assignments at fleet scale.

A private etcd; ``--nodes`` simulated nodes published by the agent's own
``agent.health.heartbeat.Heartbeat`` (as bench/fleet.py does: one lease per node, the node
record rewritten every ``--interval`` s, lease TTL ``--node-ttl``), each with ``--gpus`` GPUs
of one vendor and memory size per node (the mixed fleet of bench/placement.py), no backends.
Two placers, A then B, each its own process (``Placer(EtcdStore, Keys(prefix), holder,
ttl=--placer-ttl).run()``, what a scheduler runs), so that each one's CPU is read from
/proc and the leader can be SIGKILLed. Then:

1. deploy: ``--deployments`` DeploymentRecords adding up to ``--replicas`` (one etcd
   transaction); time until every replica's assignment is in etcd (the placer's own stamp
   of its last acknowledged write; the bench's watch confirms it, and lags when it is busy),
   writes per replica (counted by the placer, cross-checked against etcd's put counter
   minus the bench's own puts) and the leader's CPU seconds; then the leader's CPU and
   passes per second while the fleet only heartbeats;
2. node loss: the node holding the most replicas stops heartbeating and its lease is
   revoked (its record vanishes as at a lease expiry); time until its replicas are
   assigned elsewhere. A real loss is seen only at the expiry: total = node TTL + that;
3. placer loss: SIGKILL the leader and write a new deployment at once; time until the
   standby leads and has placed it. The standby waits for the dead leader's lease to expire
   (``--placer-ttl``), then loads the whole prefix.

    .venv/bin/python -m bench.deployments [--nodes 1000 --gpus 8 --replicas 2000 \
        --deployments 50]

Prints a Markdown table. Nothing here is asserted. The expected result of each step comes from
the pure ``place()`` over the same inputs, so a step ends when etcd holds exactly that.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from prometheus_client import CollectorRegistry

from agent.health.heartbeat import Heartbeat
from agent.metrics import AgentMetrics
from bench.fleet import CountingStore, etcd_metrics, etcd_writes
from bench.placement import deployments as make_deployments
from bench.placement import fleet as make_fleet
from common.keys import Keys
from common.records import (
    AssignmentRecord,
    DeploymentRecord,
    NodeRecord,
    dump,
    parse_assignment,
    parse_leader,
    parse_placement,
)
from common.store import EtcdStore, Event, Reset
from devtools.services import EtcdServer
from scheduler.placer.placement import place

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "/aivmm/v1"
GIB = 1 << 30
TICK = os.sysconf("SC_CLK_TCK")
FAILOVER_DEPLOYMENT = "dep-failover"


def note(what: str) -> None:
    """A progress line on stderr (the table goes to stdout)."""
    sys.stderr.write(f"{time.strftime('%H:%M:%S')} {what}\n")
    sys.stderr.flush()


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process, from /proc/PID/stat."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime (fields 14, 15)


# -- a placer process ----------------------------------------------------------------------------

async def placer_process(etcd_url: str, prefix: str, holder: str, ttl: int) -> None:
    """Child: run a Placer until stdin closes (the bench ended or died); report on stdout."""
    from scheduler.placer.service import Placer

    def say(**what: object) -> None:
        sys.stdout.write(json.dumps(what) + "\n")
        sys.stdout.flush()

    async with EtcdStore([etcd_url], timeout=30.0) as store:
        # No agent runs these replicas: never move one for "did not start" during the bench.
        placer = Placer(store, Keys(prefix), holder, ttl=ttl, replace_after=3600.0,
                        on_write=lambda n: say(ops=n, t=time.time()))
        task = asyncio.create_task(placer.run())
        stdin_closed = asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        terms, last = 0, 0.0
        try:
            while not stdin_closed.done() and not task.done():
                if placer.election.terms != terms:
                    terms = placer.election.terms
                    say(elected=time.time())
                if time.monotonic() - last >= 0.5:
                    last = time.monotonic()
                    say(passes=placer.passes, leading=placer.leading)
                await asyncio.wait({stdin_closed, task}, timeout=0.02)
            if task.done():
                task.result()
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


@dataclass
class PlacerProc:
    """The bench's handle on one placer process and what it reported."""

    holder: str
    proc: asyncio.subprocess.Process
    ops: int = 0
    txns: int = 0
    passes: int = 0
    leading: bool = False
    writes: list[float] = field(default_factory=list)  # wall time each txn was acknowledged
    elected: float | None = None  # wall time this placer last became leader
    reader: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, etcd_url: str, holder: str, ttl: int) -> PlacerProc:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.deployments", "--placer-only", "--etcd", etcd_url,
            "--prefix", PREFIX, "--holder", holder, "--placer-ttl", str(ttl), cwd=ROOT,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "AIVMM_LOG_LEVEL": "warning"})
        me = cls(holder, proc)
        me.reader = asyncio.create_task(me._read())
        return me

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for line in self.proc.stdout:
            msg = json.loads(line)
            if "ops" in msg:
                self.ops += msg["ops"]
                self.txns += 1
                self.writes.append(msg["t"])
            elif "elected" in msg:
                self.elected = msg["elected"]
            else:
                self.passes = msg["passes"]
                self.leading = msg["leading"]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu(self) -> float:
        return cpu_s(self.proc.pid)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGKILL)

    async def stop(self) -> None:
        if self.proc.returncode is None:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.kill()
                await self.proc.wait()
        if self.reader is not None:
            self.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, ValueError):
                await self.reader


# -- what the bench sees in etcd -----------------------------------------------------------------

@dataclass
class Tracker:
    """Assignments, placement statuses and the placer leader, from one watch of the prefix."""

    keys: Keys
    assignments: dict[str, AssignmentRecord] = field(default_factory=dict)
    statuses: dict[str, tuple[str, int, int]] = field(default_factory=dict)  # placer, pl, pend
    leader: str | None = None
    stamp: float = 0.0  # monotonic time of the last change applied
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def follow(self, store: EtcdStore, prefix: str) -> None:
        """Keep one part of the view; node records are not watched (1,000 nodes heartbeat)."""
        async for item in store.sync_prefix(prefix):
            self.stamp = time.monotonic()
            if isinstance(item, Reset):
                if prefix == self.keys.assignments:
                    self.assignments.clear()
                elif prefix == self.keys.placements:
                    self.statuses.clear()
                else:
                    self.leader = None
                for kv in item.snapshot.items:
                    self._apply(Event("put", kv.key, kv.value, kv.mod_revision))
            else:
                self._apply(item)
            self.changed.set()

    def _apply(self, e: Event) -> None:
        k = self.keys
        if e.key.startswith(k.assignments):
            if e.kind == "delete":
                self.assignments.pop(e.key, None)
            else:
                self.assignments[e.key] = parse_assignment(e.value)
        elif e.key.startswith(k.placements):
            name = e.key.removeprefix(k.placements)
            if e.kind == "delete":
                self.statuses.pop(name, None)
            else:
                s = parse_placement(e.value)
                self.statuses[name] = (s.placer, s.placed, s.pending)
        elif e.key == k.placer_leader:
            self.leader = None if e.kind == "delete" else parse_leader(e.value).holder

    async def until(self, predicate: Callable[[], bool], within: float, what: str) -> float:
        """The monotonic time of the change after which ``predicate`` first held."""
        deadline = time.monotonic() + within
        while not predicate():
            self.changed.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"not within {within:g} s: {what}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), min(left, 1.0))
        return self.stamp


def by_replica(assignments: list[AssignmentRecord]) -> dict[str, str]:
    """Backend name (deployment-replica) -> node."""
    return {a.name: a.node for a in assignments}


# -- the run -----------------------------------------------------------------------------------

def jitter(records: list[NodeRecord], rng: random.Random) -> dict[str, Callable[[], NodeRecord]]:
    """Per node, the record its agent would publish: GPU figures move between heartbeats."""
    def make(record: NodeRecord) -> Callable[[], NodeRecord]:
        def node_record() -> NodeRecord:
            for g in record.gpus:
                total = g.memory_total_bytes or 0
                g.memory_used_bytes = int(total * rng.uniform(0.0, 0.9))
                g.utilization = round(rng.random(), 2)
                g.temperature_c = float(rng.randint(40, 80))
                g.power_w = round(rng.uniform(100, 700), 1)
            return record
        return node_record
    return {r.node: make(r) for r in records}


async def run(args: argparse.Namespace) -> dict[str, object]:
    rng = random.Random(args.seed)
    keys = Keys(PREFIX)
    records, _pinned = make_fleet(rng, args.nodes, args.gpus)  # no pinned backends here
    deps = [replace(d, gpus=min(d.gpus, args.gpus), created_at=time.time())
            for d in make_deployments(rng, min(args.deployments, args.replicas), args.replicas)]
    out: dict[str, object] = {
        "nodes": args.nodes, "gpus": args.gpus, "replicas": args.replicas,
        "deployments": len(deps), "interval_s": args.interval, "node_ttl_s": args.node_ttl,
        "placer_ttl_s": args.placer_ttl}

    etcd = EtcdServer()
    etcd.start()
    store = CountingStore([etcd.url], timeout=30.0)
    tracker = Tracker(keys)
    beats: dict[str, tuple[Heartbeat, asyncio.Task[None]]] = {}
    placers: list[PlacerProc] = []
    followers: list[asyncio.Task[None]] = []
    try:
        await store.connect()
        followers += [asyncio.create_task(tracker.follow(store, prefix)) for prefix in
                      (keys.assignments, keys.placements, keys.placer_leader)]
        metrics = AgentMetrics(CollectorRegistry(), "deployments")

        def losses() -> int:
            return int(sum(x.value for m in metrics.etcd_errors.collect() for x in m.samples
                           if x.name.endswith("_total")))

        assert etcd.proc is not None
        etcd_pid, me = etcd.proc.pid, os.getpid()

        def progress(what: str) -> None:
            cpus = [f"{p.holder} {p.cpu():.1f}" for p in placers if p.proc.returncode is None]
            note(f"{what} (lease losses {losses()}; CPU s: bench {cpu_s(me):.1f}, "
                 f"etcd {cpu_s(etcd_pid):.1f}, {', '.join(cpus) or 'no placer'})")
        sources = jitter(records, random.Random(args.seed + 1))
        t0 = time.monotonic()
        ramp = args.ramp if args.ramp is not None else max(args.interval, args.nodes / 200)
        for i, r in enumerate(records):
            beat = Heartbeat(store, keys, node=r.node, interval=args.interval,
                             ttl=args.node_ttl, node_record=sources[r.node],
                             backends=list, metrics=metrics, rng=random.Random(i))
            beats[r.node] = (beat, asyncio.create_task(beat.run()))
            await asyncio.sleep(ramp / len(records))
        deadline = time.monotonic() + 60 + 2 * args.interval
        while not all(b.connected for b, _ in beats.values()):
            if time.monotonic() > deadline:
                raise TimeoutError("the fleet did not register within a minute")
            await asyncio.sleep(0.1)
        out["register_s"] = round(time.monotonic() - t0, 2)
        progress(f"{len(records)} nodes registered")

        # Placer A first, so that it leads; then B, which stands by.
        a = await PlacerProc.start(etcd.url, "placer-a", args.placer_ttl)
        placers.append(a)
        await tracker.until(lambda: tracker.leader == "placer-a", 60, "placer A elected")
        b = await PlacerProc.start(etcd.url, "placer-b", args.placer_ttl)
        placers.append(b)
        await asyncio.sleep(1.0)  # B has started, connected and is campaigning
        if b.proc.returncode is not None:
            raise RuntimeError("placer B exited")
        await asyncio.sleep(args.interval)  # A has seen a full round of heartbeats
        progress("placers started, A leads")
        out["losses_before"] = losses()

        # 1. Deploy. What etcd must end up holding is what the pure function says.
        expected = place(deps, records, [], reserved={}, now=0.0)
        want = {a_.name for a_ in expected.assignments}
        out["expected_placed"] = len(want)
        out["expected_pending"] = sum(s.pending for s in expected.status.values())
        names = {d.name for d in deps}
        cpu0, ops0, txns0 = a.cpu(), a.ops, a.txns
        m0 = await asyncio.to_thread(etcd_metrics, etcd.url)
        store.reset_counts()
        progress(f"deploying {len(deps)} deployments")
        t0, w0 = time.monotonic(), time.time()
        await store.put_many([(keys.deployment(d.name), dump(d)) for d in deps])
        done = await tracker.until(
            lambda: len(tracker.assignments) >= len(want)
            and names <= {n for n, s in tracker.statuses.items() if s[0] == "placer-a"},
            120, "all replicas assigned")
        cpu1 = a.cpu()
        await asyncio.sleep(0.5)  # the placer's last write reports arrive
        m1 = await asyncio.to_thread(etcd_metrics, etcd.url)
        got = {x.name for x in tracker.assignments.values()}
        # The placer's own stamps: this process's loop lags when the two cores are busy.
        out["deploy_s"] = round(max(w for w in a.writes if w >= w0) - w0, 3)
        out["deploy_seen_s"] = round(done - t0, 3)
        out["placed"] = len(got)
        out["placed_as_expected"] = got == want
        out["deploy_ops"] = a.ops - ops0
        out["deploy_txns"] = a.txns - txns0
        out["deploy_ops_per_replica"] = round((a.ops - ops0) / max(1, len(want)), 3)
        # etcd's own count of puts over the window, less the bench's (heartbeats, deploy).
        out["deploy_etcd_puts"] = int(etcd_writes(m1) - etcd_writes(m0) - store.puts)
        out["deploy_cpu_s"] = round(cpu1 - cpu0, 2)
        out["record_bytes"] = len(dump(records[0]))

        progress("all assigned")
        # Steady state: nothing to place, but every heartbeat is a change to the placer.
        s0, cpu_a, cpu_b, p0, ops_s = time.monotonic(), a.cpu(), b.cpu(), a.passes, a.ops
        await asyncio.sleep(args.steady)
        dt = time.monotonic() - s0
        out["steady_cpu_per_s"] = round((a.cpu() - cpu_a) / dt, 3)
        out["standby_cpu_per_s"] = round((b.cpu() - cpu_b) / dt, 3)
        out["steady_passes_per_s"] = round((a.passes - p0) / dt, 1)
        out["steady_ops"] = a.ops - ops_s
        out["heartbeats_per_s"] = round(args.nodes / args.interval, 1)

        progress("steady state measured")
        # 2. Node loss: the node holding the most replicas stops and its lease goes.
        current = list(tracker.assignments.values())
        count: dict[str, int] = {}
        for x in current:
            count[x.node] = count.get(x.node, 0) + 1
        lost = max(sorted(count), key=lambda n: count[n])
        lost_names = {x.name for x in current if x.node == lost}
        alive = [r for r in records if r.node != lost]
        after = by_replica(place(deps, alive, current, reserved={}, now=0.0).assignments)
        replaced = {n for n in lost_names if n in after}
        beat, task = beats.pop(lost)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        lease = beat.lease
        assert lease is not None
        cpu0, ops0 = a.cpu(), a.ops
        t0 = time.monotonic()
        await store.revoke_lease(lease)
        # etcd answers a revoke once the lease's keys are deleted: the record is gone now.
        w0 = time.time()

        def moved() -> bool:
            now = by_replica(list(tracker.assignments.values()))
            return (all(now.get(n) not in (None, lost) for n in replaced)
                    and not any(x.node == lost for x in tracker.assignments.values()))

        done = await tracker.until(moved, 60, "the lost node's replicas assigned elsewhere")
        cpu1 = a.cpu()
        await asyncio.sleep(0.5)
        out["lost_node"] = lost
        out["lost_replicas"] = len(lost_names)
        out["lost_replaced"] = len(replaced)
        out["loss_ms"] = round((max(w for w in a.writes if w >= w0) - w0) * 1000, 1)
        out["loss_seen_ms"] = round((done - t0) * 1000, 1)
        out["loss_ops"] = a.ops - ops0
        out["loss_cpu_s"] = round(cpu1 - cpu0, 2)

        progress(f"{lost} lost, its replicas placed again")
        # 3. Placer loss: SIGKILL the leader, deploy something new at once.
        fail = DeploymentRecord(name=FAILOVER_DEPLOYMENT, model="org/failover",
                                replicas=args.failover_replicas, gpus=1, memory_bytes=1 * GIB,
                                created_at=time.time())
        cpu_b0 = b.cpu()
        t0, w0 = time.monotonic(), time.time()
        a.kill()
        await store.put(keys.deployment(fail.name), dump(fail))

        def failover_placed() -> bool:
            s = tracker.statuses.get(fail.name)
            if s is None or s[0] != "placer-b":
                return False
            mine = sum(x.deployment == fail.name for x in tracker.assignments.values())
            return mine == s[1]

        elected = await tracker.until(lambda: tracker.leader == "placer-b", 60,
                                      "placer B elected")
        done = await tracker.until(failover_placed, 60, "the new deployment placed by B")
        cpu_b1 = b.cpu()
        await asyncio.sleep(0.5)
        status = tracker.statuses[fail.name]
        assert b.elected is not None
        placed_w = max(w for w in b.writes if w >= w0)
        out["failover_elected_s"] = round(b.elected - w0, 3)
        out["failover_s"] = round(placed_w - w0, 3)
        out["failover_after_elected_ms"] = round((placed_w - b.elected) * 1000, 1)
        out["failover_seen_s"] = f"{elected - t0:.3f} / {done - t0:.3f}"
        out["failover_placed"] = f"{status[1]} placed, {status[2]} pending"
        out["failover_cpu_s"] = round(cpu_b1 - cpu_b0, 2)
        progress("the standby placed the new deployment")
        out["losses"] = losses()
        out["etcd_rss_mb"] = round(_rss(etcd.proc.pid) / 2**20, 1) if etcd.proc else 0
    finally:
        for p in placers:
            await p.stop()
        for _, task in beats.values():
            task.cancel()
        await asyncio.gather(*(t for _, t in beats.values()), return_exceptions=True)
        for task in followers:
            task.cancel()
        await asyncio.gather(*followers, return_exceptions=True)
        await store.close()
        etcd.close()
    return out


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def table(r: dict[str, object]) -> str:
    rows = [
        ("fleet", f"{r['nodes']} nodes x {r['gpus']} GPUs, heartbeat {r['interval_s']} s, "
                  f"node lease TTL {r['node_ttl_s']} s; placer lease TTL {r['placer_ttl_s']} s"),
        ("deployments / replicas (pure place(): placed, pending)",
         f"{r['deployments']} / {r['replicas']} ({r['expected_placed']}, "
         f"{r['expected_pending']})"),
        ("all nodes registered after", f"{r['register_s']} s"),
        ("**deploy → all assigned in etcd** (placer's last write acknowledged)",
         f"**{r['deploy_s']} s** ({r['placed']} assignments, as place() says: "
         f"{r['placed_as_expected']}; seen by a watcher after {r['deploy_seen_s']} s)"),
        ("placer writes: ops (txns), per replica",
         f"{r['deploy_ops']} ({r['deploy_txns']}), {r['deploy_ops_per_replica']}"),
        ("etcd puts in that window, less the bench's own", r["deploy_etcd_puts"]),
        ("leader CPU, deploy → all assigned", f"{r['deploy_cpu_s']} s"),
        (f"steady state ({r['heartbeats_per_s']} node puts/s, nothing to place): "
         "leader CPU / passes",
         f"{r['steady_cpu_per_s']} s/s, {r['steady_passes_per_s']} passes/s, "
         f"{r['steady_ops']} writes"),
        ("standby CPU", f"{r['standby_cpu_per_s']} s/s"),
        ("node record size", f"{r['record_bytes']} B"),
        ("node lost (most replicas): replicas, of which place() re-places",
         f"{r['lost_replicas']}, {r['lost_replaced']}"),
        ("**record gone (revoke answered) → all its replicas assigned elsewhere**",
         f"**{r['loss_ms']} ms** (a dead node: node TTL {r['node_ttl_s']} s + this; "
         f"seen by a watcher after {r['loss_seen_ms']} ms)"),
        ("leader writes / CPU for the loss", f"{r['loss_ops']} ops / {r['loss_cpu_s']} s"),
        ("**leader SIGKILLed → standby elected**",
         f"**{r['failover_elected_s']} s** (placer lease TTL {r['placer_ttl_s']} s)"),
        ("→ new deployment placed by the standby",
         f"{r['failover_s']} s after the kill, {r['failover_after_elected_ms']} ms after "
         f"election ({r['failover_placed']}; watcher: {r['failover_seen_s']} s)"),
        ("standby CPU, kill → placed (load prefix + first pass)", f"{r['failover_cpu_s']} s"),
        ("node leases lost and re-registered (setup / whole run)",
         f"{r['losses_before']} / {r['losses']}"),
        ("etcd RSS at the end", f"{r['etcd_rss_mb']} MB"),
    ]
    return "| measure | value |\n|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nodes", type=int, default=1000)
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--replicas", type=int, default=2000)
    p.add_argument("--deployments", type=int, default=50)
    p.add_argument("--interval", type=float, default=3.0, help="heartbeat (agent default)")
    p.add_argument("--node-ttl", type=int, default=10, help="node lease TTL (agent default)")
    p.add_argument("--placer-ttl", type=int, default=5, help="placer lease TTL (default)")
    p.add_argument("--ramp", type=float, help="seconds over which the nodes start "
                   "(default: nodes/200, at least one interval)")
    p.add_argument("--steady", type=float, default=10.0, help="steady-state window, seconds")
    p.add_argument("--failover-replicas", type=int, default=10)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", type=Path)
    p.add_argument("--placer-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--etcd", help=argparse.SUPPRESS)
    p.add_argument("--prefix", default=PREFIX, help=argparse.SUPPRESS)
    p.add_argument("--holder", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.placer_only:
        import logging
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
        asyncio.run(placer_process(args.etcd, args.prefix, args.holder, args.placer_ttl))
        return 0
    import logging
    # A node re-registering is counted in the table; 1,000 warnings would hide it.
    logging.getLogger("agent.health.heartbeat").setLevel(logging.ERROR)
    result = asyncio.run(run(args))
    result["machine"] = (f"{platform.node()} {os.cpu_count()} CPUs, "
                         f"Python {platform.python_version()}")
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
