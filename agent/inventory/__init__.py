"""The agent's GPU inventory: every vendor's GPUs as one list of GpuRecords.

One detector per vendor (NVIDIA through NVML, AMD and Intel through sysfs) runs in an
executor; :class:`Inventory` merges them, numbers them 0..n-1 in a stable order and tells
the agent when the DRM device set changes. See docs/inventory.md for what each driver gives.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator
from concurrent.futures import Executor
from pathlib import Path

from agent.inventory.amd import AmdDetector
from agent.inventory.base import Detector
from agent.inventory.intel import IntelDetector
from agent.inventory.nvidia import NvidiaDetector
from agent.inventory.nvml import NvmlApi, Pynvml
from agent.inventory.pci import AMD, INTEL, NVIDIA, enumerate_gpus
from agent.inventory.pciids import PciIdsCache, find_pci_ids
from agent.inventory.udev import open_monitor, uevents
from common.records import GpuRecord

__all__ = ["Detector", "Inventory", "NvmlApi", "order_gpus"]

log = logging.getLogger(__name__)


def order_gpus(gpus: list[GpuRecord]) -> list[GpuRecord]:
    """Stable indexes 0..n-1: NVIDIA in NVML order first (what CUDA_VISIBLE_DEVICES and
    nvidia-smi count by), then every other GPU by PCI bus id."""
    nvidia = sorted((g for g in gpus if g.vendor == "nvidia"), key=lambda g: g.index)
    others = sorted((g for g in gpus if g.vendor != "nvidia"), key=lambda g: g.pci_bus_id)
    return [dataclasses.replace(g, index=i) for i, g in enumerate(nvidia + others)]


class Inventory:
    """The GPUs of this machine, scanned on demand."""

    def __init__(self, sysfs_root: str = "/sys", nvml: NvmlApi | None = None, *,
                 offer_integrated: bool = False, executor: Executor | None = None,
                 proc_root: str | None = None, uevent_subsystem: str = "drm",
                 pci_ids: str | None = None) -> None:
        self.sysfs_root = sysfs_root
        self.offer_integrated = offer_integrated
        self._executor = executor
        self._nvidia = NvidiaDetector(nvml if nvml is not None else Pynvml())
        # GPU names: pci.ids at ``pci_ids``, else the one installed under the filesystem
        # that holds sysfs_root (/ for /sys; a host mounted at /host gives /host/usr/...).
        path = Path(pci_ids) if pci_ids else find_pci_ids(Path(sysfs_root).parent)
        names = PciIdsCache(path, frozenset({AMD, INTEL, NVIDIA})).get
        self.detectors: list[Detector] = [
            self._nvidia, AmdDetector(sysfs_root, names),
            IntelDetector(sysfs_root, proc_root, names=names)]
        self._subsystem = uevent_subsystem
        self._lock = asyncio.Lock()
        # Each detector's last good answer, by position in ``detectors``.
        self._last: dict[int, list[GpuRecord]] = {}

    def _scan(self) -> list[GpuRecord]:
        gpus: list[GpuRecord] = []
        for i, detector in enumerate(self.detectors):
            try:
                found = detector.detect()
            except Exception:
                # One vendor's broken driver must not hide the other vendors' GPUs. And one
                # failed read (an NVML hiccup) must not look like GPUs leaving the machine:
                # that would take their backends' containers away. Keep the last good list;
                # a GPU that really went is gone from the next good read.
                found = self._last.get(i, [])
                log.exception("GPU detector failed; keeping its last good reading",
                              extra={"vendor": detector.vendor, "gpus": len(found)})
            else:
                self._last[i] = found
            gpus.extend(found)
        pci = {g.bus_id: g for g in enumerate_gpus(self.sysfs_root)}
        # NVML knows no DRM nodes (nvidia-drm registers them where it is loaded), and the
        # detector asks it for no PCI ids: both come from the PCI function in sysfs.
        for i, g in enumerate(gpus):
            fn = pci.get(g.pci_bus_id)
            if g.vendor == "nvidia" and fn is not None:
                gpus[i] = dataclasses.replace(g, render_node=g.render_node or fn.render_node,
                                              pci_id=g.pci_id or fn.pci_id)
        return order_gpus(gpus)

    async def scan(self) -> list[GpuRecord]:
        """Every GPU now, indexed 0..n-1; blocking reads run in the executor."""
        async with self._lock:  # detectors keep state (NVML handles, energy samples)
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor, self._scan)

    def offerable(self, gpus: list[GpuRecord]) -> list[GpuRecord]:
        """The GPUs backends may be given: integrated ones only when offer_integrated."""
        return [g for g in gpus if self.offer_integrated or not g.integrated]

    async def changes(self) -> AsyncIterator[None]:
        """Yield on every DRM uevent (a GPU added, removed or changed); rescan then.

        Where uevents cannot be received this logs once and waits forever, so a caller's
        loop simply never fires instead of failing.
        """
        try:
            monitor = open_monitor(self._subsystem)
        except OSError as err:
            log.warning("GPU hot-plug events unavailable; the GPU list is read at scans only",
                        extra={"error": str(err)})
            await asyncio.Event().wait()
            return
        async for action in uevents(monitor):
            log.debug("DRM uevent", extra={"action": action})
            yield None

    def close(self) -> None:
        """Release NVML."""
        self._nvidia.close()

