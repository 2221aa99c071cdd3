"""Engine profiles: what each engine needs so a typical backend is four lines of config.

A profile is pure data plus small functions: the default image, the command line that makes
the engine serve one model on one port, the health path, the GPU vendors it runs on and the
environment it needs. docs/engines.md describes each profile for operators.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from agent.config import BackendConfig
from common.engines import ENGINE_VENDORS as ENGINE_VENDORS  # shared with the placer
from common.records import Vendor

# Argument builder: (model, bind host, port) -> the engine's own arguments.
Args = Callable[[str, str, int], list[str]]


class EngineError(ValueError):
    """A backend the engine profiles cannot launch (e.g. custom without an image)."""


@dataclass(frozen=True, slots=True)
class Profile:
    """How to run one engine on one vendor's GPUs."""

    engine: str
    vendor: Vendor | None
    image: str | None
    args: Args
    health_path: str = "/health"
    env: dict[str, str] = field(default_factory=dict)
    # Where the engine serves the OpenAI API; OpenVINO Model Server uses /v3, not /v1.
    api_path: str = "/v1"
    # An explicit entrypoint for images whose own one is not the server.
    entrypoint: list[str] | None = None


@dataclass(frozen=True, slots=True)
class Launch:
    """A resolved engine launch for one backend."""

    image: str
    entrypoint: list[str] | None
    command: list[str]
    env: dict[str, str]
    health_path: str
    api_path: str = "/v1"


def _vllm_args(model: str, host: str, port: int) -> list[str]:
    return ["--model", model, "--served-model-name", model, "--host", host, "--port", str(port)]


def _ipex_args(model: str, host: str, port: int) -> list[str]:
    return [*_vllm_args(model, host, port), "--device", "xpu", "--load-in-low-bit", "fp8"]


def _ovms_args(model: str, host: str, port: int) -> list[str]:
    return ["--source_model", model, "--model_name", model, "--model_repository_path",
            "/models", "--rest_bind_address", host, "--rest_port", str(port),
            "--target_device", "GPU", "--task", "text_generation"]


def _sim_args(model: str, host: str, port: int) -> list[str]:
    return ["--host", host, "--port", str(port), "--model", model]


def _no_args(model: str, host: str, port: int) -> list[str]:
    return []


# Engines read weights from the read-only /models mount and must never try to download.
_OFFLINE = {"HF_HOME": "/models", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

# Default images are pinned, the same tags docker/*/Dockerfile build on (a test keeps the two
# in step): a moving tag would change what a node runs without anyone changing its config.
PROFILES: dict[tuple[str, Vendor | None], Profile] = {
    ("vllm", "nvidia"): Profile("vllm", "nvidia", "vllm/vllm-openai:v0.6.4.post1", _vllm_args,
                                env=dict(_OFFLINE)),
    ("vllm", "amd"): Profile("vllm", "amd",
                             "rocm/vllm:rocm6.2_mi300_ubuntu20.04_py3.9_vllm_0.6.4", _vllm_args,
                             env=dict(_OFFLINE),
                             entrypoint=["python3", "-m", "vllm.entrypoints.openai.api_server"]),
    ("ipex-llm", "intel"): Profile(
        "ipex-llm", "intel", "intelanalytics/ipex-llm-serving-xpu:2.2.0", _ipex_args,
        env={**_OFFLINE, "SYCL_CACHE_PERSISTENT": "1", "ZES_ENABLE_SYSMAN": "1"},
        entrypoint=["python", "-m", "ipex_llm.vllm.xpu.entrypoints.openai.api_server"]),
    ("openvino", "intel"): Profile(
        "openvino", "intel", "openvino/model_server:2024.5-gpu", _ovms_args,
        health_path="/v2/health/ready", env={"HF_HUB_OFFLINE": "1"}, api_path="/v3"),
    # The sim image's own entrypoint runs the server (devtools/image.py builds it).
    ("sim", None): Profile("sim", None, "aivmm-sim:latest", _sim_args),
}


def needs_gpus(backend: BackendConfig) -> bool:
    """Whether the backend gets GPUs at all (sim never does; gpu_count 0 means none)."""
    if not ENGINE_VENDORS[backend.engine]:
        return False
    return backend.gpus != [] and not (backend.gpus == "auto" and backend.gpu_count == 0)


def resolve(backend: BackendConfig, vendor: Vendor | None, bind_host: str) -> Launch:
    """The image, command, env and health path for ``backend`` on ``vendor``'s GPUs.

    Config values win over the profile: ``image``, ``health_path`` and ``api_path`` replace
    the defaults,
    ``args`` are appended to the profile's arguments and ``env`` overrides its variables.
    """
    if backend.engine == "custom":
        if not backend.image:
            raise EngineError("engine 'custom' needs an image")
        return Launch(backend.image, None, list(backend.args), dict(backend.env),
                      backend.health_path or "/health", backend.api_path or "/v1")
    profile = PROFILES.get((backend.engine, vendor))
    if profile is None:
        supported = ", ".join(ENGINE_VENDORS[backend.engine]) or "no GPUs"
        raise EngineError(f"engine '{backend.engine}' does not run on {vendor or 'no GPU'} "
                          f"(it runs on {supported})")
    image = backend.image or profile.image
    if image is None:
        raise EngineError(f"engine '{backend.engine}' needs an image")
    command = [*profile.args(backend.model, bind_host, backend.port), *backend.args]
    return Launch(image, profile.entrypoint, command, {**profile.env, **backend.env},
                  backend.health_path or profile.health_path,
                  backend.api_path or profile.api_path)


def share_args(engine: str, fraction: float) -> list[str]:
    """Arguments that keep an engine within ``fraction`` of a GPU it shares with others.

    vLLM takes 90 % of a GPU's memory by default, whatever else runs there; told a fraction,
    it stays within it. The other engines size their memory by the model and take no such
    flag: the reservation is then the operator's estimate (docs/deployments.md).
    """
    if engine in ("vllm", "ipex-llm"):
        # Rounded down: two replicas at 0.5 each must not sum to more than the GPU.
        return ["--gpu-memory-utilization", f"{int(fraction * 100) / 100:.2f}"]
    return []
