"""Rolling updates (scheduler/placer/rollout.py): which older replicas stay, decided purely,
and placement keeping them as they were made."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from common.generation import generation
from common.records import AssignmentRecord, DeploymentRecord, GpuRecord, NodeRecord
from scheduler.placer.placement import place
from scheduler.placer.rollout import Rollout, plan_rollout

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
    # All three stay; replica 0's successor is started beside it.
    assert plan_rollout({"d": NEW}, old, serving_all_but()) == Rollout({"d": {0, 1, 2}},
                                                                       {"d": 0})
    # Its successor is still starting (on another node, the pair kept): nothing more.
    pair = [*old, replica(0, NEW, node="m")]
    assert plan_rollout({"d": NEW}, pair, lambda a: a.node == "n") == Rollout({"d": {0, 1, 2}})
    # Once it serves, the old 0 drains (not among the assignments kept): the next waits for
    # that drain to end, so its GPUs are free for the next surge.
    drained = [replica(0, NEW, node="m"), *old[1:]]
    assert plan_rollout({"d": NEW}, drained, serving_all_but(), draining=[old[0]]) == \
        Rollout({"d": {1, 2}})
    assert plan_rollout({"d": NEW}, drained, serving_all_but()) == Rollout({"d": {1, 2}},
                                                                           {"d": 1})
    # All new: nothing to do.
    assert plan_rollout({"d": NEW}, [replica(i, NEW) for i in range(3)],
                        serving_all_but()) == Rollout()


def test_older_replicas_that_serve_nothing_are_replaced_at_once() -> None:
    old = [replica(i) for i in range(3)]
    # 1 crashed: keeping it saves no capacity; 0 is still the serving replica to roll.
    assert plan_rollout({"d": NEW}, old, serving_all_but(1)) == Rollout({"d": {0, 2}},
                                                                        {"d": 0})
    # While a new 0 starts in place, a crashed old 2 still goes; the serving 1 stays.
    starting = [replica(0, NEW), *old[1:]]
    assert plan_rollout({"d": NEW}, starting, serving_all_but(0, 2)) == Rollout({"d": {1}})


def test_a_missing_replica_holds_the_rollout() -> None:
    # Replica 0 was replaced but its new generation fits nowhere yet: 1 and 2 must serve.
    assert plan_rollout({"d": NEW}, [replica(1), replica(2)], serving_all_but()) == \
        Rollout({"d": {1, 2}})


def test_a_surge_with_no_room_becomes_a_replacement_in_place() -> None:
    one, was = (dataclasses.replace(x, replicas=1) for x in (NEW, OLD))
    plan = plan_rollout({"d": one}, [replica(0, was)], serving_all_but())
    assert plan == Rollout({"d": {0}}, {"d": 0})  # a single replica surges too
    assert plan.in_place(["d"]) == Rollout() and plan.in_place(["other"]) == plan
    three = plan_rollout({"d": NEW}, [replica(i) for i in range(3)], serving_all_but())
    assert three.in_place(["d"]) == Rollout({"d": {1, 2}})


def test_replicas_scaled_away_and_unknown_deployments_are_not_held() -> None:
    # Index 3 is beyond the count: it goes whatever its generation; others roll as usual.
    assert plan_rollout({"d": NEW}, [replica(i) for i in range(4)], serving_all_but()) == \
        Rollout({"d": {0, 1, 2}}, {"d": 0})
    assert plan_rollout({}, [replica(0)], serving_all_but()) == Rollout()


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


def test_a_surge_starts_the_successor_on_another_node_and_keeps_the_old_one() -> None:
    one, was = (dataclasses.replace(x, replicas=1) for x in (NEW, OLD))
    old = replica(0, was, node="n", gpu=0)
    nodes = [node("n", 1), node("m", 1)]
    p = place([one], nodes, [old], reserved={}, now=5.0, held_back={"d": {0}},
              surge={"d": 0})
    assert not p.surge_failed
    pair = sorted((a.node, a.generation) for a in p.assignments)
    assert pair == [("m", generation(one)), ("n", generation(was))]
    assert p.status["d"].placed == 1 and p.status["d"].pending == 0
    # The next pass, the successor still starting: both are kept as they are.
    again = place([one], nodes, p.assignments, reserved={}, now=6.0, held_back={"d": {0}})
    assert again.assignments == p.assignments
    # No other node has room: the surge fails and nothing changes; the placer then
    # replaces in place.
    full = place([one], [node("n", 1)], [old], reserved={}, now=5.0, held_back={"d": {0}},
                 surge={"d": 0})
    assert full.surge_failed == {"d"} and full.assignments == [old]
