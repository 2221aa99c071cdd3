"""AMD GPUs driven by amdgpu, read from sysfs (Documentation/gpu/amdgpu/driver-misc.rst
and thermal.rst name the files).

APUs: amdgpu knows a GPU is part of an APU (``adev->flags & AMD_IS_APU``) but has no file
saying so. Two files reflect it. ``device/board_info`` (drivers/gpu/drm/amd/amdgpu/
amdgpu_device.c, amdgpu_board_attrs_is_visible) is hidden exactly on APUs, on kernels that
have it. And a dGPU carries its own video BIOS in a PCI expansion ROM, so the kernel
gives its function a ``rom`` file (Documentation/ABI/testing/sysfs-bus-pci, "rom"); an APU's
VBIOS is part of the system firmware, so it has none (fwupd's amd-gpu plugin relies on the
same: plugins/amd-gpu/fu-amd-gpu-device.c). A GPU with neither is an APU.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from agent.inventory.base import (
    driver_version,
    hwmon_dir,
    hwmon_temperature,
    pci_name,
    pci_uuid,
    read_int,
    read_text,
)
from agent.inventory.pci import AMD, PciGpu, enumerate_gpus
from agent.inventory.pciids import PciIds
from common.records import GpuRecord, Vendor

log = logging.getLogger(__name__)

# "edge" is the die-edge sensor every amdgpu dGPU has, the closest to nvidia-smi's GPU
# temperature; Instinct MI200/MI300 have only "junction" (hotspot) and "mem".
_TEMPERATURES = ("edge", "junction")


def amd_uuid(gpu: PciGpu) -> str:
    """``GPU-<unique_id>`` (the form ROCR_VISIBLE_DEVICES takes) where the chip has one."""
    unique = read_text(gpu.device_dir / "unique_id")
    if unique:
        return "GPU-" + unique.lower().removeprefix("0x")
    return pci_uuid(gpu.bus_id)


def is_amd_apu(gpu: PciGpu) -> bool:
    """True for the GPU of an APU: no ``board_info`` (hidden on APUs) and no PCI ``rom``
    (only a dGPU has an expansion ROM). Either file present means a discrete card."""
    dev = gpu.device_dir
    return not (dev / "board_info").exists() and not (dev / "rom").exists()


def read_amd(gpu: PciGpu, version: str | None, names: PciIds | None = None) -> GpuRecord:
    """One amdgpu device's record from its sysfs directory; ``names`` from pci.ids."""
    dev: Path = gpu.device_dir
    hwmon = hwmon_dir(dev, "amdgpu")
    # power1_average until RDNA2/CDNA2; RDNA3 and later only have power1_input. Both µW.
    power_uw = None
    if hwmon is not None:
        power_uw = read_int(hwmon / "power1_average")
        if power_uw is None:
            power_uw = read_int(hwmon / "power1_input")
    busy = read_int(dev / "gpu_busy_percent")
    return GpuRecord(
        index=0, vendor="amd",
        # product_name is the board's FRU data (server cards); pci.ids names the rest.
        name=(read_text(dev / "product_name")
              or (names.name(gpu.vendor_id, gpu.device_id, gpu.subsystem_vendor_id,
                             gpu.subsystem_device_id) if names else None)
              or pci_name("AMD", gpu.vendor_id, gpu.device_id)),
        pci_id=gpu.pci_id,
        uuid=amd_uuid(gpu), pci_bus_id=gpu.bus_id, render_node=gpu.render_node,
        card_node=f"/dev/dri/{gpu.card}" if gpu.card else None,
        integrated=is_amd_apu(gpu),
        memory_total_bytes=read_int(dev / "mem_info_vram_total"),
        memory_used_bytes=read_int(dev / "mem_info_vram_used"),
        utilization=busy / 100 if busy is not None else None,
        temperature_c=hwmon_temperature(hwmon, _TEMPERATURES),
        power_w=power_uw / 1e6 if power_uw is not None else None,
        driver="amdgpu", driver_version=version,
    )


class AmdDetector:
    """Every PCI GPU of vendor 0x1002 bound to amdgpu."""

    vendor: Vendor = "amd"

    def __init__(self, sysfs_root: str | Path = "/sys",
                 names: Callable[[], PciIds] | None = None) -> None:
        self._root = Path(sysfs_root)
        self._names = names

    def detect(self) -> list[GpuRecord]:
        """AMD GPUs now, sorted by PCI bus id."""
        version = driver_version(self._root, "amdgpu")
        names = self._names() if self._names is not None else None
        found = []
        for gpu in enumerate_gpus(self._root):
            if gpu.vendor_id != AMD:
                continue
            if gpu.driver != "amdgpu":
                log.debug("AMD GPU without the amdgpu driver skipped",
                         extra={"pci_bus_id": gpu.bus_id, "driver": gpu.driver})
                continue
            found.append(read_amd(gpu, version, names))
        return found
