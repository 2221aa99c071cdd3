"""GPU names from the PCI ID database the OS ships (``pci.ids``, what lspci reads).

Format (the header of pci.ids itself; https://pci-ids.ucw.cz/): a vendor line is four hex
digits, two spaces and the name; under it, one tab, device id, two spaces, device name;
under a device, two tabs, subvendor, a space, subdevice, two spaces, subsystem name. ``#``
starts a comment; the device classes follow from the first line starting ``C ``. Debian and
Ubuntu ship it in the ``pci.ids`` package as /usr/share/misc/pci.ids, Fedora and Arch (the
``hwdata`` package) as /usr/share/hwdata/pci.ids.

Device names there read "Navi 31 [Radeon RX 7900 XT/7900 XTX]": the chip, then in brackets
the marketing name. The bracketed part is what a user knows the card by, so that is shown.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

# Where distributions install pci.ids, relative to the filesystem root.
PCI_IDS_PATHS = ("usr/share/misc/pci.ids", "usr/share/hwdata/pci.ids")


@dataclass(slots=True)
class PciIds:
    """The device and subsystem names of some vendors, parsed from one pci.ids file."""

    devices: dict[tuple[int, int], str] = field(default_factory=dict)
    subsystems: dict[tuple[int, int, int, int], str] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str, vendors: frozenset[int]) -> PciIds:
        """Names of ``vendors``' devices (the whole file has ~40k lines: keep only those)."""
        ids = cls()
        vendor: int | None = None
        device: int | None = None
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            if line.startswith("C "):
                break  # the device-class section: no more vendors
            try:
                if line.startswith("\t\t"):
                    if vendor is None or device is None:
                        continue
                    ids_part, _, name = line[2:].partition("  ")
                    sub_vendor, sub_device = (int(x, 16) for x in ids_part.split())
                    ids.subsystems[(vendor, device, sub_vendor, sub_device)] = name.strip()
                elif line.startswith("\t"):
                    if vendor is None:
                        continue
                    dev_part, _, name = line[1:].partition("  ")
                    device = int(dev_part, 16)
                    ids.devices[(vendor, device)] = name.strip()
                else:
                    vendor_part = line.split(None, 1)[0]
                    number = int(vendor_part, 16)
                    vendor = number if number in vendors else None
                    device = None
            except ValueError:
                continue  # a malformed line costs that line only
        return ids

    def name(self, vendor: int, device: int, sub_vendor: int | None = None,
             sub_device: int | None = None) -> str | None:
        """The name to show: the subsystem's (the exact board) where pci.ids lists it, else
        the device's; in each, the bracketed marketing name when there is one."""
        if sub_vendor is not None and sub_device is not None:
            board = self.subsystems.get((vendor, device, sub_vendor, sub_device))
            if board:
                return marketing_name(board)
        chip = self.devices.get((vendor, device))
        return marketing_name(chip) if chip else None


def marketing_name(name: str) -> str:
    """"Navi 31 [Radeon RX 7900 XT/7900 XTX]" -> "Radeon RX 7900 XT/7900 XTX"; a name
    without brackets ("AlderLake-S GT1") is kept whole."""
    start, end = name.find("["), name.rfind("]")
    if 0 <= start < end:
        inner = name[start + 1:end].strip()
        if inner:
            return inner
    return name.strip()


def find_pci_ids(root: str | Path) -> Path | None:
    """The first pci.ids under ``root`` (the filesystem the inventory reads, so a test's
    fake tree or a host mounted elsewhere supplies its own), or None."""
    for rel in PCI_IDS_PATHS:
        path = Path(root) / rel
        if path.is_file():
            return path
    return None


class PciIdsCache:
    """pci.ids parsed once, and again only when the file changes (a package upgrade)."""

    def __init__(self, path: Path | None, vendors: frozenset[int]) -> None:
        self._path = path
        self._vendors = vendors
        self._stamp: tuple[int, int] | None = None
        self._ids = PciIds()

    def get(self) -> PciIds:
        """The parsed database; empty (every lookup None) where there is no file."""
        if self._path is None:
            return self._ids
        try:
            st = os.stat(self._path)
        except OSError:
            self._stamp, self._ids = None, PciIds()
            return self._ids
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            try:
                text = self._path.read_text(encoding="utf-8", errors="replace")
            except OSError as err:
                log.warning("pci.ids unreadable; GPUs are named by their PCI ids",
                            extra={"path": str(self._path), "error": str(err)})
                text = ""
            self._ids = PciIds.parse(text, self._vendors)
            self._stamp = stamp
        return self._ids
