"""Rolling updates (scheduler/placer/rollout.py): which older replicas stay, decided purely,
and placement keeping them as they were made."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from common.generation import generation
from common.records import AssignmentRecord, DeploymentRecord, GpuRecord, NodeRecord
from scheduler.placer.placement import place
from scheduler.placer.rollout import held_back

GIB = 1 << 30
NEW = DeploymentRecord(name="d", model="m", replicas=3, gpus=1, env={"V": "2"})
OLD = dataclasses.replace(NEW, env={"V": "1"})


def replica(i: int, d: DeploymentRecord = OLD, node: str = "n", gpu: int | None = None,
            memory: int | None = None) -> AssignmentRecord:
    g = i if gpu is None else gpu
    return AssignmentRecord(deployment="d", replica=i, node=node, model="m", engine="vllm",
                            vendor="nvidia", gpus=[g], gpu_uuids=[f"{node}-{g}"],
                            memory_bytes=memory, generation=generation(d))


def serving_all_but(*down: int) -> Callable[[AssignmentRecord], bool]:
    return lambda a: a.replica not in down


def test_one_serving_replica_is_replaced_at_a_time_lowest_first() -> None:
    old = [replica(i) for i in range(3)]
    assert held_back({"d": NEW}, old, serving_all_but()) == {"d": {1, 2}}
    # Replica 0 is of the new generation and still starting: nothing more is replaced.
    starting = [replica(0, NEW), *old[1:]]
    assert held_back({"d": NEW}, starting, serving_all_but(0)) == {"d": {1, 2}}
    # It serves: the next one goes.
    assert held_back({"d": NEW}, starting, serving_all_but()) == {"d": {2}}
    # All new: nothing held.
    assert held_back({"d": NEW}, [replica(i, NEW) for i in range(3)], serving_all_but()) == {}


def test_older_replicas_that_serve_nothing_are_replaced_at_once() -> None:
    old = [replica(i) for i in range(3)]
    # 1 crashed: keeping it saves no capacity; 0 is still the one serving replica to roll.
    assert held_back({"d": NEW}, old, serving_all_but(1)) == {"d": {2}}
    # While a new one starts, a crashed old one still goes, the serving ones stay.
    starting = [replica(0, NEW), *old[1:]]
    assert held_back({"d": NEW}, starting, serving_all_but(0, 2)) == {"d": {1}}


def test_a_missing_replica_holds_the_rollout() -> None:
    # Replica 0 was replaced but its new generation fits nowhere yet: 1 and 2 must serve.
    assert held_back({"d": NEW}, [replica(1), replica(2)], serving_all_but()) == {"d": {1, 2}}


def test_a_single_replica_and_replicas_scaled_away_are_not_held() -> None:
    one = dataclasses.replace(NEW, replicas=1)
    assert held_back({"d": one}, [replica(0, dataclasses.replace(OLD, replicas=1))],
                     serving_all_but()) == {}
    # Index 3 is beyond the count: it goes whatever its generation; others roll as usual.
    assert held_back({"d": NEW}, [replica(i) for i in range(4)], serving_all_but()) == \
        {"d": {1, 2}}
    assert held_back({}, [replica(0)], serving_all_but()) == {}


def node(name: str, gpus: int, mem_gib: int = 80) -> NodeRecord:
    return NodeRecord(node=name, agent_version="t", started_at=0.0, heartbeat_at=0.0, gpus=[
        GpuRecord(index=i, vendor="nvidia", name="H200", uuid=f"{name}-{i}",
                  pci_bus_id=f"0000:0{i}:00.0", memory_total_bytes=mem_gib * GIB)
        for i in range(gpus)])


def test_placement_keeps_held_replicas_as_they_were_made_and_replaces_the_rest() -> None:
    old = [replica(i) for i in range(3)]
    p = place([NEW], [node("n", 3)], old, reserved={}, now=5.0, held_back={"d": {1, 2}})
    by_replica = {a.replica: a for a in p.assignments}
    assert by_replica[1] == old[1] and by_replica[2] == old[2]  # untouched, old generation
    assert by_replica[0].generation == generation(NEW) and by_replica[0].gpus == [0]
    assert by_replica[0].assigned_at == 5.0 and p.status["d"].placed == 3
    # Without holding, all three are replaced (what a deployment change did before).
    p = place([NEW], [node("n", 3)], old, reserved={}, now=5.0)
    assert {a.generation for a in p.assignments} == {generation(NEW)}


def test_a_held_replica_keeps_the_memory_it_was_made_with() -> None:
    # 30 GiB replicas became 50 GiB ones: the old replica still holds only its 30 GiB, so
    # the new 50 GiB one fits beside it on the 80 GiB GPU.
    new = dataclasses.replace(NEW, gpus=0, memory_bytes=50 * GIB, replicas=2)
    was = dataclasses.replace(new, memory_bytes=30 * GIB, env={"V": "1"})
    old = [replica(0, was, gpu=0, memory=30 * GIB), replica(1, was, gpu=0, memory=30 * GIB)]
    p = place([new], [node("n", 1)], old, reserved={}, now=5.0, held_back={"d": {1}})
    by_replica = {a.replica: a for a in p.assignments}
    assert by_replica[1] == old[1]
    assert by_replica[0].memory_bytes == 50 * GIB and by_replica[0].gpus == [0]


def test_a_held_replica_on_a_node_that_no_longer_takes_it_is_replaced() -> None:
    old = [replica(0, node="gone"), replica(1, node="n", gpu=0)]
    two = dataclasses.replace(NEW, replicas=2)
    p = place([two], [node("n", 2)], old, reserved={}, now=5.0, held_back={"d": {0, 1}})
    by_replica = {a.replica: a for a in p.assignments}
    assert by_replica[1] == old[1]
    assert by_replica[0].node == "n" and by_replica[0].generation == generation(two)
