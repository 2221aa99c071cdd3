"""The audit trail: aivmmctl's entries in the same transaction as its changes, the placer's
and the agent's own entries, `aivmmctl audit`, and retention (real etcd)."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import socket
import time
from pathlib import Path

import orjson
import pytest
from prometheus_client import CollectorRegistry

from agent.config import AgentConfig, BackendConfig
from agent.docker.observed import ObservedContainer
from agent.metrics import AgentMetrics
from agent.supervisor import Remove, Start, Supervisor
from common import audit
from common.keys import Keys
from common.records import (
    AuditEntry,
    DeploymentRecord,
    DrainRecord,
    RecordError,
    dump,
    parse,
    parse_audit,
)
from common.store import EtcdStore, Event
from devtools.services import EtcdServer, until
from scheduler.placer.service import Placer
from tests.test_ctl import ctl
from tests.test_placer_service import deployment, node, read_view, take_fence

ACTOR = f"{getpass.getuser()}@{socket.gethostname()}"


# -- pure ---------------------------------------------------------------------------------------

def test_compaction_removes_what_is_too_old_and_beyond_the_count_oldest_first() -> None:
    now = 1_000_000.0
    entries = [(f"k{i}", now - 100 * i) for i in range(10)]  # k0 newest, k9 oldest
    assert audit.to_compact(entries, now, keep_seconds=450, keep_count=100) == [
        "k9", "k8", "k7", "k6", "k5"]
    assert audit.to_compact(entries, now, keep_seconds=10_000, keep_count=3) == [
        "k9", "k8", "k7", "k6", "k5", "k4", "k3"]
    assert audit.to_compact(entries, now, keep_seconds=10_000, keep_count=100) == []
    assert audit.to_compact([], now, keep_seconds=1, keep_count=1) == []
    # Either limit alone suffices: the stricter one wins.
    assert audit.to_compact(entries, now, keep_seconds=250, keep_count=5) == [
        "k9", "k8", "k7", "k6", "k5", "k4", "k3"]


def test_audit_keys_sort_by_time_and_give_their_time_back() -> None:
    keys = Keys("/p")
    early, late = keys.audit_entry(999_000_000_000, "abc123"), keys.audit_entry(
        1_700_000_000_123_456_789, "000000")
    assert early < late and early.startswith(keys.audit)
    assert keys.audit_time_ns(late) == 1_700_000_000_123_456_789
    assert keys.audit_time_ns("/p/audit/nonsense") is None
    assert keys.audit_time_ns("/p/nodes/n1") is None
    assert audit.key_times(keys, [late, "/p/audit/x"]) == [(late, 1_700_000_000.1234567)]


def test_entries_redact_secret_environment_values_and_name_changed_fields() -> None:
    old = DeploymentRecord("d", "m", env={"HF_TOKEN": "hf_secret", "MODE": "a"})
    new = DeploymentRecord("d", "m", replicas=3, env={"HF_TOKEN": "hf_other", "MODE": "b"},
                           updated_at=5.0)
    e = audit.entry("aivmmctl", "deploy", "d", old=old, new=new)
    assert "hf_secret" not in (e.old or "") and "hf_other" not in (e.new or "")
    assert orjson.loads(e.new or "")["env"] == {"HF_TOKEN": audit.REDACTED, "MODE": "b"}
    assert audit.changed_fields(old, new) == "env HF_TOKEN, MODE changed, replicas 1 -> 3"
    assert e.actor == ACTOR and parse_audit(dump(e)) == e


def test_since_takes_durations_and_dates_and_matches_filters() -> None:
    now = 1_000_000.0
    assert audit.parse_since("1h", now) == now - 3600
    assert audit.parse_since("30m", now) == now - 1800
    assert audit.parse_since("2d", now) == now - 2 * 86400
    assert audit.parse_since("2024-05-01T12:00:00+00:00", now) == 1714564800.0
    with pytest.raises(ValueError, match="expected a duration"):
        audit.parse_since("yesterday", now)
    e = AuditEntry(now, "a@b", "agent", "restart", "n1/d-0")
    assert audit.matches(e, since=now - 1, target="n1")
    assert audit.matches(e, target="n1/d-0") and not audit.matches(e, target="n1/d")
    assert not audit.matches(e, since=now + 1)
    with pytest.raises(RecordError):
        parse_audit(b'{"schema": 1, "time": 1.0, "actor": "x", "source": "me", "verb": "v",'
                    b' "target": "t"}')


# -- aivmmctl on a real etcd --------------------------------------------------------------------

async def revision(store: EtcdStore) -> int:
    return (await store.get_prefix("/no-such-prefix/")).revision


async def events_since(store: EtcdStore, prefix: str, since: int) -> list[Event]:
    """Every change under ``prefix`` after revision ``since``, up to now."""
    upto = await revision(store)
    out: list[Event] = []
    if upto <= since:
        return out
    async with contextlib.aclosing(store.watch_prefix(prefix, since + 1)) as events:
        # Up to now; then a moment more, as the rest of the last revision follows at once.
        while not out or out[-1].revision < upto:
            out.append(await asyncio.wait_for(anext(events), 10))
        with contextlib.suppress(TimeoutError):
            while True:
                out.append(await asyncio.wait_for(anext(events), 0.2))
    return out


async def one_change(store: EtcdStore, keys: Keys, since: int, key: str, kind: str
                     ) -> AuditEntry:
    """The audit entry written after ``since``, asserting it is the only one and that it
    came in the same revision as the change of ``key``."""
    events = await events_since(store, keys.prefix + "/", since)
    entries = [e for e in events if e.key.startswith(keys.audit)]
    changes = [e for e in events if e.key == key]
    assert len(entries) == 1, events
    assert [c.kind for c in changes] == [kind], events
    assert entries[0].revision == changes[0].revision  # one transaction
    return parse_audit(entries[0].value)


async def test_each_ctl_change_writes_one_entry_in_its_own_transaction(
        etcd_server: EtcdServer, prefix: str, writer: EtcdStore) -> None:
    keys = Keys(prefix)
    url = etcd_server.url
    dkey = keys.deployment("chat")

    rev = await revision(writer)
    out = await ctl(url, prefix, "deploy", "chat", "--model", "llama-8b",
                    "--env", "HF_TOKEN=hf_secret")
    assert out.returncode == 0, out.stderr
    e = await one_change(writer, keys, rev, dkey, "put")
    assert (e.actor, e.source, e.verb, e.target, e.old) == (ACTOR, "aivmmctl", "deploy",
                                                          "chat", None)
    assert parse(e.new or "", DeploymentRecord).model == "llama-8b"
    assert "hf_secret" not in (e.new or "") and e.detail.startswith("created")
    assert abs(e.time - time.time()) < 30

    rev = await revision(writer)
    assert (await ctl(url, prefix, "scale", "chat", "3")).returncode == 0
    e = await one_change(writer, keys, rev, dkey, "put")
    assert e.verb == "scale" and e.detail == "replicas 1 -> 3"
    assert parse(e.old or "", DeploymentRecord).replicas == 1
    assert parse(e.new or "", DeploymentRecord).replicas == 3

    rev = await revision(writer)
    assert (await ctl(url, prefix, "deploy", "chat", "--model", "llama-70b",
                      "--replicas", "3")).returncode == 0
    e = await one_change(writer, keys, rev, dkey, "put")
    assert e.verb == "deploy" and e.detail == (
        "updated: env HF_TOKEN changed, model llama-8b -> llama-70b"), e.detail

    rev = await revision(writer)
    assert (await ctl(url, prefix, "undeploy", "chat")).returncode == 0
    e = await one_change(writer, keys, rev, dkey, "delete")
    assert e.verb == "undeploy" and e.new is None
    assert parse(e.old or "", DeploymentRecord).model == "llama-70b"
    assert (await ctl(url, prefix, "undeploy", "chat")).returncode == 2  # nothing recorded

    rev = await revision(writer)
    assert (await ctl(url, prefix, "drain", "n1", "--reason", "driver update")).returncode == 0
    e = await one_change(writer, keys, rev, keys.drain("n1"), "put")
    assert (e.verb, e.target, e.old) == ("drain", "n1", None)
    assert parse(e.new or "", DrainRecord).reason == "driver update"

    rev = await revision(writer)
    assert (await ctl(url, prefix, "undrain", "n1")).returncode == 0
    e = await one_change(writer, keys, rev, keys.drain("n1"), "delete")
    assert e.verb == "undrain" and e.new is None
    assert parse(e.old or "", DrainRecord).reason == "driver update"
    # Undraining a node that is not drained changes nothing and records nothing.
    assert (await ctl(url, prefix, "undrain", "n1")).returncode == 0
    assert len((await writer.get_prefix(keys.audit)).items) == 6


async def test_ctl_audit_filters_by_target_and_time(etcd_server: EtcdServer, prefix: str,
                                                    writer: EtcdStore) -> None:
    keys = Keys(prefix)
    url = etcd_server.url
    old = audit.entry("aivmmctl", "deploy", "a", new={"x": 1}, now=time.time() - 7200,
                      detail="two hours ago")
    await writer.put(*audit.audit_put(keys, old))
    await writer.put(keys.audit_entry(time.time_ns(), "bad000"), b"{not json")
    for args in (["deploy", "a", "--model", "m"], ["deploy", "b", "--model", "m"],
                 ["scale", "a", "2"], ["drain", "a"]):
        assert (await ctl(url, prefix, *args)).returncode == 0

    out = await ctl(url, prefix, "audit", "--target", "a", "--since", "1h", "--json")
    assert out.returncode == 0, out.stderr
    data = orjson.loads(out.stdout)
    assert [(e["verb"], e["target"]) for e in data["entries"]] == [
        ("deploy", "a"), ("scale", "a"), ("drain", "a")]
    assert data["skipped"] == 1 and all(e["actor"] == ACTOR for e in data["entries"])

    everything = orjson.loads((await ctl(url, prefix, "audit", "--json")).stdout)["entries"]
    assert everything[0]["detail"] == "two hours ago"  # oldest first
    assert len(everything) == 5
    last = orjson.loads((await ctl(url, prefix, "audit", "--json", "--limit", "2")).stdout)
    assert [e["verb"] for e in last["entries"]] == ["scale", "drain"]

    text = (await ctl(url, prefix, "audit", "--target", "b")).stdout.splitlines()
    assert text[0] == "AUDIT (1)" and text[1].split() == ["TIME", "ACTOR", "VERB", "TARGET",
                                                           "DETAIL/CHANGE"]
    assert text[2].split()[2:6] == [ACTOR, "deploy", "b", "created:"]
    bad = await ctl(url, prefix, "audit", "--since", "someday")
    assert bad.returncode == 2 and bad.stderr.startswith("aivmmctl: --since: expected")


# -- the placer ---------------------------------------------------------------------------------

async def test_the_placer_records_a_replica_moved_off_a_lost_node_in_the_same_revision(
        prefix: str, writer: EtcdStore) -> None:
    keys = Keys(prefix)
    await writer.put_many([(keys.node("n1"), dump(node("n1"))),
                           (keys.node("n2"), dump(node("n2"))),
                           (keys.deployment("d"), dump(deployment("d")))])
    fence = await take_fence(writer, keys, "p")
    try:
        placer = Placer(writer, keys, "p")
        await placer.place_once(await read_view(writer, keys), fence)
        [first] = [parse_audit(kv.value) for kv in (await writer.get_prefix(keys.audit)).items]
        assert (first.source, first.verb, first.target, first.actor) == (
            "placer", "place", "d", "p")
        assert first.detail == "new deployment" and orjson.loads(first.old or "") == []
        [placed] = orjson.loads(first.new or "")
        lost = placed.split("@")[1].split(":")[0]
        other = "n2" if lost == "n1" else "n1"

        await writer.delete(keys.node(lost))
        await placer.place_once(await read_view(writer, keys), fence)
        trail = (await writer.get_prefix(keys.audit)).items
        assert len(trail) == 2
        moved = parse_audit(trail[-1].value)
        assert moved.detail == f"node {lost} lost: replica 0 moved to {other}/gpu0"
        assert orjson.loads(moved.old or "") == [f"0@{lost}:0"]
        assert orjson.loads(moved.new or "") == [f"0@{other}:0"]
        kv = await writer.get_item(keys.assignment(other, "d-0"))
        assert kv is not None and kv.mod_revision == trail[-1].mod_revision

        # Scaled down to none: the replica goes, and the entry says why.
        await writer.put(keys.deployment("d"), dump(deployment("d", replicas=0)))
        await placer.place_once(await read_view(writer, keys), fence)
        last = parse_audit((await writer.get_prefix(keys.audit)).items[-1].value)
        assert last.detail == "scaled to 0: replica 0 removed" and last.new == "[]"
        # Nothing changed, nothing recorded.
        await placer.place_once(await read_view(writer, keys), fence)
        assert len((await writer.get_prefix(keys.audit)).items) == 3
    finally:
        await writer.revoke_lease(fence.lease)


async def test_the_placer_compacts_the_trail_by_age_and_count(prefix: str,
                                                             writer: EtcdStore) -> None:
    keys = Keys(prefix)
    now = time.time()
    ages = [40 * 86400, 31 * 86400, 3600, 60, 1]  # two past 30 days
    await writer.put_many([audit.audit_put(keys, audit.entry(
        "aivmmctl", "deploy", f"d{i}", now=now - age)) for i, age in enumerate(ages)])
    fence = await take_fence(writer, keys, "p")
    try:
        placer = Placer(writer, keys, "p", audit_keep_seconds=30 * 86400,
                        audit_keep_entries=2)
        assert await placer.compact_audit(fence) == 3
        left = [parse_audit(kv.value).target for kv in (await writer.get_prefix(keys.audit)).items]
        assert left == ["d3", "d4"]
        assert await placer.compact_audit(fence) == 0
    finally:
        await writer.revoke_lease(fence.lease)


async def test_the_running_placer_compacts_while_leading(prefix: str, writer: EtcdStore
                                                         ) -> None:
    keys = Keys(prefix)
    await writer.put(*audit.audit_put(keys, audit.entry("aivmmctl", "deploy", "old",
                                                        now=time.time() - 7200)))
    placer = Placer(writer, keys, "t", ttl=2, audit_keep_seconds=3600,
                    audit_compact_interval=0.2)
    task = asyncio.create_task(placer.run(), name="placer-under-test")
    try:
        async def empty() -> bool:
            return not (await writer.get_prefix(keys.audit)).items
        await until(empty, 10, "the old entry compacted")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# -- the agent ----------------------------------------------------------------------------------

class FakeDocker:
    """Just what the supervisor's start and remove actions call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    async def start(self, container_id: str) -> None:
        self.calls.append(("start", container_id))

    async def remove(self, container_id: str, *, stop_timeout: int = 10) -> None:
        self.calls.append(("remove", container_id))


async def test_the_agent_records_a_crash_restart_and_a_drain_removal_through_etcd(
        prefix: str, writer: EtcdStore, tmp_path: Path) -> None:
    keys = Keys(prefix)
    config = AgentConfig(node_name="n1", models_dir=str(tmp_path), sysfs_root=str(tmp_path),
                         backend=[BackendConfig(name="s1", model="m", engine="sim",
                                                port=18123)])
    trail = audit.AuditWriter(writer, keys)
    docker = FakeDocker()
    sup = Supervisor(config, docker, AgentMetrics(CollectorRegistry(), "n1"),  # type: ignore[arg-type]
                     gpus=lambda: ([], []), on_audit=trail.add)
    crashed = ObservedContainer(id="c" * 64, name="x", node="n1", backend="s1",
                                config_hash="h", running=False, status="exited", exit_code=137,
                                finished_at="t1")
    await sup._act(Start("s1", crashed))  # first sight: backoff, no start yet
    sup.status["s1"].not_before = 0.0
    await sup._act(Start("s1", crashed))
    sup.set_drained("maintenance")
    await sup._act(Remove("s1", crashed))
    assert docker.calls == [("start", "c" * 64), ("remove", "c" * 64)]

    task = asyncio.create_task(trail.run(), name="audit-writer")
    try:
        async def written() -> list[AuditEntry]:
            items = (await writer.get_prefix(keys.audit)).items
            return [parse_audit(kv.value) for kv in items] if len(items) == 2 else []
        restart, drain = await until(written, 10, "two agent entries in etcd")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert (restart.source, restart.verb, restart.target) == ("agent", "restart", "n1/s1")
    assert restart.detail == "container exited with code 137; restarted (restart 1)"
    assert (drain.verb, drain.target) == ("drain", "n1/s1")
    assert drain.detail == f"container {'c' * 12} removed: node drained (maintenance)"


def test_the_agent_queue_is_bounded_and_drops_what_does_not_fit() -> None:
    trail = audit.AuditWriter(None, Keys("/p"), size=2)  # type: ignore[arg-type]
    for i in range(5):
        trail.add(audit.entry("agent", "restart", f"n1/b{i}"))
    assert trail.queue.qsize() == 2 and trail.dropped == 3
