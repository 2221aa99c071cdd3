"""Intel GPUs driven by i915 or xe, read from sysfs and, optionally, DRM fdinfo.

What each driver gives (Documentation/ABI/testing/sysfs-driver-intel-{i915,xe}-hwmon,
Documentation/gpu/drm-usage-stats.rst; summarised in docs/inventory.md):
- i915: hwmon (discrete cards only) has energy1_input in µJ, no temperature, no busy file;
  no memory-size file.
- xe: hwmon energy1_input (card) / energy2_input (package) in µJ, temperatures from 6.15
  (labels "pkg", "vram"); VRAM size in tile*/physical_vram_size_bytes.
- both: per-client memory in /proc/<pid>/fdinfo (drm-resident-<region>).
Power is only ever an energy counter, so it is derived from two scans (ΔE/Δt).
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

from agent.inventory.base import (
    driver_version,
    hwmon_dir,
    hwmon_temperature,
    pci_name,
    pci_uuid,
    read_int,
)
from agent.inventory.pci import INTEL, PciGpu, enumerate_gpus, is_intel_integrated
from common.records import GpuRecord, Vendor

log = logging.getLogger(__name__)

DRIVERS = ("i915", "xe")
_TEMPERATURES = ("pkg", "package", "card")
# Device-local memory regions in fdinfo: i915 calls them local<N>, xe vram<N>.
_LOCAL_REGION = re.compile(r"^drm-resident-(local|vram)\d+$")
_UNITS = {"": 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}


def _vram_total(gpu: PciGpu) -> int | None:
    """xe: the sum of every tile's physical VRAM; i915 has no such file (null)."""
    if gpu.driver != "xe":
        return None
    try:
        tiles = sorted(p for p in gpu.device_dir.iterdir() if p.name.startswith("tile"))
    except OSError:
        return None
    sizes = [read_int(t / "physical_vram_size_bytes") for t in tiles]
    known = [s for s in sizes if s is not None]
    return sum(known) if known else None


def _energy_uj(hwmon: Path | None) -> int | None:
    if hwmon is None:
        return None
    # energy1 is the card (xe) / whole device (i915); xe's energy2 is the package alone.
    for name in ("energy1_input", "energy2_input"):
        value = read_int(hwmon / name)
        if value is not None:
            return value
    return None


def _size(text: str) -> int | None:
    number, _, unit = text.strip().partition(" ")
    try:
        return int(number) * _UNITS[unit.strip()]
    except (ValueError, KeyError):
        return None


def fdinfo_local_memory(proc_root: Path) -> dict[str, int]:
    """Bytes of device-local memory per PCI bus id, summed over DRM clients from fdinfo.

    A client (drm-client-id) is counted once even when several fds or processes share it.
    """
    seen: set[tuple[str, str]] = set()
    used: dict[str, int] = {}
    try:
        pids = [p for p in os.listdir(proc_root) if p.isdigit()]
    except OSError:
        return used
    for pid in pids:
        fd_dir = proc_root / pid / "fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue  # gone, or not ours to read
        for fd in fds:
            try:
                if not os.readlink(fd_dir / fd).startswith("/dev/dri/"):
                    continue
                text = (proc_root / pid / "fdinfo" / fd).read_text()
            except OSError:
                continue
            fields = {}
            for line in text.splitlines():
                key, sep, value = line.partition(":")
                if sep:
                    fields[key.strip()] = value.strip()
            pdev, client = fields.get("drm-pdev"), fields.get("drm-client-id")
            if pdev is None or client is None or (pdev, client) in seen:
                continue
            seen.add((pdev, client))
            for key, value in fields.items():
                if _LOCAL_REGION.match(key) and (size := _size(value)) is not None:
                    used[pdev] = used.get(pdev, 0) + size
    return used


class IntelDetector:
    """Every PCI GPU of vendor 0x8086 bound to i915 or xe (host bridges and other Intel
    functions are not display class and never reach here)."""

    vendor: Vendor = "intel"

    def __init__(self, sysfs_root: str | Path = "/sys", proc_root: str | Path | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._root = Path(sysfs_root)
        self._proc = Path(proc_root) if proc_root is not None else None
        self._clock = clock
        self._energy: dict[str, tuple[float, int]] = {}  # bus id -> (time, µJ) of last scan

    def _power(self, bus_id: str, energy: int | None) -> float | None:
        if energy is None:
            self._energy.pop(bus_id, None)
            return None
        now = self._clock()
        last = self._energy.get(bus_id)
        self._energy[bus_id] = (now, energy)
        if last is None or now <= last[0] or energy < last[1]:
            return None  # first reading, or the counter wrapped/reset: no honest value yet
        return (energy - last[1]) / 1e6 / (now - last[0])

    def detect(self) -> list[GpuRecord]:
        """Intel GPUs now, sorted by PCI bus id."""
        versions = {d: driver_version(self._root, d) for d in DRIVERS}
        local = fdinfo_local_memory(self._proc) if self._proc is not None else {}
        found = []
        present = set()
        for gpu in enumerate_gpus(self._root):
            if gpu.vendor_id != INTEL:
                continue
            if gpu.driver not in DRIVERS:
                log.debug("Intel GPU without i915/xe skipped",
                          extra={"pci_bus_id": gpu.bus_id, "driver": gpu.driver})
                continue
            present.add(gpu.bus_id)
            hwmon = hwmon_dir(gpu.device_dir, gpu.driver)
            integrated = is_intel_integrated(gpu.bus_id)
            used = None
            if self._proc is not None and not integrated:
                used = local.get(gpu.bus_id, 0)
            found.append(GpuRecord(
                index=0, vendor="intel",
                name=pci_name("Intel", gpu.vendor_id, gpu.device_id),
                uuid=pci_uuid(gpu.bus_id), pci_bus_id=gpu.bus_id,
                render_node=gpu.render_node, integrated=integrated,
                card_node=f"/dev/dri/{gpu.card}" if gpu.card else None,
                memory_total_bytes=_vram_total(gpu), memory_used_bytes=used,
                utilization=None,
                temperature_c=hwmon_temperature(hwmon, _TEMPERATURES),
                power_w=self._power(gpu.bus_id, _energy_uj(hwmon)),
                driver=gpu.driver, driver_version=versions[gpu.driver],
            ))
        for gone in set(self._energy) - present:
            del self._energy[gone]
        return found
