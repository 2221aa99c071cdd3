"""Placement cost: one ``scheduler.placer.placement.place()`` over a large synthetic fleet.

A fleet of ``--nodes`` nodes with ``--gpus`` GPUs each (mixed vendors and memory sizes, a few
pinned GPUs, zone labels) and ``--replicas`` replicas spread over ``--deployments``
deployments (whole-GPU and shared-memory, spread and binpack, some label constraints). It
times a placement from scratch, then one after a node is lost with the previous result as
``current`` (what the placer does on every change), and counts the assignments that loss
changed: only the lost node's replicas should move.

    .venv/bin/python -m bench.placement [--nodes 1000] [--gpus 8] [--replicas 2000]

Prints a Markdown table. Nothing here is asserted.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

from common.records import VENDORS, AssignmentRecord, DeploymentRecord, GpuRecord, NodeRecord
from scheduler.placer.placement import Placement, place

GIB = 1 << 30


def fleet(rng: random.Random, nodes: int, gpus: int) -> tuple[list[NodeRecord],
                                                             dict[str, set[str]]]:
    """Nodes of one vendor each (as real machines are), a few with a pinned GPU."""
    records, reserved = [], {}
    for i in range(nodes):
        name = f"node-{i:05d}"
        vendor = rng.choices(VENDORS, weights=[6, 3, 1])[0]
        memory = rng.choice([24, 48, 80, 141]) * GIB
        records.append(NodeRecord(
            node=name, agent_version="bench", started_at=0.0, heartbeat_at=0.0,
            labels={"zone": rng.choice(["eu", "us", "ap"])},
            gpus=[GpuRecord(index=j, vendor=vendor, name=f"{vendor}-gpu", uuid=f"{name}-{j}",
                            pci_bus_id=f"0000:{j:02x}:00.0", memory_total_bytes=memory)
                  for j in range(gpus)]))
        if rng.random() < 0.1:
            reserved[name] = {f"{name}-0"}
    return records, reserved


def deployments(rng: random.Random, count: int, replicas: int) -> list[DeploymentRecord]:
    """``count`` deployments whose replicas add up to ``replicas``."""
    cuts = sorted(rng.sample(range(1, replicas), count - 1)) if count > 1 else []
    sizes = [b - a for a, b in zip([0, *cuts], [*cuts, replicas], strict=True)]
    out = []
    for i, size in enumerate(sizes):
        shared = rng.random() < 0.4
        out.append(DeploymentRecord(
            name=f"dep-{i:03d}", model=f"org/model-{i}", replicas=size,
            gpus=1 if shared else rng.choice([1, 1, 1, 2, 4]),
            memory_bytes=rng.choice([8, 16, 20, 40]) * GIB if shared else None,
            labels={"zone": rng.choice(["eu", "us"])} if rng.random() < 0.2 else {},
            placement="binpack" if rng.random() < 0.3 else "spread"))
    return out


def timed(fn: Callable[[], Placement], repeat: int) -> tuple[Placement, float]:
    """The result and the median wall time of ``repeat`` runs, in seconds."""
    times = []
    result = None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    assert result is not None
    return result, statistics.median(times)


def changed(before: list[AssignmentRecord], after: list[AssignmentRecord]) -> int:
    """Replicas whose assignment differs (moved, new, gone or re-stamped)."""
    old = {(a.deployment, a.replica): a for a in before}
    new = {(a.deployment, a.replica): a for a in after}
    return sum(old.get(k) != new.get(k) for k in old.keys() | new.keys())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nodes", type=int, default=1000)
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--deployments", type=int, default=50)
    p.add_argument("--replicas", type=int, default=2000)
    p.add_argument("--repeat", type=int, default=3, help="runs per figure (median)")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()

    rng = random.Random(args.seed)
    nodes, reserved = fleet(rng, args.nodes, args.gpus)
    deps = deployments(rng, min(args.deployments, args.replicas), args.replicas)

    first, scratch_s = timed(lambda: place(deps, nodes, [], reserved=reserved, now=1.0),
                             args.repeat)
    # Lose the node holding the most replicas: the worst single loss.
    per_node: dict[str, int] = {}
    for a in first.assignments:
        per_node[a.node] = per_node.get(a.node, 0) + 1
    lost = max(sorted(per_node), key=lambda n: per_node[n]) if per_node else nodes[0].node
    alive = [n for n in nodes if n.node != lost]
    second, incremental_s = timed(
        lambda: place(deps, alive, first.assignments, reserved=reserved, now=2.0), args.repeat)
    moved = changed(first.assignments, second.assignments)

    placed = sum(s.placed for s in first.status.values())
    pending = sum(s.pending for s in first.status.values())
    pending_after = sum(s.pending for s in second.status.values())
    print(f"{args.nodes} nodes x {args.gpus} GPUs, {len(deps)} deployments, "
          f"{args.replicas} replicas ({placed} placed, {pending} pending)\n")
    print("| measure | value |")
    print("|---|---|")
    print(f"| place() from scratch | {scratch_s * 1000:.1f} ms |")
    print(f"| place() after losing one node (current = previous result) | "
          f"{incremental_s * 1000:.1f} ms |")
    print(f"| replicas on the lost node | {per_node.get(lost, 0)} |")
    print(f"| assignments changed by the loss | {moved} |")
    print(f"| pending after the loss | {pending_after} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
