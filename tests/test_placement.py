"""GPU placement and engine profiles: pure decisions, tested directly."""

from __future__ import annotations

import pytest

from agent.config import BackendConfig
from agent.engines import EngineError, resolve
from agent.placement import Placement, PlacementError, place
from common.records import GpuRecord


def gpu(index: int, vendor: str = "nvidia", integrated: bool = False) -> GpuRecord:
    return GpuRecord(index=index, vendor=vendor, name=f"{vendor}-{index}",  # type: ignore[arg-type]
                     uuid=f"GPU-{vendor}-{index}", pci_bus_id=f"0000:0{index}:00.0",
                     render_node=f"/dev/dri/renderD{128 + index}", integrated=integrated)


def backend(name: str, engine: str = "vllm", **kw: object) -> BackendConfig:
    kw.setdefault("port", 8000 + len(name))
    kw.setdefault("model", "m")
    return BackendConfig(name=name, engine=engine, **kw)  # type: ignore[arg-type]


def indexes(p: Placement | PlacementError) -> list[int]:
    assert isinstance(p, Placement), p
    return [g.index for g in p.gpus]


def test_auto_takes_lowest_free_gpus_of_the_engine_vendor_and_never_shares() -> None:
    gpus = [gpu(0, "intel"), gpu(1), gpu(2), gpu(3)]
    result = place([backend("a", gpu_count=2), backend("b"), backend("c", "ipex-llm")],
                   gpus, gpus)
    assert indexes(result["a"]) == [1, 2]
    assert indexes(result["b"]) == [3]
    assert indexes(result["c"]) == [0]
    assert result["c"].vendor == "intel"  # type: ignore[union-attr]


def test_explicit_indexes_are_served_before_auto_backends_pick() -> None:
    gpus = [gpu(0), gpu(1)]
    result = place([backend("auto"), backend("pinned", gpus=[0])], gpus, gpus)
    assert indexes(result["pinned"]) == [0]
    assert indexes(result["auto"]) == [1]


def test_vllm_falls_back_to_amd_when_no_nvidia_gpu_is_free() -> None:
    gpus = [gpu(0), gpu(1, "amd")]
    result = place([backend("a", gpus=[0]), backend("b")], gpus, gpus)
    assert indexes(result["b"]) == [1]
    assert result["b"].vendor == "amd"  # type: ignore[union-attr]


def test_not_enough_gpus_is_an_explicit_error_for_that_backend_only() -> None:
    gpus = [gpu(0)]
    result = place([backend("a"), backend("b", gpu_count=1)], gpus, gpus)
    assert indexes(result["a"]) == [0]
    err = result["b"]
    assert isinstance(err, PlacementError)
    assert "not enough free GPUs" in err.message and "needs 1" in err.message


def test_auto_skips_gpus_that_are_not_offerable() -> None:
    gpus = [gpu(0, "intel", integrated=True), gpu(1, "intel")]
    result = place([backend("a", "openvino")], gpus, [gpus[1]])
    assert indexes(result["a"]) == [1]


@pytest.mark.parametrize(("wanted", "message"), [
    ([5], "GPU 5 is not in this node's inventory"),
    ([0, 1], "different vendors"),
    ([1], "does not run on amd"),
])
def test_bad_explicit_indexes_say_why(wanted: list[int], message: str) -> None:
    gpus = [gpu(0), gpu(1, "amd")]
    err = place([backend("a", "ipex-llm" if wanted == [1] else "vllm", gpus=wanted)],
                gpus, gpus)["a"]
    assert isinstance(err, PlacementError) and message in err.message


def test_the_same_gpu_named_twice_is_refused_for_the_second_backend() -> None:
    gpus = [gpu(0)]
    result = place([backend("a", gpus=[0]), backend("b", gpus=[0])], gpus, gpus)
    assert indexes(result["a"]) == [0]
    assert "already given to backend 'a'" in result["b"].message  # type: ignore[union-attr]


def test_sim_and_zero_gpu_backends_get_no_gpus() -> None:
    gpus = [gpu(0)]
    result = place([backend("s", "sim"), backend("c", "custom", gpu_count=0, image="x")],
                   gpus, gpus)
    assert result["s"] == Placement((), None)
    assert result["c"] == Placement((), None)


def test_profiles_give_a_four_line_backend_a_working_command() -> None:
    launch = resolve(backend("a", port=8001), "nvidia", "10.0.0.5")
    assert launch.image == "vllm/vllm-openai:v0.31.0"
    assert launch.entrypoint == ["vllm", "serve"]
    assert launch.command == ["m", "--served-model-name", "m",
                              "--host", "10.0.0.5", "--port", "8001"]
    assert launch.health_path == "/health"
    amd = resolve(backend("a"), "amd", "h")
    assert amd.image.startswith("vllm/vllm-openai-rocm:") and amd.entrypoint is not None
    xpu = resolve(backend("a"), "intel", "h")
    assert xpu.image.startswith("vllm/vllm-openai-xpu:")
    ovms = resolve(backend("a", "openvino"), "intel", "h")
    assert ovms.health_path == "/v2/health/ready" and ovms.api_path == "/v3"
    sglang = resolve(backend("a", "sglang"), "amd", "h")
    assert sglang.entrypoint == ["python3", "-m", "sglang.launch_server"]
    assert "--enable-metrics" in sglang.command


def test_llamacpp_serves_a_gguf_file_under_its_model_id_with_or_without_a_gpu() -> None:
    cpu = resolve(backend("a", "llamacpp", model="tiny/tiny.gguf", port=8001), None, "h")
    assert cpu.image == "ghcr.io/ggml-org/llama.cpp:server-b11382"
    assert cpu.command == ["-m", "/models/tiny/tiny.gguf", "--alias", "tiny/tiny.gguf",
                           "--host", "h", "--port", "8001", "--metrics"]
    assert (cpu.health_path, cpu.api_path, cpu.entrypoint) == ("/health", "/v1", None)
    images = {v: resolve(backend("a", "llamacpp", model="x.gguf"), v, "h").image
              for v in ("nvidia", "amd", "intel")}
    assert [i.rsplit(":", 1)[1] for i in images.values()] == [
        "server-cuda-b11382", "server-rocm-b11382", "server-intel-b11382"]
    gpu = resolve(backend("a", "llamacpp", model="x.gguf"), "nvidia", "h")
    assert gpu.command[-2:] == ["--n-gpu-layers", "999"]
    # A model id that is no file path: the operator's args name the file.
    named = resolve(backend("a", "llamacpp", model="llama-8b", args=["-m", "/models/l.gguf"]),
                    None, "h")
    assert named.command[:2] == ["--alias", "llama-8b"] and named.command[-2:] == [
        "-m", "/models/l.gguf"]
    with pytest.raises(EngineError, match="leaves the models directory"):
        resolve(backend("a", "llamacpp", model="../etc/x.gguf"), None, "h")


def test_ipex_llm_is_a_deprecated_alias_of_vllm_on_intel(caplog: pytest.LogCaptureFixture
                                                         ) -> None:
    import agent.engines

    agent.engines._warned.clear()
    with caplog.at_level("WARNING", logger="agent.engines"):
        launch = resolve(backend("a", "ipex-llm"), "intel", "h")
        resolve(backend("a", "ipex-llm"), "intel", "h")
    assert launch == resolve(backend("a", "vllm"), "intel", "h")
    assert [r.getMessage() for r in caplog.records] == [
        "engine 'ipex-llm' is deprecated and now runs 'vllm' (its Intel XPU image); "
        'write engine = "vllm"']


def test_config_overrides_profile_image_health_and_env_and_appends_args() -> None:
    launch = resolve(backend("a", "sim", image="my-sim:1", health_path="/ok",
                             args=["--latency", "0.1"], env={"A": "1"}), None, "h")
    assert launch.image == "my-sim:1" and launch.health_path == "/ok"
    assert launch.command[-2:] == ["--latency", "0.1"]
    assert launch.env == {"A": "1"}


def test_unrunnable_engine_vendor_pairs_are_errors() -> None:
    with pytest.raises(EngineError, match="does not run on nvidia"):
        resolve(backend("a", "ipex-llm"), "nvidia", "h")
    with pytest.raises(EngineError, match="needs an image"):
        resolve(backend("a", "custom"), None, "h")
