"""aivmmctl's deployment verbs against a real etcd: what deploy/scale/undeploy write, and
what deployments shows from records written by hand as the placer and the agents would."""

from __future__ import annotations

import argparse
import time

import orjson
import pytest

from common.generation import generation
from common.keys import Keys
from common.records import (
    AssignmentRecord,
    BackendRecord,
    DeploymentRecord,
    PlacementStatus,
    dump,
    parse_deployment,
)
from common.store import EtcdStore, KeyValue
from ctl.deployments import join_arg_values, parse_size, scale_deployment
from devtools.services import EtcdServer
from tests.test_ctl import ctl

GIB = 2**30


def test_sizes_binary_units_decimal_ones_and_plain_bytes() -> None:
    assert parse_size("20GiB") == parse_size("20G") == parse_size("20gi") == 20 * GIB
    assert parse_size("512MiB") == 512 * 2**20 and parse_size("1.5GiB") == 3 * GIB // 2
    assert parse_size("21474836480") == 20 * GIB and parse_size("20GB") == 20 * 10**9
    for bad in ("20 gigs", "", "GiB", "-1GiB", "1e9"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected a size such as"):
            parse_size(bad)


def test_engine_arguments_that_look_like_flags_are_values() -> None:
    assert join_arg_values(["deploy", "x", "--arg", "--dtype", "--arg", "half",
                            "--arg=--max-model-len=4096", "--model", "m"]) == [
        "deploy", "x", "--arg=--dtype", "--arg=half", "--arg=--max-model-len=4096",
        "--model", "m"]
    assert join_arg_values(["deploy", "--arg"]) == ["deploy", "--arg"]  # argparse says why
    assert join_arg_values(["drain", "n", "--reason", "--arg", "x"]) == [
        "drain", "n", "--reason", "--arg", "x"]


async def read(store: EtcdStore, prefix: str, name: str) -> DeploymentRecord | None:
    raw = await store.get(Keys(prefix).deployment(name))
    return None if raw is None else parse_deployment(raw)


async def test_deploy_writes_every_flag_and_redeploy_replaces_it(
        etcd_server: EtcdServer, prefix: str, writer: EtcdStore) -> None:
    before = time.time()
    out = await ctl(etcd_server.url, prefix, "deploy", "llama", "--model", "llama-8b",
                    "--replicas", "3", "--engine", "vllm", "--vendor", "nvidia",
                    "--vendor", "amd", "--node", "gpu-a", "--node", "gpu-b",
                    "--memory", "20GiB", "--label", "zone=eu", "--label", "tier=gold",
                    "--policy", "binpack", "--image", "vllm/vllm-openai:v0.6",
                    "--arg=--max-model-len=4096", "--arg", "--dtype", "--arg", "half",
                    "--env", "HF_HOME=/models", "--env", "OPTS=a=b")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "deployment llama created: 3 replica(s) of llama-8b\n"
    d = await read(writer, prefix, "llama")
    assert d is not None
    assert (d.name, d.model, d.engine, d.replicas, d.gpus, d.memory_bytes) == (
        "llama", "llama-8b", "vllm", 3, 1, 20 * GIB)
    assert d.vendors == ["nvidia", "amd"] and d.nodes == ["gpu-a", "gpu-b"]
    assert d.labels == {"zone": "eu", "tier": "gold"} and d.placement == "binpack"
    assert d.image == "vllm/vllm-openai:v0.6"
    assert d.args == ["--max-model-len=4096", "--dtype", "half"]
    assert d.env == {"HF_HOME": "/models", "OPTS": "a=b"}
    assert before <= d.created_at == d.updated_at <= time.time()

    # The same name again is an update: the flags given are the whole desired state, and
    # only created_at is kept.
    out = await ctl(etcd_server.url, prefix, "deploy", "llama", "--model", "llama-8b",
                    "--gpus", "2")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "deployment llama updated: 1 replica(s) of llama-8b\n"
    again = await read(writer, prefix, "llama")
    assert again is not None and again.created_at == d.created_at < again.updated_at
    assert (again.engine, again.replicas, again.gpus, again.memory_bytes) == ("auto", 1, 2, None)
    assert again.args == [] and again.env == {} and again.vendors == []
    assert again.placement == "spread" and again.image is None


@pytest.mark.parametrize(("argv", "line"), [
    (["deploy", "x", "--model", "m", "--memory", "20 gigs"],
     "aivmmctl: --memory: expected a size such as 20GiB, 512MiB or 21474836480, "
     "got '20 gigs'"),
    (["deploy", "x", "--model", "m", "--gpus", "2", "--memory", "20GiB"],
     "aivmmctl: --memory: cannot be combined with --gpus (a replica takes either whole GPUs "
     "or memory of one shared GPU)"),
    (["deploy", "x", "--model", "m", "--label", "gpu"],
     "aivmmctl: --label: expected KEY=VALUE, got 'gpu'"),
    (["deploy", "bad name!", "--model", "m"],
     "aivmmctl: NAME: expected a name of letters, digits, '.', '_' or '-' (max 48), "
     "got 'bad name!'"),
    (["deploy", "x", "--model", " "], "aivmmctl: --model: expected a model id, got ' '"),
    (["deploy", "x", "--model", "m", "--memory", "0"],
     "aivmmctl: --memory: expected a size > 0"),
    (["deploy", "x", "--model", "m", "--replicas", "two"],
     "aivmmctl: --replicas: expected an integer >= 0, got 'two'"),
    (["deploy", "x", "--model", "m", "--gpus", "-1"],
     "aivmmctl: --gpus: expected an integer >= 0, got '-1'"),
    (["deploy", "x", "--model", "m", "--env", "1X=2"],
     "aivmmctl: --env: expected NAME=VALUE (NAME of letters, digits and '_'), got '1X=2'"),
    (["deploy", "x", "--model", "m", "--node", "a/b"],
     "aivmmctl: --node: expected a node name, got 'a/b'"),
    (["deploy", "x", "--model", "m", "--vendor", "nvida"],
     "aivmmctl: --vendor: invalid choice: 'nvida' (choose from 'nvidia', 'amd', 'intel')"),
    (["deploy", "x"], "aivmmctl: the following arguments are required: --model"),
    (["scale", "nope", "2"], "aivmmctl: no deployment nope"),
    (["scale", "nope", "-2"], "aivmmctl: N: expected an integer >= 0, got '-2'"),
    (["undeploy", "nope"], "aivmmctl: no deployment nope"),
])
async def test_bad_input_is_one_line_naming_the_flag_and_writes_nothing(
        etcd_server: EtcdServer, prefix: str, writer: EtcdStore, argv: list[str],
        line: str) -> None:
    out = await ctl(etcd_server.url, prefix, *argv)
    assert (out.returncode, out.stderr, out.stdout) == (2, line + "\n", "")
    assert (await writer.get_prefix(prefix + "/")).items == []


async def test_scale_changes_only_replicas_and_undeploy_deletes(
        etcd_server: EtcdServer, prefix: str, writer: EtcdStore) -> None:
    out = await ctl(etcd_server.url, prefix, "deploy", "qwen", "--model", "qwen-7b",
                    "--vendor", "intel", "--arg", "--dtype")
    assert out.returncode == 0, out.stderr
    created = await read(writer, prefix, "qwen")
    out = await ctl(etcd_server.url, prefix, "scale", "qwen", "4")
    assert (out.returncode, out.stdout) == (0, "deployment qwen scaled: 1 -> 4 replica(s)\n")
    scaled = await read(writer, prefix, "qwen")
    assert created is not None and scaled is not None
    assert scaled.replicas == 4 and scaled.updated_at > created.updated_at
    assert (scaled.vendors, scaled.args, scaled.created_at) == (
        ["intel"], ["--dtype"], created.created_at)

    out = await ctl(etcd_server.url, prefix, "undeploy", "qwen")
    assert out.returncode == 0 and out.stdout.startswith("deployment qwen deleted"), out.stderr
    assert await read(writer, prefix, "qwen") is None
    again = await ctl(etcd_server.url, prefix, "undeploy", "qwen")
    assert (again.returncode, again.stderr) == (2, "aivmmctl: no deployment qwen\n")


class Interleaved(EtcdStore):
    """A store whose first read of a key is followed at once by someone else's write."""

    def __init__(self, endpoints: list[str], other: EtcdStore) -> None:
        super().__init__(endpoints)
        self.other = other
        self.reads = 0

    async def get_item(self, key: str) -> KeyValue | None:
        kv = await super().get_item(key)
        self.reads += 1
        if self.reads == 1 and kv is not None:
            record = parse_deployment(kv.value)
            record.image = "changed-meanwhile"
            await self.other.put(key, dump(record))
        return kv


async def test_scale_is_a_compare_and_swap_that_keeps_a_concurrent_change(
        etcd_server: EtcdServer, prefix: str, writer: EtcdStore) -> None:
    keys = Keys(prefix)
    await writer.put(keys.deployment("llama"), dump(DeploymentRecord("llama", "llama-8b")))
    store = Interleaved([etcd_server.url], writer)
    async with store:
        assert await scale_deployment(store, keys, "llama", 5) == (1, 5)
        assert store.reads == 2  # the first swap lost the race, the second re-read and won
    d = await read(writer, prefix, "llama")
    assert d is not None and (d.replicas, d.image) == (5, "changed-meanwhile")


async def write_placed(writer: EtcdStore, prefix: str) -> None:
    """Three deployments as the placer and agents would leave them, and a corrupt one.

    llama: 3 wanted, 2 placed (2 whole GPUs each), one ready, one starting, one pending
    with the placer's reason; an old replica on gpu-c is still being removed.
    qwen: 1 wanted, placed with 20 GiB of a shared GPU, its agent has not reported yet.
    mistral: not yet seen by the placer.
    """
    keys = Keys(prefix)
    now = time.time()
    deployments = [
        DeploymentRecord("llama", "llama-8b", engine="vllm", replicas=3, gpus=2,
                         vendors=["nvidia"], env={"HF_TOKEN": "secret"},
                         created_at=now, updated_at=now),
        DeploymentRecord("qwen", "qwen-7b", replicas=1, memory_bytes=20 * GIB,
                         placement="binpack", created_at=now, updated_at=now),
        DeploymentRecord("mistral", "mistral-7b", replicas=2, created_at=now, updated_at=now)]
    current = generation(deployments[0])
    assignments = [
        AssignmentRecord("llama", 0, "gpu-a", "llama-8b", "vllm", "nvidia", gpus=[0, 1],
                         generation=current, assigned_at=now),
        AssignmentRecord("llama", 1, "gpu-b", "llama-8b", "vllm", "nvidia", gpus=[2, 3],
                         generation=current, assigned_at=now),
        # Of an older generation of qwen: a rolling update has not reached it yet.
        AssignmentRecord("qwen", 0, "arc-b", "qwen-7b", "ipex-llm", "intel", gpus=[0],
                         memory_bytes=20 * GIB, generation="g0", assigned_at=now)]
    placements = [
        PlacementStatus("llama", placed=2, pending=1, placer="sched-1",
                        reasons=["no node has 2 free nvidia GPUs (gpu-a: 0, gpu-b: 1)"]),
        PlacementStatus("qwen", placed=1, pending=0, placer="sched-1")]
    backends = [
        BackendRecord("gpu-a", "llama-0", ["llama-8b"], "http://10.0.0.5:8001", "ready",
                      "vllm", vendor="nvidia", deployment="llama"),
        BackendRecord("gpu-b", "llama-1", ["llama-8b"], "http://10.0.0.7:8001", "starting",
                      "vllm", vendor="nvidia", deployment="llama"),
        BackendRecord("gpu-c", "llama-1", ["llama-8b"], "http://10.0.0.8:8001", "ready",
                      "vllm", vendor="nvidia", deployment="llama"),
        BackendRecord("gpu-a", "pinned", ["other"], "http://10.0.0.5:8009", "ready", "vllm")]
    await writer.put_many(
        [(keys.deployment(d.name), dump(d)) for d in deployments]
        + [(keys.deployment("broken"), b'{"schema": 1, "name": "broken"}')]
        + [(keys.assignment(a.node, a.name), dump(a)) for a in assignments]
        + [(keys.placement(p.deployment), dump(p)) for p in placements]
        + [(keys.backend(b.node, b.name), dump(b)) for b in backends])


@pytest.fixture
async def placed(etcd_server: EtcdServer, prefix: str, writer: EtcdStore) -> str:
    await write_placed(writer, prefix)
    return etcd_server.url


async def test_deployments_table_shows_counts_placement_and_why_pending(
        placed: str, prefix: str) -> None:
    out = await ctl(placed, prefix, "deployments")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "DEPLOYMENTS (3)"
    assert lines[1].split() == ["NAME", "MODEL", "ENGINE", "POLICY", "DESIRED", "PLACED",
                                "READY", "PENDING"]
    row = {ln.split()[0]: ln for ln in lines[2:5]}
    assert row["llama"].split()[:7] == ["llama", "llama-8b", "vllm", "spread", "3", "2", "2"]
    assert row["llama"].endswith("1: no node has 2 free nvidia GPUs (gpu-a: 0, gpu-b: 1)")
    assert row["qwen"].split()[:7] == ["qwen", "qwen-7b", "auto", "binpack", "1", "1", "0"]
    assert row["qwen"].endswith("rolling update: 0/1 on the new generation")
    assert "rolling update" not in row["llama"]
    assert row["mistral"].split()[4:7] == ["2", "0", "0"]
    assert row["mistral"].endswith("  2: waiting for the placer")
    replicas = [ln.split() for ln in lines[lines.index("REPLICAS (4)") + 2:]
                if ln.strip() and not ln.startswith("warning")]
    # Which vendor each replica landed on: a deployment may span vendors.
    assert ["llama", "0", "gpu-a", "nvidia", "0,1", "llama-0", "ready"] in replicas
    assert ["llama", "1", "gpu-b", "nvidia", "2,3", "llama-1", "starting"] in replicas
    assert ["llama", "-", "gpu-c", "nvidia", "-", "llama-1", "ready", "(removing)"] in replicas
    assert ["qwen", "0", "arc-b", "intel", "0", "(20.0", "GiB)", "qwen-0", "assigned",
            "(old", "generation)"] in replicas
    assert ["llama", "0", "gpu-a", "nvidia", "0,1", "llama-0", "ready"] in replicas
    assert lines[-1] == "warning: 1 record(s) could not be parsed and were skipped"
    assert "secret" not in out.stdout


async def test_deployments_json_is_the_documented_shape(placed: str, prefix: str) -> None:
    out = await ctl(placed, prefix, "deployments", "--json")
    assert out.returncode == 0, out.stderr
    doc = orjson.loads(out.stdout)
    assert doc["skipped"] == 1
    by_name = {d["name"]: d for d in doc["deployments"]}
    assert list(by_name) == ["llama", "mistral", "qwen"]
    llama = by_name["llama"]
    assert set(llama) == {
        "name", "model", "engine", "policy", "desired", "placed", "ready", "pending",
        "reasons", "placer", "placement_updated_at", "request", "image", "args", "env",
        "created_at", "updated_at", "replicas", "autoscale", "rollout"}
    assert (llama["desired"], llama["placed"], llama["ready"], llama["pending"]) == (3, 2, 2, 1)
    assert llama["reasons"] == ["no node has 2 free nvidia GPUs (gpu-a: 0, gpu-b: 1)"]
    assert llama["request"] == {"gpus": 2, "memory_bytes": None, "vendors": ["nvidia"],
                                "nodes": [], "labels": {}, "cpus": None}
    assert llama["env"] == ["HF_TOKEN"] and llama["placer"] == "sched-1"
    assert [(r["replica"], r["node"], r["gpus"], r["state"], r["assigned"])
            for r in llama["replicas"]] == [(0, "gpu-a", [0, 1], "ready", True),
                                            (1, "gpu-b", [2, 3], "starting", True),
                                            (None, "gpu-c", [], "ready", False)]
    assert llama["rollout"] is None and all(r["current"] for r in llama["replicas"][:2])
    qwen = by_name["qwen"]["replicas"][0]
    assert (qwen["gpus"], qwen["memory_bytes"], qwen["memory_gib"], qwen["state"]) == (
        [0], 20 * GIB, 20.0, None)
    assert (by_name["qwen"]["rollout"], qwen["current"]) == ({"done": 0, "of": 1}, False)
    assert (by_name["mistral"]["pending"], by_name["mistral"]["replicas"]) == (None, [])


async def test_status_has_a_deployments_section(placed: str, prefix: str) -> None:
    out = await ctl(placed, prefix, "status")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    at = lines.index("DEPLOYMENTS (3)")
    assert lines[at + 1].split() == ["NAME", "MODEL", "DESIRED/PLACED/READY", "PENDING"]
    assert lines[at + 2].split()[:3] == ["llama", "llama-8b", "3/2/2"]
    assert lines[at + 2].endswith("1: no node has 2 free nvidia GPUs (gpu-a: 0, gpu-b: 1)")
    assert lines[at + 4].split()[:3] == ["qwen", "qwen-7b", "1/1/0"]
    assert "warning: 1 record(s) could not be parsed and were skipped" in lines
    js = orjson.loads((await ctl(placed, prefix, "status", "--json")).stdout)
    assert [d["name"] for d in js["deployments"]] == ["llama", "mistral", "qwen"]
