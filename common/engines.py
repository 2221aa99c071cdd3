"""Which engines run on which GPU vendors: shared by the agent (pinned backends) and the
placer (deployments), which must not import each other. docs/engines.md describes them."""

from __future__ import annotations

from common.records import Vendor

# Vendors each engine runs on. "sim" is empty because a pinned sim backend takes no GPU.
# llama.cpp's server also runs with no GPU at all (its CPU image): see CPU_ENGINES.
ENGINE_VENDORS: dict[str, tuple[Vendor, ...]] = {
    "vllm": ("nvidia", "amd", "intel"),
    "sglang": ("nvidia", "amd"),
    "openvino": ("intel",),
    "llamacpp": ("nvidia", "amd", "intel"),
    # Deprecated: IPEX-LLM's serving images are no longer maintained; the name now runs vLLM
    # on Intel (XPU) and the agent logs a warning (ENGINE_ALIASES).
    "ipex-llm": ("intel",),
    "sim": (),
    "custom": ("nvidia", "amd", "intel"),
}

# Engines that also run on a node, or a replica, with no GPU.
CPU_ENGINES: frozenset[str] = frozenset({"llamacpp", "custom"})

# Deprecated engine names and the engine that now serves them (on the same vendors).
ENGINE_ALIASES: dict[str, str] = {"ipex-llm": "vllm"}

# The engines "auto" tries, in order: the first that runs on the GPU's vendor wins. vLLM
# runs on all three vendors (CUDA, ROCm, XPU), so "auto" is vLLM everywhere; the others are
# asked for by name. "auto" never picks a GPU-less replica (llama.cpp on CPU is named).
AUTO_ENGINES: tuple[str, ...] = ("vllm", "sglang", "openvino", "llamacpp")


def engine_for(engine: str, vendor: Vendor | None) -> str | None:
    """The concrete engine that serves ``engine`` on ``vendor``'s GPUs, or None if none can.

    ``vendor`` None means a replica without a GPU: only "sim" and the CPU_ENGINES run there.
    "sim" runs "on paper" on every vendor, so a deployment of it reserves GPUs like a real
    engine (tests of placement need that) while the agent maps it no device.
    """
    if engine == "sim":
        return "sim"
    if engine == "auto":
        if vendor is None:
            return None
        return next((e for e in AUTO_ENGINES if vendor in ENGINE_VENDORS[e]), None)
    if engine not in ENGINE_VENDORS:
        return None
    if vendor is None:
        return engine if engine in CPU_ENGINES else None
    return engine if vendor in ENGINE_VENDORS[engine] else None
