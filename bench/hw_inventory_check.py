"""Compare the inventory with nvidia-smi on a real NVIDIA machine, field by field.

Run from the repository root: ``python3 -m bench.hw_inventory_check``. Prints a Markdown
table (pasted into docs/hardware.md) and exits 1 when a field disagrees beyond what two
readings taken a moment apart can explain (power, utilisation, temperature).
"""

from __future__ import annotations

import asyncio
import csv
import io
import platform
import subprocess
import sys

from agent.inventory import Inventory
from agent.inventory.nvml import Pynvml
from agent.inventory.pci import enumerate_gpus, normalise_bus_id
from common.records import GpuRecord

QUERY = ("index,name,uuid,pci.bus_id,memory.total,memory.used,utilization.gpu,"
         "temperature.gpu,power.draw,driver_version,mig.mode.current")
MiB = 1 << 20


def nvidia_smi() -> list[dict[str, str]]:
    out = subprocess.run(
        ["nvidia-smi", f"--query-gpu={QUERY}", "--format=csv,noheader,nounits"],
        check=True, capture_output=True, text=True).stdout
    print(f"$ nvidia-smi --query-gpu={QUERY} --format=csv,noheader,nounits\n{out}")
    keys = QUERY.split(",")
    return [dict(zip(keys, (v.strip() for v in row), strict=True))
            for row in csv.reader(io.StringIO(out)) if row]


def close(a: float | None, b: str, tol: float) -> bool:
    try:
        return a is not None and abs(a - float(b)) <= tol
    except ValueError:
        return False


def mib(value: int | None) -> float | None:
    return None if value is None else value / MiB


def compare(gpu: GpuRecord, smi: dict[str, str]) -> list[tuple[str, str, str, bool]]:
    mig = {"Enabled": True, "Disabled": False}.get(smi["mig.mode.current"])
    rows = [
        ("index", str(gpu.index), smi["index"], str(gpu.index) == smi["index"]),
        ("name", gpu.name, smi["name"], gpu.name == smi["name"]),
        ("uuid", gpu.uuid, smi["uuid"], gpu.uuid == smi["uuid"]),
        ("pci_bus_id", gpu.pci_bus_id, smi["pci.bus_id"],
         gpu.pci_bus_id == normalise_bus_id(smi["pci.bus_id"])),
        ("memory_total (MiB)", f"{mib(gpu.memory_total_bytes)}", smi["memory.total"],
         close(mib(gpu.memory_total_bytes), smi["memory.total"], 1)),
        ("memory_used (MiB)", f"{mib(gpu.memory_used_bytes)}", smi["memory.used"],
         close(mib(gpu.memory_used_bytes), smi["memory.used"], 1)),
        ("utilization (%)", f"{None if gpu.utilization is None else gpu.utilization * 100}",
         smi["utilization.gpu"], close(None if gpu.utilization is None
                                       else gpu.utilization * 100, smi["utilization.gpu"], 5)),
        ("temperature (°C)", f"{gpu.temperature_c}", smi["temperature.gpu"],
         close(gpu.temperature_c, smi["temperature.gpu"], 2)),
        ("power (W)", f"{gpu.power_w}", smi["power.draw"],
         close(gpu.power_w, smi["power.draw"], max(5.0, 0.05 * (gpu.power_w or 0)))),
        ("driver_version", f"{gpu.driver_version}", smi["driver_version"],
         gpu.driver_version == smi["driver_version"]),
        ("mig_enabled", f"{gpu.mig_enabled}", smi["mig.mode.current"],
         gpu.mig_enabled == mig),
    ]
    return rows


async def main() -> int:
    print(f"host: {platform.node()} kernel {platform.release()} python {platform.python_version()}")
    inventory = Inventory("/sys")
    try:
        gpus = await inventory.scan()
    finally:
        inventory.close()
    smi = nvidia_smi()
    ok = len(gpus) == len(smi)
    print(f"inventory GPUs: {len(gpus)}, nvidia-smi GPUs: {len(smi)}\n")
    print("| field | inventory | nvidia-smi | agrees |\n| --- | --- | --- | --- |")
    for gpu, row in zip(gpus, smi, strict=False):
        for field, ours, theirs, same in compare(gpu, row):
            ok &= same
            print(f"| {field} | {ours} | {theirs} | {'yes' if same else 'NO'} |")
        print(f"| render_node | {gpu.render_node} | (not queried) | |")
    # The v1 call's "used" includes driver-reserved memory: show why v2 is the one used.
    nvml = Pynvml()
    nvml.init()
    try:
        for i in range(nvml.device_count()):
            v1, v2 = nvml.memory(i), nvml.memory_v2(i)
            print(f"\nGPU {i}: NVML v1 used {v1.used / MiB:.0f} MiB, v2 used "
                  f"{v2.used / MiB:.0f} MiB (total v1 {v1.total / MiB:.0f}, v2 "
                  f"{v2.total / MiB:.0f} MiB)")
    finally:
        nvml.shutdown()
    print("\nPCI display functions under /sys:")
    for p in enumerate_gpus("/sys"):
        print(f"  {p.bus_id} vendor 0x{p.vendor_id:04x} class 0x{p.pci_class:06x} "
              f"driver {p.driver} card {p.card} render {p.render_node}")
    print("\nRESULT:", "all fields agree" if ok else "DISAGREEMENT")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
