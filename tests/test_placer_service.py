"""The placer service: its fleet view, start-failure memory and diff (pure), then the Placer
itself on a real etcd: idempotent passes, fenced writes after a deposition, and the run loop
moving a replica off a node that died."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time

import pytest

from common.generation import generation
from common.keys import Keys
from common.records import (
    AssignmentRecord,
    BackendLoad,
    BackendRecord,
    DeploymentRecord,
    DrainRecord,
    GpuRecord,
    LeaderRecord,
    NodeRecord,
    PlacementStatus,
    dump,
    parse_assignment,
    parse_placement,
)
from common.store import Compare, EtcdStore, Event, KeyValue, Reset, Snapshot
from devtools.services import until
from scheduler.placer.election import Deposed, Fence
from scheduler.placer.service import Changes, FleetView, Placer, StartFailures, changes

K = Keys("/t")


# -- records ------------------------------------------------------------------------------------

def gpu(index: int, node: str, vendor: str = "nvidia") -> GpuRecord:
    return GpuRecord(index=index, vendor=vendor, name="H200",  # type: ignore[arg-type]
                     uuid=f"GPU-{node}-{index}", pci_bus_id=f"0000:0{index}:00.0",
                     memory_total_bytes=80 << 30)


def node(name: str, gpus: int = 1) -> NodeRecord:
    return NodeRecord(node=name, agent_version="t", started_at=1.0, heartbeat_at=1.0,
                      gpus=[gpu(i, name) for i in range(gpus)])


def deployment(name: str, model: str = "m", replicas: int = 1, gpus: int = 1
               ) -> DeploymentRecord:
    return DeploymentRecord(name=name, model=model, replicas=replicas, gpus=gpus)


def assignment(dep: str, replica: int, on: str, gpus: list[int] | None = None,
               assigned_at: float = 0.0) -> AssignmentRecord:
    idx = [0] if gpus is None else gpus
    return AssignmentRecord(deployment=dep, replica=replica, node=on, model="m",
                            engine="vllm", vendor="nvidia", gpus=idx,
                            gpu_uuids=[f"GPU-{on}-{i}" for i in idx], assigned_at=assigned_at)


def backend(on: str, name: str, state: str = "starting", *, deployment: str | None = None,
            gpus: list[str] | None = None, restarts: int = 0, error: str | None = None
            ) -> BackendRecord:
    return BackendRecord(node=on, name=name, models=["m"], url="http://x", state=state,  # type: ignore[arg-type]
                         engine="vllm", gpus=gpus or [], restarts=restarts, error=error,
                         deployment=deployment)


def status(dep: str, placed: int, pending: int, reasons: list[str] | None = None,
           updated_at: float = 0.0) -> PlacementStatus:
    return PlacementStatus(dep, placed, pending, reasons or [], updated_at=updated_at)


def reset(*items: tuple[str, bytes]) -> Reset:
    return Reset(Snapshot(7, [KeyValue(k, v, 7, 7) for k, v in items]))


def put(key: str, value: bytes) -> Event:
    return Event("put", key, value, 8)


def delete(key: str) -> Event:
    return Event("delete", key, b"", 9)


class Bad:
    """Collects on_bad_record reports."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def __call__(self, key: str, why: str) -> None:
        self.seen.append((key, why))

    @property
    def keys(self) -> list[str]:
        return [k for k, _ in self.seen]


# -- FleetView ----------------------------------------------------------------------------------

def full_reset() -> Reset:
    a = assignment("d", 0, "n1")
    return reset(
        (K.node("n1"), dump(node("n1"))),
        (K.node("n2"), b"{not json"),
        (K.deployment("d"), dump(deployment("d"))),
        (K.assignment("n1", "d-0"), dump(a)),
        (K.backend("n1", "d-0"), dump(backend("n1", "d-0", deployment="d"))),
        (K.placement("d"), dump(status("d", 1, 0))),
        (K.drain("n3"), dump(DrainRecord("n3", 1.0))),
        (K.placer_leader, dump(LeaderRecord("x", 1.0))),
    )


def test_reset_fills_every_table_and_reports_an_unreadable_record() -> None:
    bad = Bad()
    view = FleetView(K, on_bad_record=bad)
    assert not view.synced
    view.apply(full_reset())
    assert view.synced
    assert set(view.nodes) == {"n1"} and view.nodes["n1"] == node("n1")
    assert set(view.deployments) == {"d"}
    assert view.assignments == {K.assignment("n1", "d-0"): assignment("d", 0, "n1")}
    assert set(view.backends) == {K.backend("n1", "d-0")}
    assert view.statuses == {"d": status("d", 1, 0)}
    assert view.drained == {"n3"}
    assert bad.keys == [K.node("n2")] and "not JSON" in bad.seen[0][1]
    assert view.backend_of(assignment("d", 0, "n1")) == backend("n1", "d-0", deployment="d")


def test_events_put_and_delete_each_kind() -> None:
    bad = Bad()
    view = FleetView(K, on_bad_record=bad)
    view.apply(reset())
    view.apply(put(K.node("n2"), dump(node("n2", 2))))
    view.apply(put(K.deployment("e"), dump(deployment("e", replicas=3))))
    view.apply(put(K.assignment("n2", "e-0"), dump(assignment("e", 0, "n2"))))
    view.apply(put(K.backend("n2", "e-0"), dump(backend("n2", "e-0"))))
    view.apply(put(K.placement("e"), dump(status("e", 1, 2))))
    view.apply(put(K.drain("n2"), dump(DrainRecord("n2", 1.0))))
    assert view.nodes["n2"].gpus[1].uuid == "GPU-n2-1"
    assert view.deployments["e"].replicas == 3
    assert K.assignment("n2", "e-0") in view.assignments
    assert K.backend("n2", "e-0") in view.backends
    assert view.statuses["e"].pending == 2
    assert view.drained == {"n2"}
    for key in (K.node("n2"), K.deployment("e"), K.assignment("n2", "e-0"),
                K.backend("n2", "e-0"), K.placement("e"), K.drain("n2")):
        view.apply(delete(key))
    assert not (view.nodes or view.deployments or view.assignments or view.backends
                or view.statuses or view.drained)
    assert bad.seen == []


@pytest.mark.parametrize("key, good, garbage", [
    (K.node("n1"), dump(node("n1")), b'{"schema": 1, "node": "n1"}'),
    (K.deployment("d"), dump(deployment("d")), dump(deployment("d", replicas=-1))),
    (K.assignment("n1", "d-0"), dump(assignment("d", 0, "n1")), b"[]"),
    (K.backend("n1", "d-0"), dump(backend("n1", "d-0")), b'{"schema": 2}'),
    (K.placement("d"), dump(status("d", 1, 0)), b'{"schema": 1, "placed": "one"}'),
])
def test_an_unreadable_update_drops_the_old_contents(key: str, good: bytes,
                                                     garbage: bytes) -> None:
    bad = Bad()
    view = FleetView(K, on_bad_record=bad)
    view.apply(reset((key, good)))
    tables = (view.nodes, view.deployments, view.assignments, view.backends, view.statuses)
    assert sum(len(t) for t in tables) == 1
    view.apply(put(key, garbage))
    assert sum(len(t) for t in tables) == 0  # not decided on its old contents
    assert bad.keys == [key]


def test_a_reset_replaces_everything() -> None:
    view = FleetView(K)
    view.apply(full_reset())
    view.apply(reset((K.node("n9"), dump(node("n9")))))
    assert set(view.nodes) == {"n9"}
    assert not (view.deployments or view.assignments or view.backends or view.statuses
                or view.drained)


def test_reserved_is_the_gpus_of_pinned_backends_only() -> None:
    view = FleetView(K)
    view.apply(reset(
        (K.backend("n1", "pinned"), dump(backend("n1", "pinned", gpus=["GPU-n1-0"]))),
        (K.backend("n1", "cpu"), dump(backend("n1", "cpu"))),
        (K.backend("n1", "d-0"), dump(backend("n1", "d-0", deployment="d",
                                              gpus=["GPU-n1-1"]))),
        (K.backend("n2", "p2"), dump(backend("n2", "p2", gpus=["GPU-n2-0", "GPU-n2-1"]))),
    ))
    assert view.reserved() == {"n1": {"GPU-n1-0"}, "n2": {"GPU-n2-0", "GPU-n2-1"}}


def test_removing_is_the_gpus_of_deployment_backends_without_an_assignment() -> None:
    view = FleetView(K)
    view.apply(reset(
        (K.assignment("n1", "d-0"), dump(assignment("d", 0, "n1"))),
        (K.backend("n1", "d-0"), dump(backend("n1", "d-0", deployment="d",
                                              gpus=["GPU-n1-0"]))),
        # d-1 was scaled away or moved: its agent is still stopping the container.
        (K.backend("n1", "d-1"), dump(backend("n1", "d-1", deployment="d",
                                              gpus=["GPU-n1-1"]))),
        (K.backend("n1", "pinned"), dump(backend("n1", "pinned", gpus=["GPU-n1-2"]))),
        (K.backend("n2", "e-0"), dump(backend("n2", "e-0", deployment="e"))),  # no GPU
    ))
    assert view.removing() == {"n1": {"GPU-n1-1"}}
    view.apply(delete(K.backend("n1", "d-1")))  # the container is gone
    assert view.removing() == {}


# -- StartFailures ------------------------------------------------------------------------------

def fleet(a: AssignmentRecord, b: BackendRecord | None, *, alive: bool = True) -> FleetView:
    view = FleetView(K)
    items = [(K.assignment(a.node, a.name), dump(a))]
    if alive:
        items.append((K.node(a.node), dump(node(a.node))))
    if b is not None:
        items.append((K.backend(b.node, b.name), dump(b)))
    view.apply(reset(*items))
    return view


def test_an_unready_replica_is_given_up_after_replace_after_and_its_node_avoided() -> None:
    f = StartFailures(replace_after=10, avoid_base=60, avoid_max=150)
    view = fleet(assignment("d", 0, "n1", assigned_at=100), backend("n1", "d-0", error="no image"))
    assert f.observe(view, 100) == []
    assert f.next_deadline(100) == 110
    assert f.observe(view, 109.9) == [] and f.avoid(109.9) == {}
    [line] = f.observe(view, 110)
    assert "d-0" in line and "n1" in line and "no image" in line and "60s" in line
    assert f.avoid(110) == {"d": {"n1"}}
    assert f.next_deadline(110) == 170
    assert f.avoid(169.9) == {"d": {"n1"}}
    assert f.avoid(170) == {}  # expired at its time
    assert f.next_deadline(170) is None

    # It fails there again: the hold doubles; a third time it is capped.
    again = fleet(assignment("d", 0, "n1", assigned_at=200), backend("n1", "d-0"))
    assert f.observe(again, 200) == []
    [line] = f.observe(again, 210)
    assert "120s" in line and "(starting, 0 restarts)" in line
    assert f.avoid(329.9) == {"d": {"n1"}} and f.avoid(330) == {}
    assert f.observe(again, 400) == []
    [line] = f.observe(again, 410)
    assert "150s" in line
    assert f.avoid(559.9) == {"d": {"n1"}} and f.avoid(560) == {}


def test_the_timer_runs_from_the_assignment_when_it_is_newer() -> None:
    f = StartFailures(replace_after=10)
    view = fleet(assignment("d", 0, "n1", assigned_at=105), None)
    assert f.observe(view, 100) == []
    # The next decision is due when that timer ends, and never at a time already past (the
    # placer would wake again and again with nothing to decide).
    assert f.next_deadline(100) == 115 and f.next_deadline(112) == 115
    assert f.observe(view, 114) == []
    [line] = f.observe(view, 115)
    assert "no backend" in line


def test_a_ready_replica_is_never_moved() -> None:
    f = StartFailures(replace_after=10, max_restarts=3)
    view = fleet(assignment("d", 0, "n1", assigned_at=0),
                 backend("n1", "d-0", "ready", restarts=9))
    assert f.observe(view, 0) == []
    assert f.observe(view, 1e6) == []
    assert f.avoid(1e6) == {} and f.next_deadline(1e6) is None


def test_a_replica_that_became_ready_starts_its_timer_again() -> None:
    f = StartFailures(replace_after=10)
    a = assignment("d", 0, "n1", assigned_at=0)
    assert f.observe(fleet(a, backend("n1", "d-0")), 0) == []
    assert f.observe(fleet(a, backend("n1", "d-0", "ready")), 9) == []
    assert f.observe(fleet(a, backend("n1", "d-0", "unhealthy")), 12) == []
    assert f.observe(fleet(a, backend("n1", "d-0", "unhealthy")), 21) == []
    assert len(f.observe(fleet(a, backend("n1", "d-0", "unhealthy")), 22)) == 1


def test_a_new_leader_goes_on_with_the_start_timers_of_the_last() -> None:
    a = assignment("d", 0, "n1", assigned_at=100)
    key = K.assignment("n1", "d-0").removeprefix(K.assignments)
    first = StartFailures(replace_after=10, max_restarts=3, assignments=K.assignments)
    assert first.observe(fleet(a, backend("n1", "d-0", restarts=1)), 101) == []
    since, restarts = first.timers("d")
    assert since == {key: 101} and restarts == {key: 1}
    assert first.timers("other") == ({}, {})
    recorded = dataclasses.replace(status("d", 1, 0), unready_since=since,
                                   unready_restarts=restarts)

    # The leader changes at 106: the replica is still given up at 111, not at 116, and its
    # restarts count from what the last leader saw (1), not from what this one first sees.
    second = StartFailures(replace_after=10, max_restarts=3, assignments=K.assignments)
    second.new_term()
    second.restore([recorded], 106)
    assert second.observe(fleet(a, backend("n1", "d-0", restarts=3)), 106) == []
    assert second.next_deadline(106) == 111
    [line] = second.observe(fleet(a, backend("n1", "d-0", restarts=3)), 111)
    assert "d-0" in line and second.timers("d") == ({}, {})
    # The same status read again this term (its rewrite not back yet) times nothing anew.
    second.restore([recorded], 111)
    assert second.observe(fleet(a, backend("n1", "d-0", restarts=3)), 111) == []
    assert second.timers("d") == ({key: 111}, {key: 3})

    # restarts: 3 since the last leader's 1 is only 2 short of giving up on a max of 3.
    third = StartFailures(replace_after=10, max_restarts=3, assignments=K.assignments)
    third.new_term()
    third.restore([recorded], 102)
    assert third.observe(fleet(a, backend("n1", "d-0", restarts=3)), 102) == []
    assert len(third.observe(fleet(a, backend("n1", "d-0", restarts=4)), 102)) == 1


def test_restarts_without_becoming_ready_give_up_at_once() -> None:
    f = StartFailures(replace_after=100, max_restarts=3)
    a = assignment("d", 0, "n1", assigned_at=50)
    assert f.observe(fleet(a, backend("n1", "d-0", "unhealthy", restarts=0)), 50) == []
    assert f.observe(fleet(a, backend("n1", "d-0", "unhealthy", restarts=2)), 50) == []
    [line] = f.observe(fleet(a, backend("n1", "d-0", "unhealthy", restarts=3,
                                        error="exit 1")), 51)
    assert "exit 1" in line
    assert f.avoid(51) == {"d": {"n1"}}
    assert f.given_up == {"/p/assignments/n1/d-0"} or len(f.given_up) == 1


def test_restarts_from_before_it_stopped_being_ready_do_not_count() -> None:
    # Weeks of occasional crashes add up; one blink must not move the replica at once.
    f = StartFailures(replace_after=100, max_restarts=3)
    a = assignment("d", 0, "n1", assigned_at=0)
    assert f.observe(fleet(a, backend("n1", "d-0", "unhealthy", restarts=40)), 500) == []
    assert f.observe(fleet(a, backend("n1", "d-0", "unhealthy", restarts=41)), 501) == []
    assert f.given_up == set()


def test_a_dead_nodes_replica_is_not_counted_as_a_failed_start() -> None:
    f = StartFailures(replace_after=10)
    view = fleet(assignment("d", 0, "n1", assigned_at=0), None, alive=False)
    assert f.observe(view, 0) == [] and f.observe(view, 100) == []
    assert f.avoid(100) == {} and f.next_deadline(100) is None


def test_next_deadline_is_the_earliest_of_timers_and_avoids() -> None:
    f = StartFailures(replace_after=10, avoid_base=5)
    view = FleetView(K)
    view.apply(reset((K.node("n1"), dump(node("n1"))), (K.node("n2"), dump(node("n2"))),
                     (K.assignment("n1", "d-0"), dump(assignment("d", 0, "n1")))))
    assert f.observe(view, 0) == [] and f.next_deadline(0) == 10
    assert len(f.observe(view, 10)) == 1
    view.apply(delete(K.assignment("n1", "d-0")))
    view.apply(put(K.assignment("n2", "d-0"), dump(assignment("d", 0, "n2", assigned_at=12))))
    assert f.observe(view, 12) == []
    assert f.next_deadline(12) == 15  # n1's avoid ends before n2's timer (22)
    assert f.next_deadline(15) == 22


# -- changes ------------------------------------------------------------------------------------

def test_changes_put_only_what_differs_and_delete_what_is_gone() -> None:
    keep, moved, gone = assignment("a", 0, "n1"), assignment("b", 0, "n1", [1]), \
        assignment("c", 0, "n2")
    view = FleetView(K)
    view.apply(reset(
        *((K.assignment(a.node, a.name), dump(a)) for a in (keep, moved, gone)),
        (K.placement("a"), dump(status("a", 1, 0, updated_at=1))),
        (K.placement("b"), dump(status("b", 0, 1, ["none free"], updated_at=1))),
        (K.placement("c"), dump(status("c", 1, 0, updated_at=1))),
    ))
    new_b = assignment("b", 0, "n1", [2], assigned_at=5)
    new_d = assignment("d", 0, "n2", assigned_at=5)
    diff = changes(K, view, [keep, new_b, new_d],
                   {"a": status("a", 1, 0, updated_at=5),  # only the time differs
                    "b": status("b", 1, 0, updated_at=5),
                    "d": status("d", 1, 0, ["x"], updated_at=5)})
    written = dict(diff.puts)
    assert set(written) == {K.assignment("n1", "b-0"), K.assignment("n2", "d-0"),
                            K.placement("b"), K.placement("d")}
    assert parse_assignment(written[K.assignment("n1", "b-0")]) == new_b
    assert parse_placement(written[K.placement("d")]).reasons == ["x"]
    assert sorted(diff.deletes) == [K.assignment("n2", "c-0"), K.placement("c")]
    assert diff


def test_changes_of_a_placement_already_in_etcd_are_empty() -> None:
    a = assignment("a", 0, "n1")
    view = FleetView(K)
    view.apply(reset((K.assignment("n1", "a-0"), dump(a)),
                     (K.placement("a"), dump(status("a", 1, 0, updated_at=1)))))
    diff = changes(K, view, [a], {"a": status("a", 1, 0, updated_at=99)})
    assert diff == Changes([], []) and not diff
    changed = changes(K, view, [a], {"a": status("a", 1, 0, ["new reason"])})
    assert [k for k, _ in changed.puts] == [K.placement("a")]


# -- the Placer on a real etcd ------------------------------------------------------------------

async def read_view(store: EtcdStore, keys: Keys) -> FleetView:
    view = FleetView(keys)
    view.apply(Reset(await store.get_prefix(keys.prefix + "/")))
    return view


async def take_fence(store: EtcdStore, keys: Keys, holder: str) -> Fence:
    """Become leader as Election does: create the leader key under a lease, in a txn."""
    lease = await store.grant_lease(30)
    result = await store.txn([Compare.created(keys.placer_leader, 0)],
                             puts=[(keys.placer_leader, dump(LeaderRecord(holder, time.time())))],
                             lease=lease)
    assert result.succeeded
    return Fence(keys.placer_leader, result.revision, lease)


async def assignments_in(store: EtcdStore, keys: Keys) -> list[AssignmentRecord]:
    return [parse_assignment(kv.value)
            for kv in (await store.get_prefix(keys.assignments)).items]


def no_gpu_twice(found: list[AssignmentRecord]) -> None:
    uuids = [u for a in found for u in a.gpu_uuids]
    assert len(uuids) == len(set(uuids)), f"a GPU given twice: {found}"


async def test_a_pass_writes_assignments_and_statuses_and_a_second_writes_nothing(
        prefix: str, writer: EtcdStore) -> None:
    keys = Keys(prefix)
    await writer.put_many([(keys.node("n1"), dump(node("n1", 2))),
                           (keys.node("n2"), dump(node("n2", 1))),
                           (keys.deployment("d"), dump(deployment("d", replicas=2))),
                           (keys.deployment("wide"), dump(deployment("wide", gpus=4)))])
    fence = await take_fence(writer, keys, "p")
    try:
        placer = Placer(writer, keys, "p")
        view = await read_view(writer, keys)
        first = await placer.place_once(view, fence)
        assert first
        found = await assignments_in(writer, keys)
        assert sorted((a.name, a.node) for a in found) == [("d-0", "n1"), ("d-1", "n2")]
        no_gpu_twice(found)
        statuses = {kv.key: parse_placement(kv.value)
                    for kv in (await writer.get_prefix(keys.placements)).items}
        d, wide = statuses[keys.placement("d")], statuses[keys.placement("wide")]
        assert (d.placed, d.pending, d.placer) == (2, 0, "p")
        assert (wide.placed, wide.pending) == (0, 1)
        assert wide.reasons == ["needs 4 whole GPUs on one node; most free: 1 on n1"]
        assert placer.pending == 1

        revision = (await writer.get_prefix(keys.prefix + "/")).revision
        assert await placer.place_once(view, fence) == Changes([], [])
        # A fresh read of what etcd now holds agrees too: nothing to write.
        assert await placer.place_once(await read_view(writer, keys), fence) == Changes([], [])
        assert (await writer.get_prefix(keys.prefix + "/")).revision == revision
    finally:
        await writer.revoke_lease(fence.lease)


async def test_a_rolling_update_that_failed_to_start_elsewhere_keeps_the_old_replica(
        prefix: str, writer: EtcdStore) -> None:
    # One replica on n1, of an older generation, serving; its successor already failed to
    # start on n2 (avoided there). Replacing the old one in place would risk the only
    # replica on a generation known to fail: it serves on instead.
    keys = Keys(prefix)
    was = deployment("d")
    now_d = dataclasses.replace(was, env={"V": "2"})
    old = dataclasses.replace(assignment("d", 0, "n1"), generation=generation(was))
    ready = dataclasses.replace(backend("n1", "d-0", "ready", deployment="d"),
                                generation=generation(was))
    avoided = dataclasses.replace(status("d", 1, 0), avoid={"n2": time.time() + 300},
                                  strikes={"n2": 1})
    await writer.put_many([(keys.node("n1"), dump(node("n1"))),
                           (keys.node("n2"), dump(node("n2"))),
                           (keys.deployment("d"), dump(now_d)),
                           (keys.assignment("n1", "d-0"), dump(old)),
                           (keys.backend("n1", "d-0"), dump(ready)),
                           (keys.placement("d"), dump(avoided))])
    fence = await take_fence(writer, keys, "p")
    try:
        placer = Placer(writer, keys, "p")
        await placer.place_once(await read_view(writer, keys), fence)
        assert await assignments_in(writer, keys) == [old]
        # The avoid over, the successor is tried beside it on n2 again.
        await writer.put(keys.placement("d"), dump(status("d", 1, 0)))
        placer = Placer(writer, keys, "p")
        await placer.place_once(await read_view(writer, keys), fence)
        assert sorted((a.node, a.generation) for a in await assignments_in(writer, keys)) == [
            ("n1", generation(was)), ("n2", generation(now_d))]
    finally:
        await writer.revoke_lease(fence.lease)


async def test_an_old_replica_draining_for_a_successor_that_crashed_serves_again(
        prefix: str, writer: EtcdStore) -> None:
    keys = Keys(prefix)
    was = deployment("d")
    now_d = dataclasses.replace(was, env={"V": "2"})
    old = dataclasses.replace(assignment("d", 0, "n1"), generation=generation(was),
                              draining=True)
    new = dataclasses.replace(assignment("d", 0, "n2"), generation=generation(now_d))
    records = [
        (keys.node("n1"), dump(node("n1"))), (keys.node("n2"), dump(node("n2"))),
        (keys.deployment("d"), dump(now_d)),
        (keys.assignment("n1", "d-0"), dump(old)), (keys.assignment("n2", "d-0"), dump(new)),
        (keys.backend("n1", "d-0"), dump(dataclasses.replace(
            backend("n1", "d-0", "draining", deployment="d"), generation=generation(was)))),
        (keys.backend("n2", "d-0"), dump(dataclasses.replace(
            backend("n2", "d-0", "unhealthy", deployment="d"), generation=generation(now_d))))]
    await writer.put_many(records)
    fence = await take_fence(writer, keys, "p")
    try:
        await Placer(writer, keys, "p").place_once(await read_view(writer, keys), fence)
        by_node = {a.node: a for a in await assignments_in(writer, keys)}
        # The old one is taken back into service; the successor is kept to recover.
        assert by_node["n1"] == dataclasses.replace(old, draining=False)
        assert by_node["n2"] == new
    finally:
        await writer.revoke_lease(fence.lease)


async def test_a_short_deployment_named_first_settles_in_one_pass(
        prefix: str, writer: EtcdStore) -> None:
    keys = Keys(prefix)
    await writer.put_many([(keys.node("n1"), dump(node("n1", 2))),
                           (keys.deployment("big"), dump(deployment("big", gpus=4))),
                           (keys.deployment("d"), dump(deployment("d")))])
    fence = await take_fence(writer, keys, "p")
    try:
        placer = Placer(writer, keys, "p")
        view = await read_view(writer, keys)
        assert await placer.place_once(view, fence)
        assert await placer.place_once(view, fence) == Changes([], [])
    finally:
        await writer.revoke_lease(fence.lease)


async def test_a_deposed_placer_writes_nothing_and_no_gpu_is_given_twice(
        prefix: str, writer: EtcdStore) -> None:
    keys = Keys(prefix)
    # Two nodes of one GPU each; A last read the fleet when "alpha" wanted both of them.
    await writer.put_many([(keys.node("n1"), dump(node("n1"))),
                           (keys.node("n2"), dump(node("n2"))),
                           (keys.deployment("alpha"), dump(deployment("alpha", replicas=2)))])
    a_fence = await take_fence(writer, keys, "a")
    a_view = await read_view(writer, keys)
    # A is cut off; its key goes and B is elected with a new token.
    assert await writer.delete(keys.placer_leader)
    b_fence = await take_fence(writer, keys, "b")
    assert b_fence.token > a_fence.token
    try:
        # Meanwhile the operator replaced "alpha" by "beta": B sees it, A does not.
        await writer.delete(keys.deployment("alpha"))
        await writer.put(keys.deployment("beta"), dump(deployment("beta", replicas=2)))
        b_view = await read_view(writer, keys)
        a, b = Placer(writer, keys, "a"), Placer(writer, keys, "b")
        a_result, b_result = await asyncio.gather(a.place_once(a_view, a_fence),
                                                  b.place_once(b_view, b_fence),
                                                  return_exceptions=True)
        assert isinstance(a_result, Deposed), a_result
        assert isinstance(b_result, Changes) and b_result
        found = await assignments_in(writer, keys)
        assert sorted((x.deployment, x.node) for x in found) == [("beta", "n1"),
                                                                  ("beta", "n2")]
        no_gpu_twice(found)
        statuses = await writer.get_prefix(keys.placements)
        assert [parse_placement(kv.value).placer for kv in statuses.items] == ["b"]

        # A catches up with a new deployment that fits nowhere: still fenced out.
        await writer.put(keys.deployment("gamma"), dump(deployment("gamma")))
        with pytest.raises(Deposed):
            await a.place_once(await read_view(writer, keys), a_fence)
        assert {x.deployment for x in await assignments_in(writer, keys)} == {"beta"}
    finally:
        await writer.revoke_lease(a_fence.lease)
        await writer.revoke_lease(b_fence.lease)


async def test_the_running_placer_places_moves_off_a_dead_node_and_resigns(
        prefix: str, writer: EtcdStore) -> None:
    keys = Keys(prefix)
    await writer.put_many([(keys.node("n1"), dump(node("n1"))),
                           (keys.node("n2"), dump(node("n2"))),
                           (keys.deployment("d"), dump(deployment("d")))])
    placer = Placer(writer, keys, "t", ttl=2)
    task = asyncio.create_task(placer.run(), name="placer-under-test")
    try:
        [first] = await until(lambda: assignments_in(writer, keys), 10, "an assignment")
        assert placer.leading
        leader = await writer.get(keys.placer_leader)
        assert leader is not None and b'"t"' in leader
        other = "n2" if first.node == "n1" else "n1"
        await writer.delete(keys.node(first.node))

        async def moved() -> bool:
            found = await assignments_in(writer, keys)
            return [(a.name, a.node) for a in found] == [("d-0", other)]
        await until(moved, 10, f"the replica moved to {other}")
        [again] = await assignments_in(writer, keys)
        assert again.gpu_uuids == [f"GPU-{other}-0"]
        status = parse_placement(await writer.get(keys.placement("d")) or b"")
        assert (status.placed, status.pending) == (1, 0)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert await writer.get(keys.placer_leader) is None  # resigned: the lease was revoked


async def test_a_new_leader_times_a_starting_replica_from_its_first_sight(
        prefix: str, writer: EtcdStore) -> None:
    # The start timer lived in the leader's memory: each new leader gave a replica that
    # could not start another placer_replace_after, so it could stay stuck for ever.
    keys = Keys(prefix)
    await writer.put_many([(keys.node("n1"), dump(node("n1"))),
                           (keys.deployment("d"), dump(deployment("d")))])

    async def leading(holder: str) -> tuple[dict[str, float], dict[str, float]]:
        """What the status records and what the leader itself holds, after its passes."""
        placer = Placer(writer, keys, holder, ttl=2, replace_after=600)
        task = asyncio.create_task(placer.run(), name=f"placer-{holder}")
        try:
            async def recorded() -> dict[str, float] | None:
                s = parse_placement(await writer.get(keys.placement("d")) or b"")
                return s.unready_since if placer.passes >= 2 and s.unready_since else None
            return await until(recorded, 10, f"{holder}'s start timers"), \
                placer.failures.timers("d")[0]
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    first, held = await leading("a")
    [(key, since)] = first.items()
    assert key == "n1/d-0" and since <= time.time() and held == first
    # b goes on with a's timer (before, it started its own, and wrote it over a's).
    assert await leading("b") == (first, first)


async def test_a_new_leader_keeps_avoiding_where_a_replica_did_not_start(
        prefix: str, writer: EtcdStore) -> None:
    # The avoid list lived in the leader's memory: after a failover the new leader put a
    # replica straight back on the node where it had just failed to start.
    keys = Keys(prefix)
    await writer.put_many([(keys.node("n1"), dump(node("n1"))),
                           (keys.node("n2"), dump(node("n2"))),
                           (keys.deployment("d"), dump(deployment("d")))])

    async def status() -> PlacementStatus:
        return parse_placement(await writer.get(keys.placement("d")) or b"")

    def leading(holder: str) -> asyncio.Task[None]:
        # No backend ever becomes ready here: each replica fails to start after 0.5 s.
        placer = Placer(writer, keys, holder, ttl=2, replace_after=0.5)
        return asyncio.create_task(placer.run(), name=f"placer-{holder}")

    task = leading("a")
    try:
        [first] = await until(lambda: assignments_in(writer, keys), 10, "an assignment")
        failed_on = first.node

        async def avoided() -> PlacementStatus | None:
            s = await status()
            return s if failed_on in s.avoid else None
        recorded = await until(avoided, 10, f"{failed_on} avoided in the status")
        assert recorded.strikes == {failed_on: 1}
        assert recorded.avoid[failed_on] > time.time() + 30  # held for avoid_base (60 s)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    # A new leader (another process would be the same: it knows only what etcd holds).
    task = leading("b")
    try:
        async def both_avoided() -> PlacementStatus | None:
            s = await status()
            return s if len(s.avoid) == 2 and s.placer == "b" else None
        final = await until(both_avoided, 10, "the second node avoided too")
        # The replica failed on the other node as well and has nowhere left to go: it
        # waits, rather than going back where it failed a moment ago.
        assert (final.placed, final.pending) == (0, 1)
        assert failed_on not in {x.node for x in await assignments_in(writer, keys)}
        assert final.strikes == {"n1": 1, "n2": 1}
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def test_a_heartbeat_or_probe_jitter_asks_for_no_new_decision() -> None:
    keys = Keys("/p")
    view = FleetView(keys)
    n = NodeRecord("n1", "v", 0.0, 1.0, gpus=[GpuRecord(0, "amd", "g", "u0", "b")])
    view.apply(Reset(Snapshot(1, [KeyValue(keys.node("n1"), dump(n), 1)])))
    beat = dataclasses.replace(n, heartbeat_at=4.0, gpus=[dataclasses.replace(
        n.gpus[0], memory_used_bytes=5, utilization=0.5, temperature_c=60.0)])
    assert view.apply(Event("put", keys.node("n1"), dump(beat), 2)) is False
    assert view.nodes["n1"].heartbeat_at == 4.0  # the view is current all the same
    labelled = dataclasses.replace(beat, labels={"zone": "eu"})
    assert view.apply(Event("put", keys.node("n1"), dump(labelled), 3)) is True
    b = BackendRecord("n1", "d-0", ["m"], "http://x:1", "ready", "sim", deployment="d",
                      probe_latency_ms=1.0)
    key = keys.backend("n1", "d-0")
    assert view.apply(Event("put", key, dump(b), 4)) is True
    jitter = dataclasses.replace(b, probe_latency_ms=3.0, load=BackendLoad(1, 0, 0.2))
    assert view.apply(Event("put", key, dump(jitter), 5)) is False
    assert view.apply(Event("put", key, dump(dataclasses.replace(b, state="unhealthy")),
                            6)) is True
    assert view.apply(Event("delete", keys.node("n1"), b"", 7)) is True
