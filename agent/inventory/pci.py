"""PCI enumeration of GPUs under a sysfs root.

A GPU is a PCI function of base class 0x03 (display controller: VGA 0x0300, 3D 0x0302,
other 0x0380 — Instinct and Data Center GPU Max cards use the last two) or one that a DRM
driver has given a ``cardN``. Vendor ids alone say nothing: Intel's host bridge, audio and
network functions are vendor 0x8086 too.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from agent.inventory.base import read_int, read_uevent

AMD = 0x1002
INTEL = 0x8086
NVIDIA = 0x10DE
DISPLAY_CLASS = 0x03

_CARD = re.compile(r"^card(\d+)$")
_BUS_ID = re.compile(r"^([0-9a-fA-F]{4,8}):([0-9a-fA-F]{2}):([0-9a-fA-F]{2})\.([0-7])$")


@dataclass(frozen=True, slots=True)
class PciGpu:
    """One GPU's PCI identity and where its sysfs files are."""

    bus_id: str          # "0000:03:00.0"
    vendor_id: int
    device_id: int
    pci_class: int       # 0x030000
    driver: str | None   # bound kernel driver, None when unbound
    device_dir: Path     # .../devices/pci0000:00/0000:03:00.0 (symlinks resolved)
    card: str | None     # "card1" when a DRM driver registered one
    render_node: str | None  # "/dev/dri/renderD129"
    # The board's subsystem ids (sysfs subsystem_vendor/_device): pci.ids names boards by them.
    subsystem_vendor_id: int | None = None
    subsystem_device_id: int | None = None

    @property
    def pci_id(self) -> str:
        """"1002:744c", as lspci -nn writes it."""
        return f"{self.vendor_id:04x}:{self.device_id:04x}"


def normalise_bus_id(bus_id: str) -> str:
    """Linux's ``DDDD:BB:DD.F`` in lower case (NVML writes an 8-digit domain)."""
    m = _BUS_ID.match(bus_id.strip())
    if not m:
        return bus_id.strip().lower()
    domain, bus, dev, fn = m.groups()
    return f"{int(domain, 16):04x}:{bus.lower()}:{dev.lower()}.{fn}"


def is_intel_integrated(bus_id: str) -> bool:
    """Intel integrated graphics always sit at device 2 on the root bus (00:02.0) — the
    address Intel reserves for the IGD since Sandy Bridge; discrete Arc / Data Center cards
    hang off a PCIe port and so never appear on bus 0."""
    m = _BUS_ID.match(bus_id)
    return m is not None and int(m.group(2), 16) == 0 and int(m.group(3), 16) == 2


def _driver(device: Path) -> str | None:
    # The driver symlink points at bus/pci/drivers/<name>; its last part is all we need,
    # and reading the link (not resolving it) works in trees mounted elsewhere too.
    try:
        return os.path.basename(os.readlink(device / "driver"))
    except OSError:
        return read_uevent(device).get("DRIVER")


def _drm_nodes(device: Path) -> tuple[str | None, str | None]:
    try:
        names = sorted(p.name for p in (device / "drm").iterdir())
    except OSError:
        return None, None
    card = next((n for n in names if _CARD.match(n)), None)
    render = next((n for n in names if n.startswith("renderD")), None)
    return card, f"/dev/dri/{render}" if render else None


def _describe(device: Path, card: str | None) -> PciGpu | None:
    vendor = read_int(device / "vendor")
    device_id = read_int(device / "device")
    pci_class = read_int(device / "class")
    if vendor is None or device_id is None or pci_class is None:
        return None
    if pci_class >> 16 != DISPLAY_CLASS and card is None:
        return None
    bus_id = read_uevent(device).get("PCI_SLOT_NAME") or device.name
    own_card, render = _drm_nodes(device)
    return PciGpu(
        bus_id=normalise_bus_id(bus_id), vendor_id=vendor, device_id=device_id,
        pci_class=pci_class, driver=_driver(device), device_dir=device,
        card=card or own_card, render_node=render,
        subsystem_vendor_id=read_int(device / "subsystem_vendor"),
        subsystem_device_id=read_int(device / "subsystem_device"),
    )


def enumerate_gpus(sysfs_root: str | Path) -> list[PciGpu]:
    """Every GPU under ``sysfs_root``, sorted by PCI bus id.

    Both DRM cards (``class/drm/cardN/device``) and display-class functions on the PCI bus
    (``bus/pci/devices``) count, so a GPU whose DRM driver is not loaded is still seen.
    """
    root = Path(sysfs_root)
    found: dict[str, PciGpu] = {}
    try:
        cards = sorted((p for p in (root / "class" / "drm").iterdir() if _CARD.match(p.name)),
                       key=lambda p: int(p.name[4:]))
    except OSError:
        cards = []
    for card in cards:
        device = (card / "device").resolve()
        gpu = _describe(device, card.name)
        if gpu is not None and gpu.bus_id not in found:
            found[gpu.bus_id] = gpu
    try:
        functions = sorted((root / "bus" / "pci" / "devices").iterdir(), key=lambda p: p.name)
    except OSError:
        functions = []
    for function in functions:
        device = function.resolve()
        gpu = _describe(device, None)
        if gpu is not None and gpu.bus_id not in found:
            found[gpu.bus_id] = gpu
    return [found[k] for k in sorted(found)]
