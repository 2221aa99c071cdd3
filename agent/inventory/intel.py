"""Intel GPUs driven by i915 or xe, read from sysfs and, optionally, DRM fdinfo.

What each driver gives (Documentation/ABI/testing/sysfs-driver-intel-{i915,xe}-hwmon,
Documentation/gpu/drm-usage-stats.rst, Documentation/gpu/xe/xe-drm-usage-stats.rst;
summarised in docs/inventory.md):
- i915: hwmon (discrete cards only) has energy1_input in µJ, no temperature, no busy file.
  Mainline i915 has no memory-size file (only the DRM_I915_QUERY_MEMORY_REGIONS ioctl,
  include/uapi/drm/i915_drm.h); Intel's out-of-tree i915 (intel-gpu-i915-backports,
  drivers/gpu/drm/i915/i915_sysfs.c) adds lmem_total_bytes / lmem_avail_bytes on the DRM
  card directory (``/sys/class/drm/cardN/``) of cards with local memory.
- xe: hwmon energy1_input (card) / energy2_input (package) in µJ, temperatures from 6.15
  (labels "pkg", "vram"); VRAM size in tile*/physical_vram_size_bytes.
- both: per-client memory and engine busyness in /proc/<pid>/fdinfo: drm-resident-<region>;
  i915 drm-engine-<class> (busy ns), xe drm-cycles-<class> / drm-total-cycles-<class>.
Power and utilisation are cumulative counters, so they are derived from two scans.
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
from agent.inventory.pciids import PciIds
from common.records import GpuRecord, Vendor

log = logging.getLogger(__name__)

DRIVERS = ("i915", "xe")
_TEMPERATURES = ("pkg", "package", "card")
# Device-local memory regions in fdinfo: i915 calls them local<N>, xe vram<N>.
_LOCAL_REGION = re.compile(r"^drm-resident-(local|vram)\d+$")
_UNITS = {"": 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
# Engine busyness (drm-usage-stats.rst): "drm-engine-<class>: <uint> ns" is busy time (i915:
# render, copy, video, video-enhance, compute); "drm-cycles-<class>" busy GPU cycles over
# "drm-total-cycles-<class>" elapsed ones (xe: rcs, bcs, vcs, vecs, ccs); each summed over
# the class's "drm-engine-capacity-<class>" engines (1 when absent).
_ENGINE = "drm-engine-"
_CAPACITY = "drm-engine-capacity-"
_CYCLES = "drm-cycles-"
_TOTAL_CYCLES = "drm-total-cycles-"

Client = tuple[str, str]  # (drm-pdev, drm-client-id)
# Per engine class: (busy, elapsed) where elapsed is total cycles (xe) or None (busy in ns,
# measured against the wall clock: i915), and the class's engine count.
Counters = dict[str, tuple[int, int | None]]


def _vram_total(gpu: PciGpu) -> int | None:
    """xe: the sum of every tile's physical VRAM; i915: lmem_total_bytes on the card where
    the out-of-tree driver has it (mainline has none: null)."""
    if gpu.driver == "i915":
        return _lmem(gpu, "lmem_total_bytes")
    try:
        tiles = sorted(p for p in gpu.device_dir.iterdir() if p.name.startswith("tile"))
    except OSError:
        return None
    sizes = [read_int(t / "physical_vram_size_bytes") for t in tiles]
    known = [s for s in sizes if s is not None]
    return sum(known) if known else None


def _lmem(gpu: PciGpu, name: str) -> int | None:
    # Registered on the DRM primary minor (i915->drm.primary->kdev): class/drm/cardN/<name>.
    if gpu.card is None:
        return None
    return read_int(gpu.device_dir / "drm" / gpu.card / name)


def _lmem_used(gpu: PciGpu, total: int | None) -> int | None:
    """i915 (out-of-tree): total minus lmem_avail_bytes, the device's whole unallocated local
    memory; None where either file is missing."""
    if gpu.driver != "i915" or total is None:
        return None
    avail = _lmem(gpu, "lmem_avail_bytes")
    return total - avail if avail is not None and avail <= total else None


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


def _uint(text: str) -> int | None:
    """The number of "<uint> [unit]" ("123 ns", "7655183225")."""
    try:
        return int(text.split()[0])
    except (ValueError, IndexError):
        return None


def fdinfo_clients(proc_root: Path) -> dict[Client, dict[str, str]]:
    """The fdinfo fields of every DRM client, keyed by (drm-pdev, drm-client-id).

    A client is read once even when several fds or processes share it (the spec: "drm-
    client-id ... can be used to identify duplicate and shared file descriptors").
    """
    clients: dict[Client, dict[str, str]] = {}
    try:
        pids = [p for p in os.listdir(proc_root) if p.isdigit()]
    except OSError:
        return clients
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
            if pdev is None or client is None or (pdev, client) in clients:
                continue
            clients[(pdev, client)] = fields
    return clients


def local_memory(clients: dict[Client, dict[str, str]]) -> dict[str, int]:
    """Bytes of device-local memory per PCI bus id, summed over the clients."""
    used: dict[str, int] = {}
    for (pdev, _), fields in clients.items():
        for key, value in fields.items():
            if _LOCAL_REGION.match(key) and (size := _size(value)) is not None:
                used[pdev] = used.get(pdev, 0) + size
    return used


def fdinfo_local_memory(proc_root: Path) -> dict[str, int]:
    """Bytes of device-local memory per PCI bus id, summed over DRM clients from fdinfo."""
    return local_memory(fdinfo_clients(proc_root))


def engine_counters(fields: dict[str, str]) -> Counters:
    """One client's busy counters per engine class: cycles where the driver gives cycles
    and total cycles (xe), else busy nanoseconds (i915)."""
    counters: Counters = {}
    for key, value in fields.items():
        if key.startswith(_CYCLES):
            cls = key[len(_CYCLES):]
            busy, total = _uint(value), _uint(fields.get(_TOTAL_CYCLES + cls, ""))
            if busy is not None and total is not None:
                counters[cls] = (busy, total)
    for key, value in fields.items():
        if key.startswith(_ENGINE) and not key.startswith(_CAPACITY):
            cls = key[len(_ENGINE):]
            busy = _uint(value)
            if cls not in counters and busy is not None:
                counters[cls] = (busy, None)
    return counters


def _capacity(fields: dict[str, str], cls: str) -> int:
    value = _uint(fields.get(_CAPACITY + cls, "1"))
    return value if value else 1


class IntelDetector:
    """Every PCI GPU of vendor 0x8086 bound to i915 or xe (host bridges and other Intel
    functions are not display class and never reach here)."""

    vendor: Vendor = "intel"

    def __init__(self, sysfs_root: str | Path = "/sys", proc_root: str | Path | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 names: Callable[[], PciIds] | None = None) -> None:
        self._root = Path(sysfs_root)
        self._proc = Path(proc_root) if proc_root is not None else None
        self._clock = clock
        self._names = names
        self._energy: dict[str, tuple[float, int]] = {}  # bus id -> (time, µJ) of last scan
        # Busyness of the last scan: its time and every client's counters.
        self._busy_at: float | None = None
        self._busy: dict[Client, Counters] = {}
        self._seen: set[str] = set()  # GPUs present at the last scan

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

    def _utilisation(self, clients: dict[Client, dict[str, str]]) -> dict[str, float] | None:
        """Busy fraction per PCI bus id between the last scan and this one: per engine class,
        the clients' busy time over the elapsed time, divided by the class's engine count;
        the GPU's figure is its busiest class (as nvidia-smi's is the share of time the GPU
        ran anything). None on the first scan: one sample gives no rate."""
        now = self._clock()
        before, then = self._busy, self._busy_at
        sample: dict[Client, Counters] = {}
        per_class: dict[str, dict[str, float]] = {}
        for client, fields in clients.items():
            counters = engine_counters(fields)
            old = before.get(client, {})
            kept: Counters = {}
            for cls, (busy, total) in counters.items():
                prev = old.get(cls)
                if prev is not None and busy < prev[0]:
                    # The spec lets a counter step back briefly: "userspace is expected to
                    # stay with that larger previous value until a monotonic update".
                    kept[cls] = prev
                    continue
                kept[cls] = (busy, total)
                if prev is None or then is None:
                    continue  # a client new since the last scan: no interval of its own
                if total is not None and prev[1] is not None:
                    span = total - prev[1]
                    ratio = (busy - prev[0]) / span if span > 0 else 0.0
                else:
                    span_s = now - then
                    ratio = (busy - prev[0]) / 1e9 / span_s if span_s > 0 else 0.0
                by_class = per_class.setdefault(client[0], {})
                by_class[cls] = by_class.get(cls, 0.0) + ratio / _capacity(fields, cls)
            sample[client] = kept
        self._busy, self._busy_at = sample, now
        if then is None:
            return None
        return {pdev: min(1.0, max(classes.values(), default=0.0))
                for pdev, classes in per_class.items()}

    def detect(self) -> list[GpuRecord]:
        """Intel GPUs now, sorted by PCI bus id."""
        versions = {d: driver_version(self._root, d) for d in DRIVERS}
        clients = fdinfo_clients(self._proc) if self._proc is not None else {}
        local = local_memory(clients)
        busy = self._utilisation(clients) if self._proc is not None else None
        names = self._names() if self._names is not None else None
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
            total = _vram_total(gpu)
            used = _lmem_used(gpu, total)
            if used is None and self._proc is not None and not integrated:
                used = local.get(gpu.bus_id, 0)
            utilisation = None
            if busy is not None and gpu.bus_id in self._seen:
                utilisation = busy.get(gpu.bus_id, 0.0)  # no busy client: idle
            found.append(GpuRecord(
                index=0, vendor="intel",
                name=((names.name(gpu.vendor_id, gpu.device_id, gpu.subsystem_vendor_id,
                                  gpu.subsystem_device_id) if names else None)
                      or pci_name("Intel", gpu.vendor_id, gpu.device_id)),
                pci_id=gpu.pci_id,
                uuid=pci_uuid(gpu.bus_id), pci_bus_id=gpu.bus_id,
                render_node=gpu.render_node, integrated=integrated,
                card_node=f"/dev/dri/{gpu.card}" if gpu.card else None,
                memory_total_bytes=total, memory_used_bytes=used,
                utilization=utilisation,
                temperature_c=hwmon_temperature(hwmon, _TEMPERATURES),
                power_w=self._power(gpu.bus_id, _energy_uj(hwmon)),
                driver=gpu.driver, driver_version=versions[gpu.driver],
            ))
        for gone in set(self._energy) - present:
            del self._energy[gone]
        self._seen = present
        return found
