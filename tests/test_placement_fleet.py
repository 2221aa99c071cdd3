"""Fleet placement of deployments (scheduler/placer/placement.py): a pure function, tested
directly, with a property test over random fleets."""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.engines import AUTO_ENGINES, ENGINE_VENDORS, engine_for
from common.generation import generation
from common.records import (
    VENDORS,
    AssignmentRecord,
    DeploymentRecord,
    GpuRecord,
    NodeRecord,
    Vendor,
)
from scheduler.placer.placement import Placement, assignment_key, place

GIB = 1 << 30
NOW = 1000.0


def gpu(node: str, index: int, vendor: Vendor = "nvidia", mem_gib: int | None = 80,
        integrated: bool = False) -> GpuRecord:
    return GpuRecord(index=index, vendor=vendor, name=f"{vendor}-gpu", uuid=f"{node}-{index}",
                     pci_bus_id=f"0000:{index:02x}:00.0", integrated=integrated,
                     memory_total_bytes=None if mem_gib is None else mem_gib * GIB)


def node(name: str, count: int = 0, vendor: Vendor = "nvidia", mem_gib: int | None = 80,
         gpus: Sequence[GpuRecord] = (), **labels: str) -> NodeRecord:
    all_gpus = [*gpus, *(gpu(name, len(gpus) + i, vendor, mem_gib) for i in range(count))]
    return NodeRecord(node=name, agent_version="t", started_at=0.0, heartbeat_at=0.0,
                      gpus=all_gpus, labels=dict(labels))


def dep(name: str = "d", **kw: Any) -> DeploymentRecord:
    kw.setdefault("model", "m")
    return DeploymentRecord(name=name, **kw)


def run(deps: Sequence[DeploymentRecord], nodes: Sequence[NodeRecord],
        current: Sequence[AssignmentRecord] = (), *,
        reserved: Mapping[str, Collection[str]] | None = None,
        drained: Collection[str] = frozenset(),
        avoid: Mapping[str, Collection[str]] | None = None, now: float = NOW,
        removing: Mapping[str, Collection[str]] | None = None) -> Placement:
    reserved = reserved or {}
    p = place(deps, nodes, current, reserved=reserved, drained=drained, avoid=avoid, now=now,
              removing=removing)
    assert_valid(p, deps, nodes, reserved, drained, avoid or {}, current)
    return p


def where(p: Placement, deployment: str = "d") -> dict[int, tuple[str, list[int]]]:
    """replica -> (node, GPU indexes) of one deployment."""
    return {a.replica: (a.node, a.gpus) for a in p.assignments if a.deployment == deployment}


def per_node(p: Placement, deployment: str = "d") -> Counter[str]:
    return Counter(a.node for a in p.assignments if a.deployment == deployment)


def reason(p: Placement, deployment: str = "d") -> str:
    (text,) = p.status[deployment].reasons
    return text


def assert_valid(p: Placement, deps: Sequence[DeploymentRecord], nodes: Sequence[NodeRecord],
                 reserved: Mapping[str, Collection[str]], drained: Collection[str],
                 avoid: Mapping[str, Collection[str]],
                 current: Sequence[AssignmentRecord] = ()) -> None:
    """What must hold of any placement: capacity, constraints, live nodes, honest status.

    An avoided node takes no new replica of that deployment; one already there may stay.
    """
    by_name = {d.name: d for d in deps}
    live = {n.node: n for n in nodes}
    whole: set[tuple[str, int]] = set()
    shared: Counter[tuple[str, int]] = Counter()
    replicas: set[tuple[str, int]] = set()
    assert [assignment_key(a) for a in p.assignments] == sorted(map(assignment_key,
                                                                    p.assignments))
    for a in p.assignments:
        d = by_name[a.deployment]
        n = live[a.node]
        assert a.node not in drained
        assert a in current or a.node not in avoid.get(d.name, ())
        assert 0 <= a.replica < d.replicas and (d.name, a.replica) not in replicas
        replicas.add((d.name, a.replica))
        assert a.generation == generation(d)
        assert (a.model, a.image, a.args, a.env) == (d.model, d.image, d.args, d.env)
        assert not d.nodes or a.node in d.nodes
        assert all(n.labels.get(k) == v for k, v in d.labels.items())
        assert a.engine == engine_for(d.engine, a.vendor)
        if d.memory_bytes is None and d.gpus == 0:
            assert a.gpus == [] and a.vendor is None
            continue
        assert a.vendor is not None and (not d.vendors or a.vendor in d.vendors)
        assert a.memory_bytes == d.memory_bytes
        assert len(a.gpus) == (d.gpus if d.memory_bytes is None else 1)
        gpus = {g.index: g for g in n.gpus}
        for index, uuid in zip(a.gpus, a.gpu_uuids, strict=True):
            g = gpus[index]
            assert g.uuid == uuid and g.vendor == a.vendor and not g.integrated
            assert uuid not in reserved.get(a.node, ())
            if d.memory_bytes is None:
                assert (a.node, index) not in whole, "a whole GPU given twice"
                whole.add((a.node, index))
            else:
                shared[a.node, index] += d.memory_bytes
    for (name, index), used in shared.items():
        assert (name, index) not in whole, "a whole GPU also shared"
        total = {g.index: g for g in live[name].gpus}[index].memory_total_bytes
        assert total is not None and used <= total
    for d in deps:
        s = p.status[d.name]
        placed = sum(a.deployment == d.name for a in p.assignments)
        assert (s.placed, s.pending) == (placed, d.replicas - placed)
        assert len(s.reasons) == (1 if s.pending else 0)


# -- engines ---------------------------------------------------------------------------------

def test_engine_for_auto_picks_the_first_engine_of_the_vendor() -> None:
    # vLLM runs on all three vendors (CUDA, ROCm, XPU): "auto" is vLLM everywhere, and never
    # a GPU-less replica (llama.cpp on CPU is asked for by name).
    assert AUTO_ENGINES == ("vllm", "sglang", "openvino", "llamacpp")
    assert [engine_for("auto", v) for v in VENDORS] == ["vllm", "vllm", "vllm"]
    assert engine_for("auto", None) is None
    assert engine_for("openvino", "intel") == "openvino"
    assert engine_for("openvino", "nvidia") is None
    assert engine_for("sglang", "intel") is None
    assert [engine_for("llamacpp", v) for v in (*VENDORS, None)] == ["llamacpp"] * 4
    assert engine_for("ipex-llm", "intel") == "ipex-llm"  # the agent runs it as vLLM XPU
    assert engine_for("ipex-llm", "nvidia") is None
    assert [engine_for("custom", v) for v in (*VENDORS, None)] == ["custom"] * 4
    assert engine_for("nonsense", "nvidia") is None


def test_sim_runs_on_paper_everywhere_but_still_takes_no_gpu_as_a_pinned_backend() -> None:
    assert [engine_for("sim", v) for v in (*VENDORS, None)] == ["sim"] * 4
    assert ENGINE_VENDORS["sim"] == ()


def test_agent_uses_the_shared_table() -> None:
    from agent import engines

    assert engines.ENGINE_VENDORS is ENGINE_VENDORS


# -- policies --------------------------------------------------------------------------------

def test_spread_puts_one_replica_per_node_before_doubling_up() -> None:
    nodes = [node("c", 2), node("a", 2), node("b", 2)]
    p = run([dep(replicas=3)], nodes)
    assert per_node(p) == {"a": 1, "b": 1, "c": 1}
    assert all(gpus == [0] for _, gpus in where(p).values())
    p = run([dep(replicas=6)], nodes)
    assert per_node(p) == {"a": 2, "b": 2, "c": 2}
    assert p.status["d"].placed == 6 and p.status["d"].pending == 0


def test_spread_prefers_the_node_with_the_most_free_gpus_on_a_tie() -> None:
    p = run([dep(replicas=2)], [node("a", 1), node("b", 4), node("c", 2)])
    assert per_node(p) == {"b": 1, "c": 1}


def test_spread_counts_the_deployment_not_other_deployments() -> None:
    nodes = [node("a", 4), node("b", 4)]
    first = run([dep("x", replicas=3)], nodes)
    p = run([dep("x", replicas=3), dep("y", replicas=2)], nodes, first.assignments)
    assert per_node(p, "y") == {"a": 1, "b": 1}


def test_binpack_fills_one_node_before_the_next() -> None:
    nodes = [node("a", 4), node("b", 4), node("c", 4)]
    p = run([dep(replicas=5, placement="binpack")], nodes)
    assert per_node(p) == {"a": 4, "b": 1}
    assert sorted(where(p).values()) == [("a", [0]), ("a", [1]), ("a", [2]), ("a", [3]),
                                         ("b", [0])]


def test_binpack_prefers_the_node_already_most_used() -> None:
    nodes = [node("a", 4), node("b", 4)]
    other = run([dep("a-first", replicas=3, nodes=["b"])], nodes)
    p = run([dep("a-first", replicas=3, nodes=["b"]), dep(replicas=1, placement="binpack")],
            nodes, other.assignments)
    assert where(p) == {0: ("b", [3])}


def test_binpack_in_memory_mode_picks_the_fullest_gpu_that_fits() -> None:
    nodes = [node("a", gpus=[gpu("a", 0, mem_gib=48), gpu("a", 1, mem_gib=24)]),
             node("b", 1, mem_gib=80)]
    p = run([dep(replicas=3, memory_bytes=20 * GIB, placement="binpack")], nodes)
    assert sorted(where(p).values()) == [("a", [0]), ("a", [0]), ("a", [1])]


# -- capacity --------------------------------------------------------------------------------

def test_memory_mode_shares_a_gpu_until_it_is_full_and_names_the_largest_free() -> None:
    nodes = [node("node-a", 1, mem_gib=48)]
    p = run([dep(replicas=3, memory_bytes=20 * GIB, engine="sglang")], nodes)
    assert where(p) == {0: ("node-a", [0]), 1: ("node-a", [0])}
    assert all(a.memory_bytes == 20 * GIB for a in p.assignments)
    assert (p.status["d"].placed, p.status["d"].pending) == (2, 1)
    assert reason(p) == ("needs 20.0 GiB on one nvidia or amd GPU; "
                         "largest free: 8.0 GiB on node-a/gpu0")


def test_memory_mode_reason_reports_the_largest_free_gpu_across_nodes() -> None:
    nodes = [node("node-a", 1, mem_gib=16), node("node-b", 2, mem_gib=24)]
    p = run([dep(memory_bytes=40 * GIB, vendors=["nvidia"])], nodes)
    assert reason(p) == "needs 40.0 GiB on one nvidia GPU; largest free: 24.0 GiB on node-b/gpu0"


def test_memory_spread_prefers_a_gpu_without_a_replica_of_the_deployment() -> None:
    nodes = [node("a", 2, mem_gib=48)]
    p = run([dep(replicas=2, memory_bytes=20 * GIB)], nodes)
    assert sorted(where(p).values()) == [("a", [0]), ("a", [1])]
    p = run([dep(replicas=2, memory_bytes=20 * GIB, placement="binpack")], nodes)
    assert sorted(where(p).values()) == [("a", [0]), ("a", [0])]


def test_memory_mode_skips_gpus_of_unknown_size() -> None:
    nodes = [node("a", gpus=[gpu("a", 0, mem_gib=None), gpu("a", 1, mem_gib=24)])]
    p = run([dep(replicas=2, memory_bytes=10 * GIB)], nodes)
    assert sorted(where(p).values()) == [("a", [1]), ("a", [1])]
    p = run([dep(memory_bytes=10 * GIB)], [node("a", 2, mem_gib=None)])
    assert reason(p) == "needs 10.0 GiB on one GPU; no eligible GPU reports its memory size"


def test_whole_gpus_are_never_shared() -> None:
    nodes = [node("a", 2, mem_gib=80)]
    # "a-whole" is placed first (name order) and takes both GPUs whole.
    p = run([dep("a-whole", gpus=2), dep("b-shared", memory_bytes=GIB)], nodes)
    assert where(p, "a-whole") == {0: ("a", [0, 1])}
    assert where(p, "b-shared") == {}
    assert reason(p, "b-shared") == "needs 1.0 GiB on one GPU; largest free: 0.0 GiB on a/gpu0"
    # A shared GPU is not wholly free either.
    p = run([dep("a-shared", memory_bytes=GIB), dep("b-whole", gpus=2)], nodes)
    assert where(p, "a-shared") == {0: ("a", [0])}
    assert reason(p, "b-whole") == "needs 2 whole GPUs on one node; most free: 1 on a"


def test_whole_gpus_of_one_vendor_on_one_node() -> None:
    mixed = node("node-a", gpus=[gpu("node-a", 0, "nvidia"), gpu("node-a", 1, "amd"),
                                 gpu("node-a", 2, "amd")])
    p = run([dep(gpus=2)], [mixed, node("node-b", 1)])
    assert where(p) == {0: ("node-a", [1, 2])}
    assert p.assignments[0].vendor == "amd"
    p = run([dep(gpus=2, vendors=["nvidia"])], [mixed, node("node-b", 1)])
    assert reason(p) == "needs 2 whole nvidia GPUs on one node; most free: 1 on node-a"


def test_whole_gpu_choice_takes_the_lowest_free_indexes() -> None:
    nodes = [node("a", 4)]
    first = run([dep("x", gpus=1)], nodes)
    p = run([dep("x", gpus=1), dep("y", gpus=2)], nodes, first.assignments)
    assert where(p, "y") == {0: ("a", [1, 2])}


def test_none_free_reason() -> None:
    p = run([dep("a", gpus=1), dep("b", gpus=1)], [node("x", 1), node("y", gpus=[])])
    assert reason(p, "b") == "needs 1 whole GPU on one node; none free on 2 eligible nodes"


def test_pinned_reserved_gpus_are_never_used() -> None:
    nodes = [node("a", 3), node("b", 1)]
    reserved = {"a": {"a-0", "a-2"}, "b": {"b-0"}}
    p = run([dep(replicas=2)], nodes, reserved=reserved)
    assert where(p) == {0: ("a", [1])}
    assert reason(p) == "needs 1 whole GPU on one node; none free on 2 eligible nodes"
    p = run([dep(replicas=2, memory_bytes=GIB)], nodes, reserved=reserved)
    assert sorted(where(p).values()) == [("a", [1]), ("a", [1])]


def test_a_pinned_reservation_over_an_assignment_moves_it() -> None:
    nodes = [node("a", 2)]
    first = run([dep()], nodes)
    assert where(first) == {0: ("a", [0])}
    p = run([dep()], nodes, first.assignments, reserved={"a": {"a-0"}}, now=NOW + 1)
    assert where(p) == {0: ("a", [1])} and p.assignments[0].assigned_at == NOW + 1


def test_a_gpu_whose_container_is_being_removed_takes_no_new_replica_and_moves_none() -> None:
    # undeploy, then deploy at once: the old container still holds a-0's memory.
    nodes = [node("a", 2)]
    p = run([dep(replicas=2)], nodes, removing={"a": {"a-0"}})
    assert where(p) == {0: ("a", [1])}
    assert reason(p) == "needs 1 whole GPU on one node; none free on 1 eligible node"
    p = run([dep(memory_bytes=GIB)], nodes, removing={"a": {"a-0", "a-1"}})
    assert where(p) == {} and p.status["d"].pending == 1
    # A replica that shares the GPU with the one going away stays where it is.
    first = run([dep(memory_bytes=GIB)], [node("a", 1)])
    again = run([dep(memory_bytes=GIB)], [node("a", 1)], first.assignments, now=NOW + 1,
                removing={"a": {"a-0"}})
    assert again.assignments == first.assignments


def test_integrated_gpus_are_never_offered() -> None:
    igpu = gpu("a", 0, "intel", integrated=True)
    p = run([dep(engine="ipex-llm")], [node("a", gpus=[igpu])])
    assert reason(p) == "engine 'ipex-llm' runs on intel; no eligible intel GPU"
    p = run([dep(engine="ipex-llm", memory_bytes=GIB)], [node("a", gpus=[igpu])])
    assert p.status["d"].pending == 1


def test_no_capacity_is_read_from_live_memory_use() -> None:
    busy = gpu("a", 0, mem_gib=48)
    busy.memory_used_bytes = 47 * GIB
    p = run([dep(memory_bytes=40 * GIB)], [node("a", gpus=[busy])])
    assert where(p) == {0: ("a", [0])}


def test_the_fleet_is_shared_between_deployments_in_name_order() -> None:
    nodes = [node("a", 2)]
    p = run([dep("z", replicas=2), dep("m", replicas=2)], nodes)
    assert per_node(p, "m") == {"a": 2}
    assert (p.status["z"].placed, p.status["z"].pending) == (0, 2)


# -- constraints -----------------------------------------------------------------------------

def test_labels_constrain_nodes() -> None:
    nodes = [node("a", 1, zone="us"), node("b", 1, zone="eu", tier="gold"),
             node("c", 1, zone="eu")]
    p = run([dep(replicas=3, labels={"zone": "eu"})], nodes)
    assert per_node(p) == {"b": 1, "c": 1}
    assert p.status["d"].pending == 1
    p = run([dep(labels={"zone": "eu", "tier": "gold"})], nodes)
    assert per_node(p) == {"b": 1}
    p = run([dep(labels={"zone": "ap"})], nodes)
    assert reason(p) == "no node matches: labels zone=ap (3 nodes alive)"


def test_nodes_constrain_nodes() -> None:
    nodes = [node("a", 1), node("b", 1), node("c", 1)]
    p = run([dep(replicas=2, nodes=["c", "a"])], nodes)
    assert per_node(p) == {"a": 1, "c": 1}
    p = run([dep(nodes=["x"], labels={"k": "v"})], nodes)
    assert reason(p) == "no node matches: nodes x and labels k=v (3 nodes alive)"
    assert reason(run([dep()], [])) == "no node alive"


def test_vendors_constrain_gpus() -> None:
    nodes = [node("a", 2, "nvidia"), node("b", 2, "amd"), node("c", 2, "intel")]
    p = run([dep(replicas=2, vendors=["amd"])], nodes)
    assert per_node(p) == {"b": 2}
    p = run([dep(replicas=3, engine="custom", image="img", vendors=["intel", "nvidia"])],
            nodes)
    assert per_node(p) == {"a": 2, "c": 1} or per_node(p) == {"a": 1, "c": 2}
    p = run([dep(engine="openvino", vendors=["nvidia"])], nodes)
    assert reason(p) == "engine 'openvino' runs on intel; the deployment allows only nvidia"


def test_auto_engine_per_vendor() -> None:
    nodes = [node("a", 1, "nvidia"), node("b", 1, "amd"), node("c", 1, "intel")]
    p = run([dep(replicas=3)], nodes)
    assert {a.node: (a.engine, a.vendor) for a in p.assignments} == {
        "a": ("vllm", "nvidia"), "b": ("vllm", "amd"), "c": ("vllm", "intel")}


def test_named_engine_only_on_its_vendors() -> None:
    nodes = [node("a", 2, "nvidia"), node("b", 2, "amd")]
    p = run([dep(engine="openvino")], nodes)
    assert reason(p) == "engine 'openvino' runs on intel; no eligible intel GPU"
    p = run([dep(engine="vllm", replicas=2)], nodes)
    assert {a.vendor for a in p.assignments} == {"nvidia", "amd"}


def test_sim_reserves_gpus_of_any_vendor() -> None:
    p = run([dep(engine="sim", replicas=3)], [node("a", 1, "intel"), node("b", 2, "amd")])
    assert per_node(p) == {"a": 1, "b": 2}
    assert {a.engine for a in p.assignments} == {"sim"}
    assert reason(run([dep(engine="sim")], [node("a", 1)], reserved={"a": {"a-0"}})).startswith(
        "needs 1 whole GPU on one node")


def test_static_problems_are_reported_not_placed() -> None:
    nodes = [node("a", 1)]
    assert reason(run([dep(engine="tgi")], nodes)) == "unknown engine 'tgi'"
    assert reason(run([dep(engine="custom")], nodes)) == "engine 'custom' needs an image"
    assert reason(run([dep(model=" ")], nodes)) == "field 'model': expected a model id"


def test_no_gpu_replicas_spread_by_count_and_need_an_engine_that_runs_without_one() -> None:
    nodes = [node("a"), node("b", 1)]
    p = run([dep(replicas=3, gpus=0, engine="sim")], nodes)
    assert per_node(p) == {"a": 2, "b": 1}
    assert all(a.gpus == [] and a.vendor is None for a in p.assignments)
    p = run([dep(replicas=3, gpus=0, engine="sim", placement="binpack")], nodes)
    assert per_node(p) == {"a": 3}
    p = run([dep(gpus=0)], nodes)
    assert reason(p) == "engine 'auto' needs a GPU; the deployment asks for none (gpus 0)"


def test_assignment_carries_what_the_agent_needs() -> None:
    d = dep(model="org/m", image="img:1", args=["--x"], env={"A": "1"}, memory_bytes=GIB)
    (a,) = run([d], [node("a", 1, "amd")]).assignments
    assert a == AssignmentRecord(deployment="d", replica=0, node="a", model="org/m",
                                 engine="vllm", vendor="amd", gpus=[0], gpu_uuids=["a-0"],
                                 memory_bytes=GIB, image="img:1", args=["--x"],
                                 env={"A": "1"}, generation=generation(d), assigned_at=NOW)
    assert a.args is not d.args and a.env is not d.env


# -- changes over time -----------------------------------------------------------------------

def test_scale_up_keeps_existing_assignments_identical() -> None:
    nodes = [node("a", 2), node("b", 2), node("c", 2)]
    first = run([dep(replicas=2)], nodes)
    p = run([dep(replicas=5)], nodes, first.assignments, now=NOW + 5)
    old = {a.replica: a for a in first.assignments}
    new = {a.replica: a for a in p.assignments}
    assert all(new[r] == old[r] for r in old)
    assert [new[r].assigned_at for r in range(5)] == [NOW, NOW, NOW + 5, NOW + 5, NOW + 5]


def test_scale_down_drops_the_highest_replicas() -> None:
    nodes = [node("a", 2), node("b", 2)]
    first = run([dep(replicas=4)], nodes)
    p = run([dep(replicas=2)], nodes, first.assignments, now=NOW + 5)
    assert p.assignments == [a for a in first.assignments if a.replica < 2]
    assert run([dep(replicas=0)], nodes, first.assignments).assignments == []


def test_a_dead_nodes_replicas_move_and_the_rest_stay() -> None:
    nodes = [node("a", 2), node("b", 2), node("c", 2)]
    first = run([dep(replicas=3)], nodes)
    p = run([dep(replicas=3)], [nodes[0], nodes[2]], first.assignments, now=NOW + 5)
    moved = [a for a in p.assignments if a.assigned_at == NOW + 5]
    assert [(a.replica, a.node) for a in moved] == [(1, "a")]
    assert [a for a in p.assignments if a not in moved] == \
        [a for a in first.assignments if a.node != "b"]


def test_a_drained_nodes_replicas_move() -> None:
    nodes = [node("a", 1), node("b", 1), node("c", 1)]
    first = run([dep(replicas=2)], nodes)
    assert per_node(first) == {"a": 1, "b": 1}
    p = run([dep(replicas=2)], nodes, first.assignments, drained={"a"}, now=NOW + 5)
    assert per_node(p) == {"b": 1, "c": 1}
    assert where(p)[1] == where(first)[1]
    p = run([dep()], nodes[:1], first.assignments, drained={"a"})
    assert reason(p) == "no eligible node: 1 matching, 1 drained"


def test_avoided_nodes_take_no_new_replica_of_that_deployment_and_keep_theirs() -> None:
    nodes = [node("a", 2), node("b", 2)]
    first = run([dep("d", replicas=2), dep("e")], nodes)
    assert {n for n, _ in where(first, "d").values()} == {"a", "b"}
    # The replica that failed on a is dropped by the placer (given up on); its healthy
    # neighbour on b stays, and the new one may not go back to a.
    current = [x for x in first.assignments if not (x.deployment == "d" and x.node == "a")]
    p = run([dep("d", replicas=2), dep("e")], nodes, current, avoid={"d": {"a"}})
    assert sorted(n for n, _ in where(p, "d").values()) == ["b", "b"]
    assert where(p, "e") == where(first, "e")
    # A replica already on an avoided node is not moved for its neighbour's failure.
    kept = run([dep("d", replicas=2), dep("e")], nodes, first.assignments,
               avoid={"d": {"a"}})
    assert where(kept, "d") == where(first, "d")
    p = run([dep("d")], nodes[:1], avoid={"d": {"a"}})
    assert reason(p) == "no eligible node: 1 matching, 1 avoided after a failed start"


def test_a_generation_change_places_again_and_others_do_not() -> None:
    nodes = [node("a", 2), node("b", 2)]
    d = dep(replicas=2)
    first = run([d], nodes)
    for change in ({"args": ["--new"]}, {"image": "other"}, {"env": {"X": "1"}},
                   {"model": "m2"}, {"engine": "vllm"}, {"gpus": 2}, {"memory_bytes": GIB}):
        changed = dataclasses.replace(d, **change)
        assert generation(changed) != generation(d)
        p = run([changed], nodes, first.assignments, now=NOW + 5)
        assert all(a.assigned_at == NOW + 5 for a in p.assignments), change
        assert all(a.generation == generation(changed) for a in p.assignments)
    for same in ({"replicas": 1}, {"placement": "binpack"}, {"labels": {}},
                 {"updated_at": 7.0}, {"vendors": ["nvidia", "amd"]}):
        unchanged = dataclasses.replace(d, **same)
        assert generation(unchanged) == generation(d)
        p = run([unchanged], nodes, first.assignments, now=NOW + 5)
        assert all(a in first.assignments for a in p.assignments), same


def test_generation_is_a_short_stable_hex_digest() -> None:
    g = generation(dep(env={"B": "2", "A": "1"}))
    assert g == generation(dep(env={"A": "1", "B": "2"}))
    assert len(g) == 12 and int(g, 16) >= 0


def test_a_gpu_that_changed_under_an_assignment_moves_it() -> None:
    nodes = [node("a", 2)]
    first = run([dep()], nodes)
    swapped = node("a", gpus=[dataclasses.replace(nodes[0].gpus[0], uuid="new"),
                              nodes[0].gpus[1]])
    p = run([dep()], [swapped], first.assignments, now=NOW + 5)
    assert where(p) == {0: ("a", [0])} and p.assignments[0].gpu_uuids == ["new"]
    assert p.assignments[0].assigned_at == NOW + 5


def test_a_constraint_change_moves_only_replicas_that_break_it() -> None:
    nodes = [node("a", 1, zone="eu"), node("b", 1, zone="us"), node("c", 1, zone="eu")]
    first = run([dep(replicas=2)], nodes)
    assert per_node(first) == {"a": 1, "b": 1}
    p = run([dep(replicas=2, labels={"zone": "eu"})], nodes, first.assignments, now=NOW + 5)
    assert where(p) == {0: ("a", [0]), 1: ("c", [0])}
    assert p.assignments[0] == first.assignments[0]


def test_conflicting_current_assignments_keep_one() -> None:
    nodes = [node("a", 1)]
    (a,) = run([dep("d")], nodes).assignments
    clash = dataclasses.replace(a, deployment="e", generation=generation(dep("e")))
    p = run([dep("d"), dep("e")], nodes, [clash, a])
    assert p.assignments == [a]
    assert p.status["e"].pending == 1


def test_repeating_a_placement_changes_nothing_and_order_does_not_matter() -> None:
    rng = random.Random(7)
    nodes = [node(f"n{i}", gpus=[gpu(f"n{i}", j, rng.choice(VENDORS), rng.choice([24, 48, 80]))
                                 for j in range(rng.randint(0, 4))], zone=rng.choice("xy"))
             for i in range(8)]
    deps = [dep("w1", replicas=5), dep("w2", replicas=4, gpus=2, placement="binpack"),
            dep("m1", replicas=6, memory_bytes=20 * GIB),
            dep("m2", replicas=3, memory_bytes=30 * GIB, placement="binpack", vendors=["amd"]),
            dep("z", replicas=2, labels={"zone": "x"}, engine="sim")]
    first = run(deps, nodes)
    for _ in range(5):
        shuffled = run(rng.sample(deps, len(deps)), rng.sample(nodes, len(nodes)))
        assert shuffled == first
    again = run(deps, nodes, rng.sample(first.assignments, len(first.assignments)),
                now=NOW + 5)
    assert again.assignments == first.assignments


# -- properties ------------------------------------------------------------------------------

MEMORIES = [None, 16, 24, 48, 80]


@st.composite
def fleets(draw: st.DrawFn) -> tuple[list[NodeRecord], dict[str, set[str]]]:
    nodes, reserved = [], {}
    for i in range(draw(st.integers(1, 6))):
        name = f"n{i}"
        gpus = [gpu(name, j, draw(st.sampled_from(VENDORS)), draw(st.sampled_from(MEMORIES)),
                    integrated=draw(st.booleans()) and draw(st.booleans()))
                for j in range(draw(st.integers(0, 4)))]
        labels = draw(st.dictionaries(st.sampled_from(["zone", "tier"]), st.sampled_from("ab"),
                                      max_size=2))
        nodes.append(node(name, gpus=gpus, **labels))
        reserved[name] = {g.uuid for g in gpus if draw(st.integers(0, 4)) == 0}
    return nodes, reserved


@st.composite
def deployments(draw: st.DrawFn, names: Sequence[str]) -> list[DeploymentRecord]:
    deps = []
    for i in range(draw(st.integers(0, 5))):
        memory = draw(st.one_of(st.none(), st.sampled_from([4, 8, 20, 40, 64])))
        engine = draw(st.sampled_from(["auto", "vllm", "ipex-llm", "openvino", "sim",
                                       "custom"]))
        deps.append(dep(
            f"d{i}", replicas=draw(st.integers(0, 5)), gpus=draw(st.integers(0, 3)),
            memory_bytes=None if memory is None else memory * GIB, engine=engine,
            image="img" if engine == "custom" else None,
            vendors=draw(st.lists(st.sampled_from(VENDORS), unique=True, max_size=2)),
            nodes=draw(st.lists(st.sampled_from(names), unique=True, max_size=3)),
            labels=draw(st.dictionaries(st.just("zone"), st.sampled_from("ab"), max_size=1)),
            placement=draw(st.sampled_from(["spread", "binpack"]))))
    return deps


@st.composite
def changes(draw: st.DrawFn, deps: list[DeploymentRecord]) -> list[DeploymentRecord]:
    out = []
    for d in deps:
        action = draw(st.sampled_from(["same", "same", "scale", "args", "delete"]))
        if action == "scale":
            d = dataclasses.replace(d, replicas=draw(st.integers(0, 6)))
        elif action == "args":
            d = dataclasses.replace(d, args=["--v2"])
        if action != "delete":
            out.append(d)
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_property_any_fleet_any_history(data: st.DataObject) -> None:
    nodes, reserved = data.draw(fleets())
    names = [n.node for n in nodes]
    deps = data.draw(deployments(names))
    first = run(deps, nodes, reserved=reserved)
    # The next round: nodes lost, drained or avoided, deployments scaled, changed, deleted.
    alive = data.draw(st.lists(st.sampled_from(nodes), unique_by=lambda n: n.node))
    drained = set(data.draw(st.lists(st.sampled_from(names), max_size=2)))
    avoid = {d.name: set(data.draw(st.lists(st.sampled_from(names), max_size=2)))
             for d in deps if data.draw(st.booleans())}
    later = data.draw(changes(deps))
    second = run(later, alive, first.assignments, reserved=reserved, drained=drained,
                 avoid=avoid, now=NOW + 5)
    # No churn: an assignment that is still valid is kept as it was.
    live = {n.node for n in alive} - drained
    by_name = {d.name: d for d in later}
    for a in first.assignments:
        d = by_name.get(a.deployment)
        if (d is not None and generation(d) == a.generation and a.replica < d.replicas
                and a.node in live):
            assert a in second.assignments
    # Placing the same inputs again changes nothing.
    third = run(later, alive, second.assignments, reserved=reserved, drained=drained,
                avoid=avoid, now=NOW + 9)
    assert third.assignments == second.assignments


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_property_single_gpu_replicas_are_placed_whenever_enough_gpus_are_free(
        data: st.DataObject) -> None:
    nodes, reserved = data.draw(fleets())
    names = [n.node for n in nodes]
    drained = set(data.draw(st.lists(st.sampled_from(names), max_size=2)))
    deps = [dep(f"d{i}", vendors=[data.draw(st.sampled_from(VENDORS))],
                engine=data.draw(st.sampled_from(["auto", "sim", "custom"])), image="img",
                replicas=data.draw(st.integers(0, 4)),
                placement=data.draw(st.sampled_from(["spread", "binpack"])))
            for i in range(data.draw(st.integers(1, 4)))]
    before = [dataclasses.replace(d, replicas=data.draw(st.integers(0, 4))) for d in deps]
    current = run(before, nodes, reserved=reserved).assignments
    p = run(deps, nodes, current, reserved=reserved, drained=drained)
    for vendor in VENDORS:
        free = sum(g.vendor == vendor and not g.integrated and g.uuid not in reserved[n.node]
                   for n in nodes if n.node not in drained for g in n.gpus)
        wanted = sum(d.replicas for d in deps if d.vendors == [vendor])
        if free >= wanted:
            assert all(p.status[d.name].pending == 0 for d in deps if d.vendors == [vendor])


@pytest.mark.parametrize("policy", ["spread", "binpack"])
def test_whole_fleet_stays_within_capacity_under_many_deployments(policy: str) -> None:
    rng = random.Random(policy)
    nodes = [node(f"n{i:02d}", gpus=[gpu(f"n{i:02d}", j, rng.choice(VENDORS),
                                         rng.choice([24, 48, 80])) for j in range(4)])
             for i in range(20)]
    deps = [dep(f"d{i:02d}", replicas=rng.randint(1, 6), gpus=rng.randint(0, 2),
                memory_bytes=rng.choice([None, 10 * GIB, 30 * GIB]), placement=policy,
                engine="sim" if i % 5 == 0 else "auto")
            for i in range(30)]
    p = run(deps, nodes)
    assert sum(s.placed for s in p.status.values()) > 0


def test_a_cpu_quota_goes_only_to_nodes_with_the_cores_and_into_the_assignment() -> None:
    small = dataclasses.replace(node("small", 2), cpu_count=4)
    big = dataclasses.replace(node("big", 2), cpu_count=16)
    p = run([dep(cpus=8.0, replicas=2)], [small, big])
    assert set(per_node(p)) == {"big"}
    assert all(a.cpus == 8.0 for a in p.assignments)
    too_much = run([dep(cpus=32.0)], [small, big])
    assert "at least 32 CPUs" in reason(too_much)


def test_a_deployment_without_a_quota_keeps_its_generation_from_before_quotas() -> None:
    # Upgrading the placer must not re-place every replica of the fleet.
    assert generation(dep()) == generation(dataclasses.replace(dep(), cpus=None))
    assert generation(dep(cpus=2.0)) != generation(dep())
