"""Engine profiles: what each engine needs so a typical backend is four lines of config.

A profile is pure data plus small functions: the default image, the command line that makes
the engine serve one model on one port, the health path, the GPU vendors it runs on and the
environment it needs. docs/engines.md describes each profile for operators.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from agent.config import BackendConfig
from common.engines import CPU_ENGINES, ENGINE_ALIASES
from common.engines import ENGINE_VENDORS as ENGINE_VENDORS  # shared with the placer
from common.records import Vendor

log = logging.getLogger(__name__)

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
    # docs/security.md: the environment variable through which the engine takes the key it
    # demands of clients (None: the engine has no such variable, so no key is set), and
    # the capabilities it needs back after every one is dropped (none known so far).
    api_key_env: str | None = None
    cap_add: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Launch:
    """A resolved engine launch for one backend."""

    image: str
    entrypoint: list[str] | None
    command: list[str]
    env: dict[str, str]
    health_path: str
    api_path: str = "/v1"
    api_key_env: str | None = None
    cap_add: tuple[str, ...] = ()


def _vllm_args(model: str, host: str, port: int) -> list[str]:
    # `vllm serve MODEL`: the model is positional (the --model option is deprecated there).
    return [model, "--served-model-name", model, "--host", host, "--port", str(port)]


def _sglang_args(model: str, host: str, port: int) -> list[str]:
    # --enable-metrics: SGLang serves /metrics only when asked (the probe reads the load).
    return ["--model-path", model, "--served-model-name", model, "--host", host,
            "--port", str(port), "--enable-metrics"]


def _ovms_args(model: str, host: str, port: int) -> list[str]:
    return ["--source_model", model, "--model_name", model, "--model_repository_path",
            "/models", "--rest_bind_address", host, "--rest_port", str(port),
            "--target_device", "GPU", "--task", "text_generation", "--metrics_enable"]


def llamacpp_model_args(model: str) -> list[str]:
    """``-m /models/<model>`` when ``model`` names a GGUF file under models_dir, else nothing.

    llama.cpp serves one GGUF file. A model id that is not a ``.gguf`` path is only the name
    clients use (``--alias``); the backend's ``args`` then give the file (``-m /models/...``).
    """
    if not model.lower().endswith(".gguf"):
        return []
    rel = model.lstrip("/")
    if ".." in rel.split("/"):
        raise EngineError(f"model '{model}' leaves the models directory")
    return ["-m", f"/models/{rel}"]


def _llamacpp_args(model: str, host: str, port: int) -> list[str]:
    # --alias: /v1/models lists the backend's model id, which the scheduler routes on.
    # --metrics: llama-server serves /metrics only when asked.
    return [*llamacpp_model_args(model), "--alias", model, "--host", host, "--port", str(port),
            "--metrics"]


def _llamacpp_gpu_args(model: str, host: str, port: int) -> list[str]:
    # Every layer on the GPU (older builds offload none by default).
    return [*_llamacpp_args(model, host, port), "--n-gpu-layers", "999"]


def _sim_args(model: str, host: str, port: int) -> list[str]:
    return ["--host", host, "--port", str(port), "--model", model]


# Engines read weights from the read-only /models mount and must never try to download.
_OFFLINE = {"HF_HOME": "/models", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
_VLLM = ["vllm", "serve"]
_SGLANG = ["python3", "-m", "sglang.launch_server"]
_LLAMACPP = "ghcr.io/ggml-org/llama.cpp"
# llama.cpp build b11382 (every variant is cut from the same commit and tagged together).
_LLAMACPP_BUILD = "b11382"

# Default images are pinned, the same tags docker/*/Dockerfile build on (tests/test_images.py
# keeps the two in step): a moving tag would change what a node runs without anyone changing
# its config. docs/engines.md gives the source and the date each tag and flag was checked.
PROFILES: dict[tuple[str, Vendor | None], Profile] = {
    ("vllm", "nvidia"): Profile("vllm", "nvidia", "vllm/vllm-openai:v0.31.0", _vllm_args,
                                env=dict(_OFFLINE), entrypoint=_VLLM, api_key_env="VLLM_API_KEY"),
    ("vllm", "amd"): Profile("vllm", "amd", "vllm/vllm-openai-rocm:v0.31.0", _vllm_args,
                             env=dict(_OFFLINE), entrypoint=_VLLM, api_key_env="VLLM_API_KEY"),
    ("vllm", "intel"): Profile("vllm", "intel", "vllm/vllm-openai-xpu:v0.31.0", _vllm_args,
                               env={**_OFFLINE, "VLLM_WORKER_MULTIPROC_METHOD": "spawn"},
                               entrypoint=_VLLM, api_key_env="VLLM_API_KEY"),
    ("sglang", "nvidia"): Profile("sglang", "nvidia", "lmsysorg/sglang:v0.5.21", _sglang_args,
                                  env=dict(_OFFLINE), entrypoint=_SGLANG),
    ("sglang", "amd"): Profile("sglang", "amd", "lmsysorg/sglang:v0.5.21-rocm10-mi30x",
                               _sglang_args, env=dict(_OFFLINE), entrypoint=_SGLANG),
    ("openvino", "intel"): Profile(
        "openvino", "intel", "openvino/model_server:2026.4.1-gpu", _ovms_args,
        health_path="/v2/health/ready", env={"HF_HUB_OFFLINE": "1"}, api_path="/v3"),
    ("llamacpp", "nvidia"): Profile("llamacpp", "nvidia",
                                    f"{_LLAMACPP}:server-cuda-{_LLAMACPP_BUILD}",
                                    _llamacpp_gpu_args, api_key_env="LLAMA_ARG_API_KEY"),
    ("llamacpp", "amd"): Profile("llamacpp", "amd", f"{_LLAMACPP}:server-rocm-{_LLAMACPP_BUILD}",
                                 _llamacpp_gpu_args, api_key_env="LLAMA_ARG_API_KEY"),
    # SYCL (oneAPI) for Intel; the Vulkan image (server-vulkan-...) runs on any of the three
    # vendors and is a custom `image` away.
    ("llamacpp", "intel"): Profile("llamacpp", "intel",
                                   f"{_LLAMACPP}:server-intel-{_LLAMACPP_BUILD}",
                                   _llamacpp_gpu_args, api_key_env="LLAMA_ARG_API_KEY"),
    ("llamacpp", None): Profile("llamacpp", None, f"{_LLAMACPP}:server-{_LLAMACPP_BUILD}",
                                _llamacpp_args, api_key_env="LLAMA_ARG_API_KEY"),
    # The sim image's own entrypoint runs the server (devtools/image.py builds it).
    ("sim", None): Profile("sim", None, "aivmm-sim:latest", _sim_args,
                           api_key_env="SIM_API_KEY"),
}

# The image each docker/<folder>/Dockerfile builds on: one folder per profile with an
# upstream image (tests/test_images.py checks both directions).
DOCKERFILES: dict[str, tuple[str, Vendor | None]] = {
    "vllm-cuda": ("vllm", "nvidia"), "vllm-rocm": ("vllm", "amd"),
    "vllm-xpu": ("vllm", "intel"), "sglang-cuda": ("sglang", "nvidia"),
    "sglang-rocm": ("sglang", "amd"), "openvino": ("openvino", "intel"),
    "llamacpp-cuda": ("llamacpp", "nvidia"), "llamacpp-rocm": ("llamacpp", "amd"),
    "llamacpp-sycl": ("llamacpp", "intel"), "llamacpp-cpu": ("llamacpp", None),
}

_warned: set[str] = set()


def canonical_engine(engine: str) -> str:
    """The engine that serves ``engine``: itself, or what a deprecated alias now means.

    A deprecated name is logged once per process, with the name to use instead.
    """
    target = ENGINE_ALIASES.get(engine)
    if target is None:
        return engine
    if engine not in _warned:
        _warned.add(engine)
        log.warning("engine '%s' is deprecated and now runs '%s' (its Intel XPU image); "
                    "write engine = \"%s\"", engine, target, target)
    return target


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
    engine = canonical_engine(backend.engine)
    # An alias runs only where the old engine did (ipex-llm: Intel GPUs).
    profile = PROFILES.get((engine, vendor)) if (
        engine == backend.engine or vendor in ENGINE_VENDORS[backend.engine]) else None
    if profile is None:
        supported = ", ".join(ENGINE_VENDORS[backend.engine]) or "no GPUs"
        if backend.engine in CPU_ENGINES:
            supported += " or with no GPU"
        raise EngineError(f"engine '{backend.engine}' does not run on {vendor or 'no GPU'} "
                          f"(it runs on {supported})")
    image = backend.image or profile.image
    if image is None:
        raise EngineError(f"engine '{backend.engine}' needs an image")
    command = [*profile.args(backend.model, bind_host, backend.port), *backend.args]
    return Launch(image, profile.entrypoint, command, {**profile.env, **backend.env},
                  backend.health_path or profile.health_path,
                  backend.api_path or profile.api_path, profile.api_key_env, profile.cap_add)


def share_args(engine: str, fraction: float) -> list[str]:
    """Arguments that keep an engine within ``fraction`` of a GPU it shares with others.

    vLLM takes 90 % of a GPU's memory by default (SGLang most of it), whatever else runs
    there; told a fraction, each stays within it. The other engines size their memory by the
    model and take no such flag: the reservation is then the operator's estimate
    (docs/deployments.md).
    """
    # Rounded down: two replicas at 0.5 each must not sum to more than the GPU.
    share = f"{int(fraction * 100) / 100:.2f}"
    if canonical_engine(engine) == "vllm":
        return ["--gpu-memory-utilization", share]
    if engine == "sglang":
        # SGLang's static pool (weights and KV cache) as a fraction of the GPU's memory.
        return ["--mem-fraction-static", share]
    return []
