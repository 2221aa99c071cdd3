"""What an agent runs (its node's assignments) and which models the proxy calls deployed, as
kept from etcd's sync stream: only the right keys count, unreadable records never linger."""

from __future__ import annotations

from agent.assignments import AssignmentTable
from common.keys import Keys
from common.records import AssignmentRecord, DeploymentRecord, dump
from common.store import Event, KeyValue, Reset, Snapshot
from scheduler.deployed import DeployedModels

K = Keys("/t")


def assignment(dep: str, replica: int, node: str, model: str = "m") -> AssignmentRecord:
    return AssignmentRecord(deployment=dep, replica=replica, node=node, model=model,
                            engine="vllm", vendor="nvidia", gpus=[replica],
                            gpu_uuids=[f"GPU-{replica}"])


def reset(*items: tuple[str, bytes]) -> Reset:
    return Reset(Snapshot(3, [KeyValue(k, v, 3, 3) for k, v in items]))


def put(key: str, value: bytes) -> Event:
    return Event("put", key, value, 4)


def delete(key: str) -> Event:
    return Event("delete", key, b"", 5)


def akey(a: AssignmentRecord) -> str:
    return K.assignment(a.node, a.name)


class Bad:
    def __init__(self) -> None:
        self.keys: list[str] = []

    def __call__(self, key: str, why: str) -> None:
        assert why
        self.keys.append(key)


# -- AssignmentTable ----------------------------------------------------------------------------

def test_only_this_nodes_assignments_count() -> None:
    mine, theirs = assignment("d", 0, "n1"), assignment("d", 1, "n10")
    bad = Bad()
    table = AssignmentTable(K, "n1", bad)
    table.apply(reset((akey(mine), dump(mine)), (akey(theirs), dump(theirs)),
                      (K.assignments + "n1", dump(mine)),  # not an assignment key
                      (akey(theirs) + "x", b"garbage of another node")))
    assert table.table == {"d-0": mine}
    table.apply(put(K.assignment("n10", "e-0"), dump(assignment("e", 0, "n10"))))
    table.apply(delete(K.assignment("n10", "d-0")))  # same name, other node
    assert table.table == {"d-0": mine}
    assert bad.keys == []  # other nodes' records are not this agent's to judge


def test_events_put_replace_and_delete() -> None:
    table = AssignmentTable(K, "n1")
    table.apply(reset())
    a0, a1 = assignment("d", 0, "n1"), assignment("d", 1, "n1")
    table.apply(put(akey(a0), dump(a0)))
    table.apply(put(akey(a1), dump(a1)))
    moved = assignment("d", 1, "n1", model="m2")
    table.apply(put(akey(moved), dump(moved)))
    assert table.table == {"d-0": a0, "d-1": moved}
    table.apply(delete(akey(a0)))
    assert table.table == {"d-1": moved}


def test_an_unreadable_record_is_reported_and_drops_the_good_one() -> None:
    a = assignment("d", 0, "n1")
    bad = Bad()
    table = AssignmentTable(K, "n1", bad)
    table.apply(reset((akey(a), dump(a))))
    table.apply(put(akey(a), b'{"schema": 1, "deployment": "d"}'))
    assert table.table == {} and bad.keys == [akey(a)]


def test_a_misnamed_record_is_reported_and_drops_the_good_one() -> None:
    a = assignment("d", 0, "n1")
    bad = Bad()
    table = AssignmentTable(K, "n1", bad)
    table.apply(reset((akey(a), dump(a))))
    # The record under n1/d-0 names another replica, then another node.
    table.apply(put(akey(a), dump(assignment("d", 1, "n1"))))
    assert table.table == {}
    table.apply(put(akey(a), dump(a)))
    assert table.table == {"d-0": a}
    table.apply(put(akey(a), dump(assignment("d", 0, "n2"))))
    assert table.table == {}
    assert bad.keys == [akey(a), akey(a)]


def test_a_reset_replaces_everything_and_skips_bad_records() -> None:
    a0, a1, a2 = (assignment("d", i, "n1") for i in range(3))
    bad = Bad()
    table = AssignmentTable(K, "n1", bad)
    table.apply(reset((akey(a0), dump(a0)), (akey(a1), dump(a1))))
    table.apply(reset((akey(a2), dump(a2)), (akey(a1), b"{not json")))
    assert table.table == {"d-2": a2}
    assert bad.keys == [akey(a1)]


# -- DeployedModels -----------------------------------------------------------------------------

def deployment(name: str, model: str, replicas: int = 1) -> DeploymentRecord:
    return DeploymentRecord(name=name, model=model, replicas=replicas)


def test_a_model_is_deployed_only_with_replicas_wanted() -> None:
    models = DeployedModels(K)
    models.apply(reset((K.deployment("off"), dump(deployment("off", "llama", replicas=0))),
                       (K.deployment("q"), dump(deployment("q", "qwen")))))
    assert models.deployment_of("llama") is None
    assert models.deployment_of("nobody") is None
    found = models.deployment_of("qwen")
    assert found is not None and found.name == "q"
    models.apply(put(K.deployment("on"), dump(deployment("on", "llama", replicas=2))))
    found = models.deployment_of("llama")
    assert found is not None and found.name == "on"
    models.apply(put(K.deployment("on"), dump(deployment("on", "llama", replicas=0))))
    assert models.deployment_of("llama") is None
    models.apply(delete(K.deployment("q")))
    assert models.deployment_of("qwen") is None


def test_a_bad_deployment_is_dropped_and_counted() -> None:
    count: list[int] = []
    models = DeployedModels(K, on_bad_record=lambda: count.append(1))
    models.apply(reset((K.deployment("q"), dump(deployment("q", "qwen"))),
                       (K.deployment("x"), b"[1, 2]")))
    assert len(count) == 1 and set(models.deployments) == {"q"}
    models.apply(put(K.deployment("q"), dump(deployment("q", "qwen", replicas=-1))))
    assert models.deployment_of("qwen") is None and models.deployments == {}
    assert len(count) == 2
    models.apply(reset((K.deployment("r"), dump(deployment("r", "mistral")))))
    assert set(models.deployments) == {"r"} and len(count) == 2
