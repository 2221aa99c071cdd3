"""Assigning the node's GPUs to backends: explicit indexes or "auto", disjoint, deterministic."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from agent.config import BackendConfig
from agent.engines import ENGINE_VENDORS, needs_gpus
from common.records import GpuRecord, Vendor


@dataclass(frozen=True, slots=True)
class Placement:
    """The GPUs one backend gets (possibly none) and their vendor."""

    gpus: tuple[GpuRecord, ...]
    vendor: Vendor | None


@dataclass(frozen=True, slots=True)
class PlacementError:
    """Why a backend could not be given GPUs; it is reported, the others still run."""

    message: str


def place(backends: Sequence[BackendConfig], gpus: Sequence[GpuRecord],
          offerable: Sequence[GpuRecord]) -> dict[str, Placement | PlacementError]:
    """Give every backend its GPUs.

    Explicit indexes are honoured first (they may name any GPU of the inventory, integrated
    ones included: the operator asked for it); then "auto" backends, in config order, take the
    lowest-indexed free offerable GPUs of the first vendor their engine supports that has
    enough of them. No GPU goes to two backends.
    """
    by_index = {g.index: g for g in gpus}
    taken: dict[int, str] = {}
    result: dict[str, Placement | PlacementError] = {}
    for backend in backends:
        if backend.gpus == "auto" or not needs_gpus(backend):
            continue
        result[backend.name] = _explicit(backend, by_index, taken)
    for backend in backends:
        if backend.name in result:
            continue
        if not needs_gpus(backend):
            result[backend.name] = Placement((), None)
            continue
        result[backend.name] = _auto(backend, offerable, taken)
    return {b.name: result[b.name] for b in backends}


def _explicit(backend: BackendConfig, by_index: dict[int, GpuRecord],
              taken: dict[int, str]) -> Placement | PlacementError:
    assert isinstance(backend.gpus, list)
    chosen: list[GpuRecord] = []
    for index in backend.gpus:
        gpu = by_index.get(index)
        if gpu is None:
            return PlacementError(f"GPU {index} is not in this node's inventory")
        if index in taken:
            return PlacementError(f"GPU {index} is already given to backend '{taken[index]}'")
        chosen.append(gpu)
    vendors = {g.vendor for g in chosen}
    if len(vendors) > 1:
        return PlacementError("GPUs " + ", ".join(map(str, backend.gpus))
                              + " are of different vendors")
    (vendor,) = vendors
    if vendor not in ENGINE_VENDORS[backend.engine]:
        return PlacementError(f"engine '{backend.engine}' does not run on {vendor} GPUs")
    for gpu in chosen:
        taken[gpu.index] = backend.name
    return Placement(tuple(chosen), vendor)


def _auto(backend: BackendConfig, offerable: Sequence[GpuRecord],
          taken: dict[int, str]) -> Placement | PlacementError:
    want = backend.gpu_count
    free = sorted((g for g in offerable if g.index not in taken), key=lambda g: g.index)
    counts = []
    for vendor in ENGINE_VENDORS[backend.engine]:
        of_vendor = [g for g in free if g.vendor == vendor]
        counts.append(f"{len(of_vendor)} {vendor}")
        if len(of_vendor) >= want:
            chosen = of_vendor[:want]
            for gpu in chosen:
                taken[gpu.index] = backend.name
            return Placement(tuple(chosen), vendor)
    return PlacementError(f"not enough free GPUs: needs {want}, free: " + ", ".join(counts))
