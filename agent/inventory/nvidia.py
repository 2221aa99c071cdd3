"""NVIDIA GPUs through NVML (behind the :class:`NvmlApi` adapter)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from agent.inventory.nvml import MemoryInfo, NvmlApi, NvmlError, NvmlNotSupported, NvmlUnavailable
from agent.inventory.pci import normalise_bus_id
from common.records import GpuRecord, Vendor

log = logging.getLogger(__name__)
T = TypeVar("T")


class NvidiaDetector:
    """Reads every NVML device; a value NVML cannot give is null, never a stand-in."""

    vendor: Vendor = "nvidia"

    def __init__(self, nvml: NvmlApi) -> None:
        self._nvml = nvml
        self._ready = False
        self._said_absent = False

    # read takes no arguments; "..." because mypy cannot infer `lambda i=i: ...` as Callable[[], T].
    def _field(self, index: int, what: str, read: Callable[..., T]) -> T | None:
        try:
            return read()
        except NvmlNotSupported:
            return None
        except NvmlError as err:
            log.warning("NVML could not read a GPU field", extra={
                "gpu": index, "field": what, "error": str(err)})
            return None

    def _memory(self, index: int) -> MemoryInfo | None:
        # v2 leaves driver-reserved memory out of "used", as nvidia-smi does (an idle H200
        # shows 0 MiB there, but ~615 MiB through v1); drivers before v2 only have v1.
        try:
            return self._nvml.memory_v2(index)
        except NvmlNotSupported:
            return self._field(index, "memory", lambda: self._nvml.memory(index))
        except NvmlError as err:
            log.warning("NVML could not read GPU memory", extra={"gpu": index, "error": str(err)})
            return None

    def detect(self) -> list[GpuRecord]:
        """Every NVIDIA GPU NVML knows; none (and one info line, once) without a driver."""
        nvml = self._nvml
        if not self._ready:
            try:
                nvml.init()
            except NvmlUnavailable as err:
                if not self._said_absent:
                    log.info("no NVIDIA driver: zero NVIDIA GPUs", extra={"reason": str(err)})
                    self._said_absent = True
                return []
            self._ready = True
        version = self._field(-1, "driver_version", nvml.driver_version)
        gpus = []
        for i in range(nvml.device_count()):
            try:
                uuid = nvml.uuid(i)
                bus_id = normalise_bus_id(nvml.pci_bus_id(i))
            except NvmlError as err:
                # Without its identity a GPU cannot be offered to a backend at all.
                log.warning("NVML device skipped", extra={"gpu": i, "error": str(err)})
                continue
            memory = self._memory(i)
            util = self._field(i, "utilization", lambda i=i: nvml.utilization_percent(i))
            power = self._field(i, "power", lambda i=i: nvml.power_mw(i))
            mig = self._field(i, "mig_mode", lambda i=i: nvml.mig_mode(i))
            temp = self._field(i, "temperature", lambda i=i: nvml.temperature_c(i))
            gpus.append(GpuRecord(
                index=i, vendor="nvidia",
                name=self._field(i, "name", lambda i=i: nvml.name(i)) or "NVIDIA GPU",
                uuid=uuid, pci_bus_id=bus_id, render_node=None, integrated=False,
                memory_total_bytes=memory.total if memory else None,
                memory_used_bytes=memory.used if memory else None,
                utilization=util / 100 if util is not None else None,
                temperature_c=float(temp) if temp is not None else None,
                power_w=power / 1000 if power is not None else None,
                driver="nvidia", driver_version=version,
                mig_enabled=bool(mig) if mig is not None else None,
            ))
        return gpus

    def close(self) -> None:
        """Release NVML (no-op where it never started)."""
        if self._ready:
            self._ready = False
            self._nvml.shutdown()
