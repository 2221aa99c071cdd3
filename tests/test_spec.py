"""Container specs: labels, GPU mapping by vendor, hardening, config hash."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from agent.config import BackendConfig
from agent.docker.spec import LABEL_HASH, ContainerSpec, build_spec
from tests.test_placement import gpu


def spec(engine: str = "vllm", gpus: tuple = (), vendor: str | None = "nvidia",
         node_gpus: tuple = (), gids: dict[str, int] | None = None,
         **kw: object) -> ContainerSpec:
    kw.setdefault("port", 8001)
    b = BackendConfig(name="llm", model="meta/llama", engine=engine, **kw)  # type: ignore[arg-type]
    return build_spec("n1", b, list(gpus), vendor, models_dir="/srv/models",  # type: ignore[arg-type]
                      advertise_host="10.0.0.5", node_gpus=list(node_gpus), device_gids=gids)


def test_labels_name_the_node_backend_and_config_hash() -> None:
    s = spec(gpus=(gpu(0),))
    assert s.labels["aivmm.managed"] == "true"
    assert s.labels["aivmm.node"] == "n1"
    assert s.labels["aivmm.backend"] == "llm"
    assert len(s.labels[LABEL_HASH]) == 16
    assert s.name == "aivmm-n1-llm"
    assert s.url == "http://10.0.0.5:8001"


def test_every_container_is_hardened_and_mounts_models_read_only() -> None:
    s = spec(gpus=(gpu(0),), memory_limit="16g")
    assert s.security_opt == ["no-new-privileges"]
    assert s.volumes == {"/srv/models": {"bind": "/models", "mode": "ro"}}
    assert s.mem_limit == "16g"
    assert s.network == "host" and s.ports == {}


def test_nvidia_gets_a_device_request_for_the_uuids() -> None:
    s = spec(gpus=(gpu(0), gpu(1)))
    assert s.nvidia_device_ids == ["GPU-nvidia-0", "GPU-nvidia-1"]
    assert s.env["NVIDIA_VISIBLE_DEVICES"] == "GPU-nvidia-0,GPU-nvidia-1"
    assert s.devices == [] and s.group_add == []


def test_amd_gets_kfd_its_render_nodes_and_video_render_groups() -> None:
    s = spec(gpus=(gpu(2, "amd"),), vendor="amd")
    assert s.devices == ["/dev/kfd:/dev/kfd:rwm", "/dev/dri/renderD130:/dev/dri/renderD130:rwm"]
    assert s.group_add == ["video", "render"]
    assert s.env["HIP_VISIBLE_DEVICES"] == "0"
    assert s.nvidia_device_ids == []


def test_intel_gets_render_and_card_nodes_and_an_affinity_mask_on_multi_gpu_nodes() -> None:
    # A BMC's display took card0: the Arc's primary node is card2, not "card1" from renderD129.
    g1 = dataclasses.replace(gpu(1, "intel"), card_node="/dev/dri/card2")
    g2 = gpu(2, "intel")
    alone = spec("ipex-llm", (g1,), "intel", node_gpus=(g1,))
    assert alone.devices == ["/dev/dri/renderD129:/dev/dri/renderD129:rwm",
                             "/dev/dri/card2:/dev/dri/card2:rwm"]
    assert "ZE_AFFINITY_MASK" not in alone.env
    shared = spec("ipex-llm", (g2,), "intel", node_gpus=(g1, g2))
    assert shared.env["ZE_AFFINITY_MASK"] == "0"


def test_bridge_network_publishes_the_port_on_the_advertised_address() -> None:
    s = spec("sim", vendor=None, network="bridge")
    assert s.network == "bridge"
    assert s.ports == {"8001/tcp": ("10.0.0.5", 8001)}
    assert "0.0.0.0" in s.command


def test_sim_runs_without_gpus_on_its_own_port() -> None:
    s = spec("sim", vendor=None)
    assert s.image == "aivmm-sim:latest"
    assert s.command == ["--host", "10.0.0.5", "--port", "8001", "--model", "meta/llama"]
    assert s.devices == [] and s.nvidia_device_ids == [] and s.gpu_uuids == []


def test_config_hash_is_stable_and_changes_with_anything_that_defines_the_container() -> None:
    base = spec("sim", vendor=None).config_hash
    assert spec("sim", vendor=None).config_hash == base
    for change in ({"args": ["--x"]}, {"env": {"A": "1"}}, {"memory_limit": "1g"},
                   {"image": "other"}, {"port": 9000}):
        assert spec("sim", vendor=None, **change).config_hash != base, change
    assert spec(gpus=(gpu(0),)).config_hash != spec(gpus=(gpu(1),)).config_hash


def test_openvino_serves_the_api_under_v3_and_config_can_override_it() -> None:
    # OpenVINO Model Server's OpenAI endpoints live under /v3; the probe and the scheduler
    # read this from the spec and the record instead of assuming /v1.
    assert spec("openvino", vendor="intel").api_path == "/v3"
    assert spec("vllm").api_path == "/v1"
    custom = BackendConfig(name="c", model="m", engine="custom", port=8001, image="x:1",
                           api_path="/openai/v1")
    assert build_spec("n", custom, [], None, models_dir="/m",
                      advertise_host="127.0.0.1").api_path == "/openai/v1"


def test_a_cpu_quota_is_in_the_spec_and_the_hash() -> None:
    plain = spec("sim", vendor=None)
    quota = spec("sim", vendor=None, cpus=0.5, cpuset="0-1")
    assert quota.nano_cpus == 500_000_000 and quota.cpuset_cpus == "0-1"
    assert plain.nano_cpus is None and plain.cpuset_cpus is None
    assert quota.config_hash != plain.config_hash
    assert spec("sim", vendor=None, cpus=1.0).config_hash != quota.config_hash


def test_an_upgrade_that_adds_the_quota_fields_keeps_every_existing_hash() -> None:
    # Containers created before the quota existed were hashed without those fields: a spec
    # with no quota must hash the same, or every engine of the fleet is recreated.
    import hashlib

    import orjson

    s = spec("sim", vendor=None)
    before = {k: v for k, v in dataclasses.asdict(dataclasses.replace(s, labels={})).items()
              if k not in ("nano_cpus", "cpuset_cpus")}
    digest = hashlib.sha256(orjson.dumps(before, option=orjson.OPT_SORT_KEYS)).hexdigest()
    assert s.config_hash == digest[:16]


def test_a_quota_beyond_the_node_is_refused_with_the_reason() -> None:
    from agent.docker.spec import quota_problem

    cores = {0, 1}
    assert quota_problem(2.0, "0-1", cores) is None
    assert "exceeds this node's 2 usable cores" in (quota_problem(4.0, None, cores) or "")
    assert "names CPUs this node cannot use: 2,3" in (quota_problem(None, "1-3", cores) or "")


def test_gpu_groups_are_the_numeric_gids_of_the_device_nodes() -> None:
    # An engine image without "video"/"render" in its /etc/group still gets the groups.
    amd = gpu(2, "amd")
    gids = {"/dev/kfd": 992, "/dev/dri/renderD130": 992, "/dev/dri/card2": 44}
    s = spec(gpus=(amd,), vendor="amd", gids=gids)
    assert s.group_add == ["992"]  # kfd and renderD130 share the render group: once
    old_distro = spec(gpus=(amd,), vendor="amd", gids={**gids, "/dev/kfd": 44})
    assert old_distro.group_add == ["44", "992"]  # kfd owned by video there
    intel = dataclasses.replace(gpu(1, "intel"), card_node="/dev/dri/card1")
    i = spec("ipex-llm", (intel,), "intel", node_gpus=(intel,),
             gids={"/dev/dri/renderD129": 109, "/dev/dri/card1": 44})
    assert i.group_add == ["109", "44"]
    assert spec(gpus=(gpu(0),), gids=gids).group_add == []  # NVIDIA: the toolkit's business
    # Unreadable nodes: AMD keeps the group names, as before.
    assert spec(gpus=(amd,), vendor="amd", gids={}).group_add == ["video", "render"]


def test_gids_are_read_from_the_device_nodes_under_a_dev_root(tmp_path: Path) -> None:
    import os

    import pytest

    from agent.inventory.devnodes import device_gids, device_nodes

    amd = gpu(2, "amd")
    nodes = device_nodes([amd])
    assert nodes[0] == "/dev/kfd" and "/dev/dri/renderD130" in nodes
    (tmp_path / "dri").mkdir()
    (tmp_path / "kfd").touch()
    (tmp_path / "dri" / "renderD130").touch()
    if os.geteuid() != 0:
        pytest.skip("chown to the render group needs root")
    os.chown(tmp_path / "kfd", 0, 992)
    os.chown(tmp_path / "dri" / "renderD130", 0, 992)
    gids = device_gids(nodes, str(tmp_path))
    assert gids == {"/dev/kfd": 992, "/dev/dri/renderD130": 992}  # card2 absent: left out
    assert spec(gpus=(amd,), vendor="amd", gids=gids).group_add == ["992"]


def test_numeric_groups_hash_as_the_names_did_so_an_upgrade_recreates_nothing() -> None:
    amd = (gpu(2, "amd"),)
    named = spec(gpus=amd, vendor="amd")
    numbered = build_spec("n1", BackendConfig(name="llm", model="meta/llama", engine="vllm",
                                              port=8001), list(amd), "amd",
                          models_dir="/srv/models", advertise_host="10.0.0.5",
                          device_gids={"/dev/kfd": 993, "/dev/dri/renderD130": 992})
    assert named.group_add == ["video", "render"]
    assert numbered.group_add == ["993", "992"]
    assert numbered.config_hash == named.config_hash
