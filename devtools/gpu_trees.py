"""Builds temporary sysfs trees shaped like the kernel's for amdgpu, i915, xe and friends.

Layout mirrored from real machines: devices live under ``devices/pci0000:00/<bdf>``;
``bus/pci/devices/<bdf>``, ``class/drm/cardN`` and ``class/drm/renderDN`` are relative
symlinks into it; ``<bdf>/driver`` links to ``bus/pci/drivers/<name>``; ``drm/cardN/device``
links back up to the PCI function; hwmon sits at ``<bdf>/hwmon/hwmonN``. The tree's parent
stands for the filesystem root: ``pci_ids()`` installs a pci.ids excerpt at
``<parent>/usr/share/misc/pci.ids``, where the inventory looks for it. :class:`ProcTree` is a
fake /proc holding DRM clients' fdinfo.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

# Lines of pci.ids (the format of https://pci-ids.ucw.cz/) for the devices these trees build,
# as Debian bookworm's pci.ids 0.0~2023.04.11-1 has them, plus e20b (Arc B580) from later
# releases. The trailing "C" section shows where vendors end.
PCI_IDS_EXCERPT = """\
#	List of PCI ID's (excerpt)
#
# Vendors, devices and subsystems. Please keep sorted.

1002  Advanced Micro Devices, Inc. [AMD/ATI]
	15bf  Phoenix1
	73bf  Navi 21 [Radeon RX 6800/6800 XT / 6900 XT]
		1002 0e3a  Radeon RX 6900 XT
		1da2 e437  Pulse Radeon RX 6800
	744c  Navi 31 [Radeon RX 7900 XT/7900 XTX]
		1da2 e471  NITRO+ RX 7900 XTX Vapor-X
		1eae 7901  RX-79XMERCB9 [SPEEDSTER MERC 310 RX 7900 XTX]
10de  NVIDIA Corporation
	2330  GH100[H100 SXM5 80GB]
8086  Intel Corporation
	4660  12th Gen Core Processor Host Bridge/DRAM Registers
	4680  AlderLake-S GT1
	56a0  DG2 [Arc A770]
	e20b  Battlemage G21 [Arc B580]

# List of known device classes, subclasses and programming interfaces
C 00  Unclassified device
	00  Non-VGA unclassified device
"""


class SysfsTree:
    """A fake /sys rooted at ``root``; each ``add_*`` returns the PCI function directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._cards = 0
        self._renders = 0
        self._hwmons = 0
        (root / "class" / "drm").mkdir(parents=True, exist_ok=True)
        (root / "bus" / "pci" / "devices").mkdir(parents=True, exist_ok=True)
        (root / "bus" / "pci" / "drivers").mkdir(parents=True, exist_ok=True)
        (root / "module").mkdir(parents=True, exist_ok=True)

    @staticmethod
    def write(path: Path, value: object) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{value}\n")

    def pci_function(self, bdf: str, vendor: int, device: int, pci_class: int,
                     driver: str | None, subsystem: tuple[int, int] | None = None) -> Path:
        """A PCI function with the identity files every device has (``subsystem``: the
        board's subsystem vendor and device; by default the chip vendor's, device 0)."""
        dev = self.root / "devices" / "pci0000:00" / bdf
        dev.mkdir(parents=True)
        sub_vendor, sub_device = subsystem or (vendor, 0)
        self.write(dev / "vendor", f"0x{vendor:04x}")
        self.write(dev / "device", f"0x{device:04x}")
        self.write(dev / "class", f"0x{pci_class:06x}")
        self.write(dev / "subsystem_vendor", f"0x{sub_vendor:04x}")
        self.write(dev / "subsystem_device", f"0x{sub_device:04x}")
        uevent = [f"PCI_CLASS={pci_class:X}", f"PCI_ID={vendor:04X}:{device:04X}",
                  f"PCI_SUBSYS_ID={sub_vendor:04X}:{sub_device:04X}", f"PCI_SLOT_NAME={bdf}",
                  f"MODALIAS=pci:v0000{vendor:04X}d0000{device:04X}"]
        if driver:
            (self.root / "bus" / "pci" / "drivers" / driver).mkdir(exist_ok=True)
            os.symlink(f"../../../bus/pci/drivers/{driver}", dev / "driver")
            uevent.insert(0, f"DRIVER={driver}")
        (dev / "uevent").write_text("\n".join(uevent) + "\n")
        os.symlink(f"../../../devices/pci0000:00/{bdf}",
                   self.root / "bus" / "pci" / "devices" / bdf)
        return dev

    def drm(self, dev: Path, *, render: bool = True) -> tuple[str, str | None]:
        """Register cardN (and a render node) for a function, as a DRM driver does.

        The kernel numbers render nodes apart from cards: a display-only card (a BMC's)
        takes a card number but no render number, and the two drift apart after it."""
        n = self._cards
        self._cards += 1
        bdf = dev.name
        names = [f"card{n}"] + ([f"renderD{128 + self._renders}"] if render else [])
        if render:
            self._renders += 1
        for name in names:
            node = dev / "drm" / name
            node.mkdir(parents=True)
            os.symlink(f"../../../{bdf}", node / "device")
            self.write(node / "dev", f"226:{n}")
            os.symlink(f"../../devices/pci0000:00/{bdf}/drm/{name}",
                       self.root / "class" / "drm" / name)
        # Connectors appear next to the card in class/drm and must not count as cards.
        conn = dev / "drm" / f"card{n}" / f"card{n}-DP-1"
        conn.mkdir()
        os.symlink(f"../../devices/pci0000:00/{bdf}/drm/card{n}/card{n}-DP-1",
                   self.root / "class" / "drm" / f"card{n}-DP-1")
        return names[0], names[1] if render else None

    def hwmon(self, dev: Path, name: str, files: dict[str, object]) -> Path:
        """A hwmon directory of the device with the given attribute files."""
        hw = dev / "hwmon" / f"hwmon{self._hwmons}"
        self._hwmons += 1
        self.write(hw / "name", name)
        for file, value in files.items():
            self.write(hw / file, value)
        return hw

    def module_version(self, driver: str, version: str) -> None:
        self.write(self.root / "module" / driver / "version", version)

    def pci_ids(self, text: str = PCI_IDS_EXCERPT, where: str = "usr/share/misc/pci.ids"
                ) -> Path:
        """Install a pci.ids on the fake filesystem (the tree's parent is its root)."""
        path = self.root.parent / where
        self.write(path, text.rstrip("\n"))
        return path

    # -- whole devices -------------------------------------------------------------------

    def add_amdgpu(self, bdf: str = "0000:03:00.0", *, device: int = 0x744C,
                   unique_id: str | None = "0x2c2c2cf05f6b5a1e",
                   subsystem: tuple[int, int] | None = None) -> Path:
        """A Radeon RX 7900 XTX-like dGPU: VRAM files, busy percent, hwmon edge/junction/mem
        temperatures and power1_input (RDNA3 has no power1_average); a PCI ``rom`` (its
        VBIOS) and ``board_info``, which amdgpu shows on every GPU but an APU's."""
        dev = self.pci_function(bdf, 0x1002, device, 0x030000, "amdgpu", subsystem)
        self.drm(dev)
        self.write(dev / "board_info", "type : cem")
        (dev / "rom").write_bytes(b"")  # sysfs shows the ROM as an empty-looking file
        self.write(dev / "mem_info_vram_total", 25753026560)
        self.write(dev / "mem_info_vram_used", 1073741824)
        self.write(dev / "mem_info_vis_vram_total", 268435456)  # BAR: must not be used
        self.write(dev / "gpu_busy_percent", 37)
        if unique_id:
            self.write(dev / "unique_id", unique_id)
        self.hwmon(dev, "amdgpu", {
            "temp1_input": 45000, "temp1_label": "edge",
            "temp2_input": 52000, "temp2_label": "junction",
            "temp3_input": 60000, "temp3_label": "mem",
            "power1_input": 58000000, "power1_cap": 327000000,
        })
        return dev

    def add_amd_apu(self, bdf: str = "0000:c4:00.0", device: int = 0x15BF) -> Path:
        """A Ryzen 7040 (Phoenix) APU's GPU: a 512 MiB VRAM carve-out, busy percent, an edge
        sensor; no ``board_info`` (amdgpu hides it on APUs) and no PCI ``rom`` (the VBIOS is
        in the system firmware)."""
        dev = self.pci_function(bdf, 0x1002, device, 0x030000, "amdgpu")
        self.drm(dev)
        self.write(dev / "mem_info_vram_total", 536870912)
        self.write(dev / "mem_info_vram_used", 104857600)
        self.write(dev / "mem_info_vis_vram_total", 536870912)
        self.write(dev / "gpu_busy_percent", 3)
        self.hwmon(dev, "amdgpu", {"temp1_input": 48000, "temp1_label": "edge",
                                   "power1_input": 9000000})
        return dev

    def add_i915_igpu(self, bdf: str = "0000:00:02.0", device: int = 0x4680) -> Path:
        """An Alder Lake-like integrated GPU: no hwmon, no memory files."""
        dev = self.pci_function(bdf, 0x8086, device, 0x030000, "i915")
        self.drm(dev)
        return dev

    def add_i915_arc(self, bdf: str = "0000:04:00.0", device: int = 0x56A0, *,
                     lmem: tuple[int, int] | None = None) -> Path:
        """An Arc A770 on i915: hwmon with energy and power limits only. ``lmem`` (total,
        available) adds what Intel's out-of-tree i915 (intel-gpu-i915-backports) puts on the
        DRM card: ``cardN/lmem_total_bytes`` and ``lmem_avail_bytes``; mainline has neither."""
        dev = self.pci_function(bdf, 0x8086, device, 0x030000, "i915")
        card, _ = self.drm(dev)
        if lmem is not None:
            self.write(dev / "drm" / card / "lmem_total_bytes", lmem[0])
            self.write(dev / "drm" / card / "lmem_avail_bytes", lmem[1])
        self.hwmon(dev, "i915", {"energy1_input": 123456789, "power1_max": 190000000,
                                 "power1_rated_max": 190000000, "in0_input": 680})
        return dev

    def add_xe(self, bdf: str = "0000:05:00.0", device: int = 0xE20B) -> Path:
        """A Battlemage-like dGPU on xe (6.15+): tile VRAM size, energy, pkg/vram temps."""
        dev = self.pci_function(bdf, 0x8086, device, 0x030000, "xe")
        self.drm(dev)
        self.write(dev / "tile0" / "physical_vram_size_bytes", 12884901888)
        self.hwmon(dev, "xe", {"energy1_input": 5000000, "energy2_input": 4000000,
                               "power1_max": 250000000, "temp2_input": 41000,
                               "temp2_label": "pkg", "temp3_input": 50000,
                               "temp3_label": "vram"})
        return dev

    def add_intel_host_bridge(self, bdf: str = "0000:00:00.0") -> Path:
        """Intel's host bridge: vendor 0x8086, class 0x0600, no DRM."""
        return self.pci_function(bdf, 0x8086, 0x4660, 0x060000, None)

    def add_nvidia(self, bdf: str = "0000:18:00.0") -> Path:
        """An NVIDIA GPU as the PCI bus shows it (nvidia-drm gives it a card and renderD)."""
        dev = self.pci_function(bdf, 0x10DE, 0x2335, 0x030200, "nvidia")
        self.drm(dev)
        return dev


class ProcTree:
    """A fake /proc: processes with DRM fds and their fdinfo text (drm-usage-stats.rst)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def fd(self, pid: int, fd: int, target: str, fields: Mapping[str, object]) -> None:
        """Open fd ``fd`` of ``pid`` on ``target`` with these fdinfo ``key: value`` lines
        (rewritten in place when it exists, as the kernel's counters advance)."""
        proc = self.root / str(pid)
        (proc / "fd").mkdir(parents=True, exist_ok=True)
        (proc / "fdinfo").mkdir(parents=True, exist_ok=True)
        link = proc / "fd" / str(fd)
        if not link.is_symlink():
            os.symlink(target, link)
        text = "pos:\t0\nflags:\t02100002\n" + "".join(f"{k}:\t{v}\n" for k, v in fields.items())
        (proc / "fdinfo" / str(fd)).write_text(text)
