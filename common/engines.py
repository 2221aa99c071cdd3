"""Which engines run on which GPU vendors: shared by the agent (pinned backends) and the
placer (deployments), which must not import each other."""

from __future__ import annotations

from common.records import Vendor

# Vendors each engine runs on. "sim" is empty because a pinned sim backend takes no GPU.
ENGINE_VENDORS: dict[str, tuple[Vendor, ...]] = {
    "vllm": ("nvidia", "amd"),
    "ipex-llm": ("intel",),
    "openvino": ("intel",),
    "sim": (),
    "custom": ("nvidia", "amd", "intel"),
}

# The engines "auto" tries, in order: the first that runs on the GPU's vendor wins.
AUTO_ENGINES: tuple[str, ...] = ("vllm", "ipex-llm", "openvino")


def engine_for(engine: str, vendor: Vendor | None) -> str | None:
    """The concrete engine that serves ``engine`` on ``vendor``'s GPUs, or None if none can.

    ``vendor`` None means a replica without a GPU: only "sim" and "custom" run there.
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
        return engine if engine == "custom" else None
    return engine if vendor in ENGINE_VENDORS[engine] else None
