"""What every vendor detector shares: the Detector protocol and tolerant sysfs readers.

Sysfs files come and go with kernel versions, drivers and hardware generations, so every
reader here returns ``None`` for a file that is absent, unreadable or not what it should be:
the caller turns that into a ``null`` field instead of guessing a value.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Protocol

from common.records import GpuRecord, Vendor


class Detector(Protocol):
    """One vendor's GPU discovery. ``detect`` blocks (sysfs, NVML): call it off the loop."""

    vendor: Vendor

    def detect(self) -> list[GpuRecord]:
        """The vendor's GPUs now; indexes are provisional (the Inventory renumbers them)."""
        ...


def read_text(path: Path) -> str | None:
    """The stripped content of a sysfs file, or None when it is absent, unreadable or empty."""
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return None
    return text or None


def read_int(path: Path) -> int | None:
    """A decimal or 0x-prefixed integer from a sysfs file, or None."""
    text = read_text(path)
    if text is None:
        return None
    try:
        return int(text, 0)
    except ValueError:
        return None


def read_uevent(device: Path) -> dict[str, str]:
    """``KEY=value`` lines of a device's uevent file (empty when unreadable)."""
    text = read_text(device / "uevent") or ""
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def driver_version(sysfs_root: Path, driver: str) -> str | None:
    """``/sys/module/<driver>/version``: out-of-tree (DKMS) modules have it, in-tree ones not."""
    return read_text(sysfs_root / "module" / driver / "version")


def hwmon_dir(device: Path, name: str) -> Path | None:
    """The device's hwmon directory whose ``name`` file says ``name`` (e.g. amdgpu, xe)."""
    base = device / "hwmon"
    try:
        entries = sorted(base.iterdir(), key=lambda p: p.name)
    except OSError:
        return None
    fallback = None
    for entry in entries:
        if not entry.name.startswith("hwmon"):
            continue
        label = read_text(entry / "name")
        if label == name:
            return entry
        fallback = fallback or entry
    # A device has one hwmon of its own; trust it even if an odd kernel names it otherwise.
    return fallback


_TEMP_INPUT = re.compile(r"^temp(\d+)_input$")


def hwmon_temperature(hwmon: Path | None, preferred: tuple[str, ...]) -> float | None:
    """A temperature in °C: the first sensor whose label is in ``preferred`` (in that order),
    else the lowest-numbered sensor; hwmon reports millidegrees."""
    if hwmon is None:
        return None
    try:
        names = os.listdir(hwmon)
    except OSError:
        return None
    sensors = sorted(int(m.group(1)) for n in names if (m := _TEMP_INPUT.match(n)))
    readings: list[tuple[str | None, int]] = []
    for n in sensors:
        value = read_int(hwmon / f"temp{n}_input")
        if value is not None:
            readings.append((read_text(hwmon / f"temp{n}_label"), value))
    for wanted in preferred:
        for label, value in readings:
            if label == wanted:
                return value / 1000
    return readings[0][1] / 1000 if readings else None


def pci_uuid(pci_bus_id: str) -> str:
    """A stable identifier for a GPU whose driver exposes no unique id.

    It names the slot, not the chip: a card moved to another slot gets another id.
    """
    return f"pci-{pci_bus_id}"


def pci_name(vendor_label: str, vendor_id: int, device_id: int) -> str:
    """A name for drivers that expose no product name: the PCI ids, as lspci -nn shows them."""
    return f"{vendor_label} GPU [{vendor_id:04x}:{device_id:04x}]"
