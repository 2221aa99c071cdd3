"""The GPU inventory against sysfs trees shaped like real amdgpu/i915/xe machines and an
NVML double; uevents from the real kernel."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent.inventory import Inventory
from agent.inventory.amd import AmdDetector
from agent.inventory.intel import IntelDetector
from agent.inventory.nvml import MemoryInfo, NvmlError, NvmlNotSupported, NvmlUnavailable
from agent.inventory.pci import enumerate_gpus, is_intel_integrated, normalise_bus_id
from common.records import NodeRecord, dump, parse_node
from devtools.gpu_trees import ProcTree, SysfsTree

GiB = 1 << 30


@dataclass
class FakeGpu:
    name: str = "NVIDIA H200"
    uuid: str = "GPU-5d2f0b8e-1c2a-4a44-9a3e-0d1d8c3f6a11"
    bus_id: str = "00000000:18:00.0"
    total: int = 150754820096
    used_v1: int = 615 << 20   # reserved memory counted in, as v1 does
    used_v2: int = 0
    util: int = 12
    temp: int = 31
    power_mw: int = 76543
    mig: int | None = 0        # None: GPU without MIG
    broken: set[str] = field(default_factory=set)


class FakeNvml:
    """An NvmlApi double: a list of GPUs, or no driver at all."""

    def __init__(self, gpus: list[FakeGpu] | None = None, *, driver: bool = True,
                 v2: bool = True) -> None:
        self.gpus = gpus or []
        self.driver = driver
        self.v2 = v2
        self.inits = 0
        self.shutdowns = 0

    def _gpu(self, i: int, what: str) -> FakeGpu:
        gpu = self.gpus[i]
        if what in gpu.broken:
            raise NvmlNotSupported(what)
        return gpu

    def init(self) -> None:
        if not self.driver:
            raise NvmlUnavailable("NVML Shared Library Not Found")
        self.inits += 1

    def shutdown(self) -> None:
        self.shutdowns += 1

    def driver_version(self) -> str:
        return "580.159.04"

    def device_count(self) -> int:
        return len(self.gpus)

    def name(self, i: int) -> str:
        return self._gpu(i, "name").name

    def uuid(self, i: int) -> str:
        return self._gpu(i, "uuid").uuid

    def pci_bus_id(self, i: int) -> str:
        return self._gpu(i, "bus").bus_id

    def memory(self, i: int) -> MemoryInfo:
        g = self._gpu(i, "memory")
        return MemoryInfo(total=g.total, used=g.used_v1)

    def memory_v2(self, i: int) -> MemoryInfo:
        if not self.v2:
            raise NvmlNotSupported("Function Not Found")
        g = self._gpu(i, "memory")
        return MemoryInfo(total=g.total, used=g.used_v2)

    def utilization_percent(self, i: int) -> int:
        return self._gpu(i, "util").util

    def temperature_c(self, i: int) -> int:
        return self._gpu(i, "temp").temp

    def power_mw(self, i: int) -> int:
        return self._gpu(i, "power").power_mw

    def mig_mode(self, i: int) -> int:
        g = self._gpu(i, "mig")
        if g.mig is None:
            raise NvmlNotSupported("Not Supported")
        return g.mig


@pytest.fixture
def tree(tmp_path: Path) -> SysfsTree:
    return SysfsTree(tmp_path / "sys")


def inventory(tree: SysfsTree, nvml: FakeNvml | None = None, **kw: object) -> Inventory:
    return Inventory(str(tree.root), nvml or FakeNvml(driver=False), **kw)  # type: ignore[arg-type]


# -- AMD ---------------------------------------------------------------------------------------

async def test_amdgpu_dgpu_fields(tree: SysfsTree) -> None:
    tree.add_amdgpu()
    tree.module_version("amdgpu", "6.8.5")
    [gpu] = await inventory(tree).scan()
    assert (gpu.index, gpu.vendor, gpu.driver, gpu.driver_version) == (0, "amd", "amdgpu", "6.8.5")
    assert gpu.name == "AMD GPU [1002:744c]"
    assert gpu.uuid == "GPU-2c2c2cf05f6b5a1e"
    assert gpu.pci_bus_id == "0000:03:00.0"
    assert gpu.render_node == "/dev/dri/renderD128"
    assert gpu.integrated is False
    assert gpu.memory_total_bytes == 25753026560  # VRAM, not the 256 MiB visible BAR
    assert gpu.memory_used_bytes == GiB
    assert gpu.utilization == pytest.approx(0.37)
    assert gpu.temperature_c == 45.0  # the edge sensor, not junction or mem
    assert gpu.power_w == pytest.approx(58.0)  # power1_input, not the 327 W cap
    assert gpu.mig_enabled is None


async def test_amdgpu_prefers_power1_average_and_product_name(tree: SysfsTree) -> None:
    dev = tree.add_amdgpu()
    tree.write(dev / "hwmon" / "hwmon0" / "power1_average", 120500000)
    tree.write(dev / "product_name", "AMD Instinct MI210")
    [gpu] = await inventory(tree).scan()
    assert gpu.power_w == pytest.approx(120.5)
    assert gpu.name == "AMD Instinct MI210"


async def test_missing_files_are_null(tree: SysfsTree) -> None:
    dev = tree.pci_function("0000:07:00.0", 0x1002, 0x73BF, 0x030000, "amdgpu")
    tree.drm(dev, render=False)
    [gpu] = await inventory(tree).scan()
    assert gpu.uuid == "pci-0000:07:00.0"
    assert gpu.render_node is None
    assert gpu.driver_version is None
    nulls = (gpu.memory_total_bytes, gpu.memory_used_bytes, gpu.utilization,
             gpu.temperature_c, gpu.power_w)
    assert nulls == (None, None, None, None, None)


async def test_unreadable_values_are_null(tree: SysfsTree) -> None:
    dev = tree.add_amdgpu()
    tree.write(dev / "mem_info_vram_used", "")
    tree.write(dev / "gpu_busy_percent", "garbage")
    [gpu] = await inventory(tree).scan()
    assert gpu.memory_used_bytes is None
    assert gpu.utilization is None
    assert gpu.memory_total_bytes == 25753026560


# -- Intel -------------------------------------------------------------------------------------

async def test_i915_integrated_and_arc(tree: SysfsTree) -> None:
    tree.add_i915_igpu()
    tree.add_i915_arc()
    inv = inventory(tree)
    igpu, arc = await inv.scan()
    assert (igpu.pci_bus_id, igpu.integrated, igpu.driver) == ("0000:00:02.0", True, "i915")
    assert igpu.name == "Intel GPU [8086:4680]"
    assert igpu.uuid == "pci-0000:00:02.0"
    assert igpu.render_node == "/dev/dri/renderD128"
    assert (arc.pci_bus_id, arc.integrated, arc.render_node) == (
        "0000:04:00.0", False, "/dev/dri/renderD129")
    # i915 has no memory, temperature or busy files, and energy alone is no power reading.
    for gpu in (igpu, arc):
        assert (gpu.memory_total_bytes, gpu.memory_used_bytes, gpu.utilization,
                gpu.temperature_c, gpu.power_w) == (None, None, None, None, None)
    assert [g.pci_bus_id for g in inv.offerable([igpu, arc])] == ["0000:04:00.0"]
    inv_all = inventory(tree, offer_integrated=True)
    assert len(inv_all.offerable([igpu, arc])) == 2


async def test_xe_dgpu(tree: SysfsTree) -> None:
    tree.add_xe()
    tree.module_version("xe", "1.1.0")
    [gpu] = await inventory(tree).scan()
    assert (gpu.vendor, gpu.driver, gpu.driver_version) == ("intel", "xe", "1.1.0")
    assert gpu.integrated is False
    assert gpu.memory_total_bytes == 12 * GiB
    assert gpu.memory_used_bytes is None  # fdinfo not asked for
    assert gpu.temperature_c == 41.0  # pkg sensor
    assert gpu.power_w is None  # one energy reading
    assert gpu.render_node == "/dev/dri/renderD128"


def test_intel_power_from_energy_across_scans(tree: SysfsTree) -> None:
    dev = tree.add_xe()
    now = [100.0]
    detector = IntelDetector(tree.root, clock=lambda: now[0])
    assert detector.detect()[0].power_w is None
    tree.write(dev / "hwmon" / "hwmon0" / "energy1_input", 5000000 + 45000000)
    now[0] += 2.0
    assert detector.detect()[0].power_w == pytest.approx(22.5)  # 45 J in 2 s
    tree.write(dev / "hwmon" / "hwmon0" / "energy1_input", 10)  # counter reset
    now[0] += 2.0
    assert detector.detect()[0].power_w is None


def test_intel_memory_used_from_fdinfo(tree: SysfsTree, tmp_path: Path) -> None:
    tree.add_i915_igpu()
    tree.add_i915_arc()
    tree.add_xe()
    proc = tmp_path / "proc"

    def fd(pid: int, n: int, target: str, info: str) -> None:
        (proc / str(pid) / "fd").mkdir(parents=True, exist_ok=True)
        (proc / str(pid) / "fdinfo").mkdir(parents=True, exist_ok=True)
        os.symlink(target, proc / str(pid) / "fd" / str(n))
        (proc / str(pid) / "fdinfo" / str(n)).write_text(info)

    arc = "pos:\t0\ndrm-driver:\ti915\ndrm-pdev:\t0000:04:00.0\ndrm-client-id:\t{}\n" \
          "drm-total-local0:\t{} KiB\ndrm-resident-local0:\t{} KiB\n" \
          "drm-resident-system0:\t4096 KiB\n"
    fd(100, 5, "/dev/dri/renderD129", arc.format(7, 2048, 1024))
    fd(100, 6, "/dev/dri/renderD129", arc.format(7, 2048, 1024))  # same client again
    fd(200, 3, "/dev/dri/renderD129", arc.format(9, 1, 1))
    fd(200, 4, "/tmp/not-a-gpu", arc.format(11, 999999, 999999))
    fd(300, 8, "/dev/dri/renderD130", "drm-driver:\txe\ndrm-pdev:\t0000:05:00.0\n"
       "drm-client-id:\t3\ndrm-resident-vram0:\t2 MiB\ndrm-resident-gtt:\t1 MiB\n")
    igpu, arc_gpu, xe = IntelDetector(tree.root, proc_root=proc).detect()
    assert arc_gpu.memory_used_bytes == (1024 + 1) * 1024
    assert xe.memory_used_bytes == 2 << 20
    assert igpu.memory_used_bytes is None  # shares system memory: no device memory to count


async def test_intel_host_bridge_is_not_a_gpu(tree: SysfsTree) -> None:
    tree.add_intel_host_bridge()
    tree.pci_function("0000:00:1f.3", 0x8086, 0x7AD0, 0x040300, "snd_hda_intel")  # audio
    assert await inventory(tree).scan() == []
    assert enumerate_gpus(tree.root) == []


def test_gpu_without_drm_driver_is_still_enumerated(tree: SysfsTree) -> None:
    tree.pci_function("0000:09:00.0", 0x8086, 0x56A0, 0x030000, None)
    [gpu] = enumerate_gpus(tree.root)
    assert (gpu.bus_id, gpu.driver, gpu.card, gpu.render_node) == (
        "0000:09:00.0", None, None, None)
    # ... but there is nothing to read or hand to a container, so it is not inventoried.
    assert IntelDetector(tree.root).detect() == []


def test_integrated_rule_and_bus_ids() -> None:
    assert is_intel_integrated("0000:00:02.0")
    assert not is_intel_integrated("0000:03:00.0")
    assert not is_intel_integrated("0000:00:01.0")
    assert normalise_bus_id("00000000:18:00.0") == "0000:18:00.0"
    assert normalise_bus_id("0000:AB:00.0") == "0000:ab:00.0"


# -- NVIDIA ------------------------------------------------------------------------------------

async def test_nvml_fields_and_v2_memory(tree: SysfsTree) -> None:
    nvml = FakeNvml([FakeGpu()])
    inv = inventory(tree, nvml)
    [gpu] = await inv.scan()
    assert (gpu.index, gpu.vendor, gpu.name, gpu.driver) == (0, "nvidia", "NVIDIA H200", "nvidia")
    assert gpu.uuid == "GPU-5d2f0b8e-1c2a-4a44-9a3e-0d1d8c3f6a11"
    assert gpu.pci_bus_id == "0000:18:00.0"
    assert gpu.memory_total_bytes == 150754820096
    assert gpu.memory_used_bytes == 0  # v2's figure, not v1's 615 MiB of reserved memory
    assert gpu.utilization == pytest.approx(0.12)
    assert gpu.temperature_c == 31.0
    assert gpu.power_w == pytest.approx(76.543)
    assert gpu.driver_version == "580.159.04"
    assert gpu.mig_enabled is False
    assert gpu.integrated is False and gpu.render_node is None
    inv.close()
    assert nvml.shutdowns == 1


async def test_nvml_v1_memory_on_old_driver(tree: SysfsTree) -> None:
    [gpu] = await inventory(tree, FakeNvml([FakeGpu()], v2=False)).scan()
    assert gpu.memory_used_bytes == 615 << 20


async def test_nvml_mig_and_unsupported_fields(tree: SysfsTree) -> None:
    gpus = [FakeGpu(mig=1), FakeGpu(uuid="GPU-b", bus_id="00000000:2A:00.0", mig=None,
                                    broken={"power", "temp", "util"})]
    mig, plain = await inventory(tree, FakeNvml(gpus)).scan()
    assert mig.mig_enabled is True
    assert plain.mig_enabled is None
    assert (plain.power_w, plain.temperature_c, plain.utilization) == (None, None, None)
    assert plain.pci_bus_id == "0000:2a:00.0"


async def test_no_nvidia_driver_is_zero_gpus_and_one_info_line(
        tree: SysfsTree, caplog: pytest.LogCaptureFixture) -> None:
    tree.add_amdgpu()
    inv = inventory(tree, FakeNvml(driver=False))
    with caplog.at_level(logging.INFO, logger="agent.inventory"):
        first = await inv.scan()
        second = await inv.scan()
    assert [g.vendor for g in first] == [g.vendor for g in second] == ["amd"]
    lines = [r for r in caplog.records if "NVIDIA" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO
    inv.close()


async def test_nvidia_render_node_from_drm(tree: SysfsTree) -> None:
    tree.add_nvidia("0000:18:00.0")
    [gpu] = await inventory(tree, FakeNvml([FakeGpu()])).scan()
    assert gpu.render_node == "/dev/dri/renderD128"
    assert gpu.vendor == "nvidia"  # the PCI function is not counted a second time


# -- the whole machine -------------------------------------------------------------------------

async def test_mixed_machine_reports_every_vendor_in_stable_order(tree: SysfsTree) -> None:
    tree.add_intel_host_bridge()
    tree.add_i915_igpu("0000:00:02.0")
    tree.add_xe("0000:c5:00.0")
    tree.add_amdgpu("0000:43:00.0")
    tree.add_i915_arc("0000:04:00.0")
    nvml = FakeNvml([FakeGpu(uuid="GPU-a", bus_id="00000000:B1:00.0"),
                     FakeGpu(uuid="GPU-b", bus_id="00000000:18:00.0")])
    inv = inventory(tree, nvml)
    gpus = await inv.scan()
    got = [(g.index, g.vendor, g.pci_bus_id) for g in gpus]
    assert got == [
        (0, "nvidia", "0000:b1:00.0"),  # NVML order, whatever the bus ids
        (1, "nvidia", "0000:18:00.0"),
        (2, "intel", "0000:00:02.0"),
        (3, "intel", "0000:04:00.0"),
        (4, "amd", "0000:43:00.0"),
        (5, "intel", "0000:c5:00.0"),
    ]
    assert got == [(g.index, g.vendor, g.pci_bus_id) for g in await inv.scan()]
    assert [g.index for g in inv.offerable(gpus)] == [0, 1, 3, 4, 5]
    # The records travel through etcd unchanged.
    node = NodeRecord(node="n1", agent_version="0", started_at=1.0, heartbeat_at=2.0, gpus=gpus)
    assert parse_node(dump(node)).gpus == gpus
    inv.close()


async def test_failing_detector_is_skipped(tree: SysfsTree,
                                           caplog: pytest.LogCaptureFixture) -> None:
    tree.add_amdgpu()

    class Broken:
        vendor = "nvidia"

        def detect(self) -> list:
            raise NvmlError("GPU is lost")

    inv = inventory(tree)
    inv.detectors[0] = Broken()  # type: ignore[assignment]
    with caplog.at_level(logging.ERROR, logger="agent.inventory"):
        gpus = await inv.scan()
    assert [g.vendor for g in gpus] == ["amd"]
    assert any("detector failed" in r.getMessage() for r in caplog.records)


async def test_a_detector_failing_once_does_not_make_its_gpus_vanish(tree: SysfsTree) -> None:
    # An NVML hiccup is not two GPUs leaving the machine: their backends must keep running.
    nvml = FakeNvml([FakeGpu(), FakeGpu(uuid="GPU-2", bus_id="00000000:19:00.0")])
    tree.add_amdgpu()
    inv = inventory(tree, nvml)
    first = await inv.scan()
    assert [g.vendor for g in first] == ["nvidia", "nvidia", "amd"]
    real = inv.detectors[0]

    class Hiccup:
        vendor = "nvidia"

        def detect(self) -> list:
            raise NvmlError("Unknown Error")

    inv.detectors[0] = Hiccup()  # type: ignore[assignment]
    during = await inv.scan()
    assert [(g.vendor, g.uuid) for g in during] == [(g.vendor, g.uuid) for g in first]
    inv.detectors[0] = real
    nvml.gpus.pop()  # now one really is gone: the next good read says so
    after = await inv.scan()
    assert [g.uuid for g in after if g.vendor == "nvidia"] == [first[0].uuid]


async def test_gpu_removed_between_scans(tree: SysfsTree) -> None:
    tree.add_amdgpu()
    dev = tree.add_xe()
    inv = inventory(tree)
    assert len(await inv.scan()) == 2
    os.unlink(tree.root / "class" / "drm" / "card1")
    os.unlink(tree.root / "bus" / "pci" / "devices" / dev.name)
    assert [g.vendor for g in await inv.scan()] == ["amd"]


def test_amd_detector_ignores_other_drivers(tree: SysfsTree) -> None:
    tree.pci_function("0000:0a:00.0", 0x1002, 0x6798, 0x030000, "radeon")
    assert AmdDetector(tree.root).detect() == []


# -- uevents -----------------------------------------------------------------------------------

async def _first(it: object) -> None:
    await it.__anext__()  # type: ignore[attr-defined]


async def test_changes_can_start_and_be_cancelled(tree: SysfsTree) -> None:
    inv = inventory(tree)
    changes = inv.changes()
    task = asyncio.create_task(_first(changes), name="drm-changes")
    await asyncio.sleep(0)  # let it reach its wait
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await changes.aclose()
    assert task.cancelled()


async def test_changes_yield_on_a_real_kernel_uevent(tree: SysfsTree) -> None:
    # No DRM device exists here, so the watcher is pointed at the "mem" subsystem and the
    # kernel is asked to re-announce /dev/null: a real uevent through the same path.
    uevent = Path("/sys/devices/virtual/mem/null/uevent")
    if not os.access(uevent, os.W_OK):
        pytest.skip("cannot ask the kernel for a uevent here (needs root and a writable /sys)")
    inv = inventory(tree, uevent_subsystem="mem")
    changes = inv.changes()
    task = asyncio.create_task(_first(changes), name="mem-changes")
    try:
        for _ in range(50):  # bounded: the monitor may not be listening on the first write
            await asyncio.to_thread(uevent.write_text, "change")
            done, _ = await asyncio.wait({task}, timeout=0.1)
            if done:
                break
        assert task.done() and task.exception() is None
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await changes.aclose()


async def test_card_node_is_read_not_derived_from_the_render_node(tree: SysfsTree) -> None:
    # A server's BMC (ASPEED, display only) registers card0 and no render node, so the Arc
    # is card1 with renderD128: deriving card0 from renderD128 would hand out the BMC.
    bmc = tree.pci_function("0000:02:00.0", 0x1A03, 0x2000, 0x030000, "ast")
    tree.drm(bmc, render=False)
    tree.add_i915_arc("0000:04:00.0")
    (arc,) = await inventory(tree).scan()
    assert (arc.render_node, arc.card_node) == ("/dev/dri/renderD128", "/dev/dri/card1")


# -- issue 16: GPUs told truly -----------------------------------------------------------------

async def test_names_come_from_pci_ids_with_the_raw_ids_kept(tree: SysfsTree) -> None:
    tree.pci_ids()
    tree.add_amdgpu("0000:03:00.0")                                       # reference board
    tree.add_amdgpu("0000:43:00.0", unique_id=None, subsystem=(0x1EAE, 0x7901))  # a Speedster
    tree.add_amdgpu("0000:44:00.0", device=0x73BF, unique_id=None, subsystem=(0x1002, 0x0E3A))
    tree.add_i915_igpu()
    tree.add_xe("0000:05:00.0")
    gpus = await inventory(tree).scan()
    shown = {g.pci_bus_id: (g.name, g.pci_id) for g in gpus}
    assert shown == {
        "0000:03:00.0": ("Radeon RX 7900 XT/7900 XTX", "1002:744c"),
        "0000:43:00.0": ("SPEEDSTER MERC 310 RX 7900 XTX", "1002:744c"),  # the board's name
        "0000:44:00.0": ("Radeon RX 6900 XT", "1002:73bf"),
        "0000:00:02.0": ("AlderLake-S GT1", "8086:4680"),  # no bracketed name: kept whole
        "0000:05:00.0": ("Arc B580", "8086:e20b"),
    }


async def test_without_pci_ids_the_name_is_the_ids(tree: SysfsTree) -> None:
    tree.add_amdgpu()
    tree.add_xe()
    amd, xe = await inventory(tree).scan()
    assert (amd.name, amd.pci_id) == ("AMD GPU [1002:744c]", "1002:744c")
    assert xe.name == "Intel GPU [8086:e20b]"


async def test_pci_ids_from_hwdata_or_a_configured_path(tree: SysfsTree, tmp_path: Path) -> None:
    tree.add_xe()
    tree.pci_ids(where="usr/share/hwdata/pci.ids")  # Fedora/Arch put it here
    [gpu] = await inventory(tree).scan()
    assert gpu.name == "Arc B580"
    own = tmp_path / "ids"
    own.write_text("8086  Intel Corporation\n\te20b  Battlemage G21 [Arc B580 Special]\n")
    [gpu] = await inventory(tree, pci_ids=str(own)).scan()
    assert gpu.name == "Arc B580 Special"


async def test_fru_product_name_beats_pci_ids_and_nvidia_gets_its_pci_id(tree: SysfsTree) -> None:
    tree.pci_ids()
    dev = tree.add_amdgpu()
    tree.write(dev / "product_name", "AMD Radeon PRO W7900")
    tree.add_nvidia("0000:18:00.0")
    nv, amd = await inventory(tree, FakeNvml([FakeGpu()])).scan()
    assert amd.name == "AMD Radeon PRO W7900"
    assert (nv.name, nv.pci_id) == ("NVIDIA H200", "10de:2335")  # the name stays NVML's


async def test_amd_apu_is_integrated_and_dgpu_is_not(tree: SysfsTree) -> None:
    tree.pci_ids()
    tree.add_amdgpu("0000:03:00.0")
    tree.add_amd_apu("0000:c4:00.0")
    inv = inventory(tree)
    dgpu, apu = await inv.scan()
    assert (dgpu.integrated, apu.integrated) == (False, True)
    assert apu.name == "Phoenix1"
    assert apu.memory_total_bytes == 512 << 20  # the carve-out, as amdgpu reports it
    assert [g.pci_bus_id for g in inv.offerable([dgpu, apu])] == ["0000:03:00.0"]
    # An older kernel without board_info: the dGPU's ROM alone keeps it discrete.
    os.unlink(tree.root / "devices" / "pci0000:00" / "0000:03:00.0" / "board_info")
    assert [g.integrated for g in await inv.scan()] == [False, True]


def _xe_client(busy: int, total: int) -> dict[str, object]:
    return {"drm-driver": "xe", "drm-client-id": "3", "drm-pdev": "0000:05:00.0",
            "drm-cycles-rcs": busy, "drm-total-cycles-rcs": total,
            "drm-cycles-ccs": 0, "drm-total-cycles-ccs": total,
            "drm-engine-capacity-ccs": 4}


def test_xe_utilisation_from_fdinfo_cycles_between_two_scans(tree: SysfsTree,
                                                              tmp_path: Path) -> None:
    tree.add_xe()
    proc = ProcTree(tmp_path / "proc")
    proc.fd(300, 8, "/dev/dri/renderD128", _xe_client(28257900, 7655183225))
    now = [10.0]
    detector = IntelDetector(tree.root, proc_root=proc.root, clock=lambda: now[0])
    assert detector.detect()[0].utilization is None  # one sample gives no rate
    # 1e9 cycles later the render engine was busy for 250e6 of them; compute 4 engines x 0.
    proc.fd(300, 8, "/dev/dri/renderD128", _xe_client(28257900 + 250_000_000,
                                                      7655183225 + 1_000_000_000))
    now[0] += 2.0
    assert detector.detect()[0].utilization == pytest.approx(0.25)
    # All four compute engines half busy: 2e9 busy cycles over 1e9 elapsed on 4 engines.
    fields = _xe_client(278257900, 8655183225 + 1_000_000_000)
    fields["drm-cycles-ccs"] = 2_000_000_000
    proc.fd(300, 8, "/dev/dri/renderD128", fields)
    assert detector.detect()[0].utilization == pytest.approx(0.5)


def test_i915_utilisation_from_engine_ns_summed_over_clients(tree: SysfsTree,
                                                             tmp_path: Path) -> None:
    tree.add_i915_igpu()
    tree.add_i915_arc()
    proc = ProcTree(tmp_path / "proc")

    def arc(client: int, render_ns: int, video_ns: int = 0) -> dict[str, object]:
        return {"drm-driver": "i915", "drm-pdev": "0000:04:00.0", "drm-client-id": client,
                "drm-engine-render": f"{render_ns} ns", "drm-engine-copy": "0 ns",
                "drm-engine-video": f"{video_ns} ns", "drm-engine-capacity-video": 2}

    proc.fd(100, 5, "/dev/dri/renderD129", arc(7, 1_000_000_000))
    proc.fd(100, 6, "/dev/dri/renderD129", arc(7, 1_000_000_000))  # same client, 2nd fd
    proc.fd(200, 3, "/dev/dri/renderD129", arc(9, 5_000_000_000, 0))
    now = [50.0]
    detector = IntelDetector(tree.root, proc_root=proc.root, clock=lambda: now[0])
    assert [g.utilization for g in detector.detect()] == [None, None]
    # 4 s later: client 7 ran render 1 s, client 9 ran 1.2 s; video 4 s on 2 engines = 50 %.
    now[0] += 4.0
    proc.fd(100, 5, "/dev/dri/renderD129", arc(7, 2_000_000_000))
    proc.fd(100, 6, "/dev/dri/renderD129", arc(7, 2_000_000_000))
    proc.fd(200, 3, "/dev/dri/renderD129", arc(9, 6_200_000_000, 4_000_000_000))
    igpu, gpu = detector.detect()
    assert gpu.utilization == pytest.approx(0.55)  # render: (1 + 1.2) s / 4 s, the busiest
    assert igpu.utilization == 0.0  # no client at all: idle, not unknown
    # A counter that steps back is held at its larger value (drm-usage-stats.rst).
    now[0] += 1.0
    proc.fd(200, 3, "/dev/dri/renderD129", arc(9, 6_000_000_000, 4_000_000_000))
    proc.fd(100, 5, "/dev/dri/renderD129", arc(7, 2_000_000_000))
    assert detector.detect()[1].utilization == 0.0


def test_intel_utilisation_is_null_without_proc_root(tree: SysfsTree) -> None:
    tree.add_xe()
    detector = IntelDetector(tree.root)
    detector.detect()
    assert detector.detect()[0].utilization is None


async def test_i915_memory_total_where_the_out_of_tree_driver_exposes_it(
        tree: SysfsTree) -> None:
    tree.add_i915_arc("0000:04:00.0", lmem=(16 * GiB, 12 * GiB))
    tree.add_i915_arc("0000:06:00.0")  # mainline i915: no file, so null
    backport, mainline = await inventory(tree).scan()
    assert (backport.memory_total_bytes, backport.memory_used_bytes) == (16 * GiB, 4 * GiB)
    assert (mainline.memory_total_bytes, mainline.memory_used_bytes) == (None, None)
