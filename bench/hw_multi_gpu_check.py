"""Multi-GPU check on a real NVIDIA machine: inventory against nvidia-smi, then placement and
container specs for several backend layouts, all through the agent's own code.

Run from the repository root: ``python3 -m bench.hw_multi_gpu_check`` on the GPU machine
(add ``--cuda`` to also ask the CUDA driver, limited to each backend's uuids, which GPUs it
then sees), or ``python3 -m bench.hw_multi_gpu_check --fake N`` anywhere (a built-in NVML
double with N GPUs and an nvidia-smi answer made from it). Prints a Markdown table (pasted
into docs/hardware.md) and exits 1 on any mismatch.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from agent.config import AgentConfig
from agent.docker.client import device_requests
from agent.docker.spec import build_spec
from agent.inventory import Inventory
from agent.inventory.nvml import MemoryInfo, NvmlApi
from agent.inventory.pci import normalise_bus_id
from agent.placement import Placement, place
from common.config import build
from common.records import GpuRecord

SMI_FIELDS = ("index", "name", "uuid", "pci.bus_id", "memory.total", "memory.used")
SMI_COMMAND = ["nvidia-smi", f"--query-gpu={','.join(SMI_FIELDS)}",
               "--format=csv,noheader,nounits"]
MiB = 1 << 20


@dataclass(frozen=True, slots=True)
class Check:
    """One row of the result table."""

    section: str
    subject: str
    what: str
    expected: str
    got: str
    ok: bool


# -- nvidia-smi ----------------------------------------------------------------------------------


def parse_smi(text: str) -> list[dict[str, str]]:
    """Rows of ``nvidia-smi --query-gpu=... --format=csv,noheader,nounits``."""
    return [dict(zip(SMI_FIELDS, (v.strip() for v in row), strict=True))
            for row in csv.reader(io.StringIO(text)) if row]


def compare_inventory(gpus: Sequence[GpuRecord], smi: Sequence[dict[str, str]]) -> list[Check]:
    """Same count, same order, and per GPU the same uuid, bus id and memory figures."""
    checks = [Check("inventory", "node", "GPU count", str(len(smi)), str(len(gpus)),
                    len(gpus) == len(smi))]
    for gpu, row in zip(gpus, smi, strict=False):
        subject = f"GPU {row['index']}"
        checks += [
            Check("inventory", subject, "index (order)", row["index"], str(gpu.index),
                  str(gpu.index) == row["index"]),
            Check("inventory", subject, "name", row["name"], gpu.name, gpu.name == row["name"]),
            Check("inventory", subject, "uuid", row["uuid"], gpu.uuid, gpu.uuid == row["uuid"]),
            Check("inventory", subject, "pci.bus_id", row["pci.bus_id"], gpu.pci_bus_id,
                  gpu.pci_bus_id == normalise_bus_id(row["pci.bus_id"])),
            _mib_close(subject, gpu.memory_total_bytes, row, "memory.total"),
            _mib_close(subject, gpu.memory_used_bytes, row, "memory.used"),
        ]
    return checks


def _mib_close(subject: str, value: int | None, row: dict[str, str], field: str) -> Check:
    # One MiB: nvidia-smi rounds down to MiB, and the two readings are a moment apart.
    got = "null" if value is None else f"{value / MiB:.0f}"
    try:
        ok = value is not None and abs(value / MiB - float(row[field])) <= 1
    except ValueError:
        ok = False
    return Check("inventory", subject, f"{field} (MiB)", row[field], got, ok)


# -- placement and specs -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Scenario:
    """Backends as config tables, and the inventory indexes each must get (None: refused)."""

    name: str
    backends: list[dict[str, Any]]
    expected: dict[str, list[int] | None]
    min_gpus: int = 1


def _vllm(name: str, port: int, gpus: list[int] | str, count: int = 1) -> dict[str, Any]:
    return {"name": name, "model": f"org/{name}", "engine": "vllm", "port": port,
            "gpus": gpus, "gpu_count": count}


def scenarios(n: int) -> list[Scenario]:
    """The layouts to check on an ``n``-GPU node; on one GPU the second backend is refused."""
    second = [1] if n >= 2 else None
    return [
        Scenario("a: two auto x1", [_vllm("auto-a", 8001, "auto"), _vllm("auto-b", 8002, "auto")],
                 {"auto-a": [0], "auto-b": second}),
        Scenario("b: explicit [0] and [1]", [_vllm("idx-0", 8011, [0]), _vllm("idx-1", 8012, [1])],
                 {"idx-0": [0], "idx-1": second}),
        Scenario("c: one auto x2", [_vllm("pair", 8021, "auto", 2)], {"pair": [0, 1]}, 2),
        # Explicit indexes are served first, so "auto" must take the GPU left over.
        Scenario("d: auto x1 + explicit [1]",
                 [_vllm("auto-c", 8031, "auto"), _vllm("idx-1b", 8032, [1])],
                 {"auto-c": [0], "idx-1b": [1]}, 2),
    ]


def check_scenario(scenario: Scenario, gpus: Sequence[GpuRecord],
                   offerable: Sequence[GpuRecord],
                   smi: Sequence[dict[str, str]]) -> tuple[list[Check], dict[str, list[str]]]:
    """Place and build specs with the agent's code; check them against nvidia-smi's uuids.

    Returns the checks and, per placed backend, the NVIDIA_VISIBLE_DEVICES uuids it got.
    """
    sec = scenario.name
    config = build(AgentConfig, {"node_name": "hwcheck", "advertise_host": "127.0.0.1",
                                 "models_dir": "/srv/models", "backend": scenario.backends},
                   f"scenario {sec}")
    smi_uuid = {int(r["index"]): r["uuid"] for r in smi}
    placements = place(config.backend, gpus, offerable)
    checks: list[Check] = []
    visible: dict[str, list[str]] = {}
    owner: dict[str, str] = {}
    hashes: dict[str, str] = {}
    for backend in config.backend:
        want = scenario.expected[backend.name]
        p = placements[backend.name]
        if not isinstance(p, Placement):
            checks.append(Check(sec, backend.name, "placement", f"GPUs {want}"
                                if want is not None else "refused", f"refused: {p.message}",
                                want is None))
            continue
        got = [g.index for g in p.gpus]
        checks.append(Check(sec, backend.name, "placement", f"GPUs {want}", f"GPUs {got}",
                            got == want and p.vendor == "nvidia"))
        uuids = [smi_uuid.get(i, f"(no GPU {i})") for i in got]
        for uuid in uuids:
            clash = owner.setdefault(uuid, backend.name)
            if clash != backend.name:
                checks.append(Check(sec, backend.name, "disjoint", "no GPU shared",
                                    f"{uuid} also in {clash}", False))
        spec = build_spec(config.node_name, backend, p.gpus, p.vendor,
                          models_dir=config.models_dir, advertise_host=config.advertise_host,
                          node_gpus=gpus)
        hashes[backend.name] = spec.config_hash
        expect = ",".join(uuids)
        requests = device_requests(spec) or []
        request = dict(requests[0]) if len(requests) == 1 else {}
        checks += [
            Check(sec, backend.name, "NVIDIA_VISIBLE_DEVICES", expect,
                  spec.env.get("NVIDIA_VISIBLE_DEVICES", "(unset)"),
                  spec.env.get("NVIDIA_VISIBLE_DEVICES") == expect),
            Check(sec, backend.name, "device request", f"nvidia {expect} [gpu]",
                  f"{len(requests)} request(s): {request.get('Driver')} "
                  f"{','.join(request.get('DeviceIDs') or [])} {request.get('Capabilities')}",
                  len(requests) == 1 and request.get("Driver") == "nvidia"
                  and request.get("DeviceIDs") == uuids
                  and request.get("Capabilities") == [["gpu"]]),
            Check(sec, backend.name, "record gpus", expect, ",".join(spec.gpu_uuids),
                  spec.gpu_uuids == uuids),
            Check(sec, backend.name, "no raw device nodes", "[]", str(spec.devices),
                  spec.devices == []),
        ]
        visible[backend.name] = uuids
    if not any(c.what == "disjoint" for c in checks) and len(visible) > 1:
        checks.append(Check(sec, "all", "disjoint", "no GPU shared", "none shared", True))
    if len(hashes) > 1:
        checks.append(Check(sec, "all", "config hashes differ", f"{len(hashes)} distinct",
                            f"{len(set(hashes.values()))} distinct",
                            len(set(hashes.values())) == len(hashes)))
    return checks, visible


# -- CUDA, limited as the container toolkit limits a container ----------------------------------

_CUDA_PROBE = r"""
import ctypes, json
cuda = ctypes.CDLL("libcuda.so.1")
def ok(rc, what):
    if rc != 0:
        raise SystemExit(json.dumps({"error": f"{what} returned {rc}"}))
ok(cuda.cuInit(0), "cuInit")
count = ctypes.c_int()
ok(cuda.cuDeviceGetCount(ctypes.byref(count)), "cuDeviceGetCount")
seen = []
for i in range(count.value):
    dev = ctypes.c_int()
    ok(cuda.cuDeviceGet(ctypes.byref(dev), i), "cuDeviceGet")
    bus = ctypes.create_string_buffer(64)
    ok(cuda.cuDeviceGetPCIBusId(bus, 64, dev), "cuDeviceGetPCIBusId")
    raw = (ctypes.c_ubyte * 16)()
    ok(cuda.cuDeviceGetUuid(raw, dev), "cuDeviceGetUuid")
    h = bytes(raw).hex()
    seen.append({"uuid": f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}",
                 "bus": bus.value.decode()})
print(json.dumps({"devices": seen}))
"""


def cuda_view(uuids: Sequence[str]) -> dict[str, Any]:
    """What a process limited to ``uuids`` (CUDA_VISIBLE_DEVICES) sees through the driver."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(uuids)}
    out = subprocess.run([sys.executable, "-c", _CUDA_PROBE], env=env, capture_output=True,
                         text=True, timeout=60)
    try:
        return dict(json.loads(out.stdout.strip().splitlines()[-1]))
    except (ValueError, IndexError):
        return {"error": (out.stderr or out.stdout).strip()[-200:] or f"exit {out.returncode}"}


def check_cuda(backend: str, uuids: Sequence[str], gpus: Sequence[GpuRecord]) -> Check:
    """The GPUs CUDA enumerates under the backend's uuids: exactly those, in that order."""
    by_uuid = {g.uuid: g for g in gpus}
    expect = [(u, by_uuid[u].pci_bus_id if u in by_uuid else "?") for u in uuids]
    view = cuda_view(uuids)
    if "error" in view:
        return Check("cuda", backend, "devices seen", str(len(expect)), view["error"], False)
    got = [(d["uuid"], normalise_bus_id(d["bus"])) for d in view["devices"]]
    return Check("cuda", backend, "devices seen (uuid, bus)",
                 "; ".join(f"{u} {b}" for u, b in expect),
                 "; ".join(f"{u} {b}" for u, b in got), got == expect)


# -- a stand-in machine for --fake ---------------------------------------------------------------


class FakeNvml:
    """Just enough NVML for N idle H200s; its nvidia-smi answer is made from the same data."""

    def __init__(self, n: int) -> None:
        self.n = n

    def uuid(self, i: int) -> str:
        return f"GPU-{i:08x}-0000-4000-8000-0000000000{i:02x}"

    def pci_bus_id(self, i: int) -> str:
        return f"00000000:{0x18 + i:02X}:00.0"

    def memory(self, i: int) -> MemoryInfo:
        return MemoryInfo(total=143771 * MiB, used=(i % 3) * MiB)

    memory_v2 = memory

    def smi(self) -> str:
        return "".join(f"{i}, NVIDIA H200, {self.uuid(i)}, {self.pci_bus_id(i)}, 143771, "
                       f"{i % 3}\n" for i in range(self.n))

    def init(self) -> None: ...
    def shutdown(self) -> None: ...
    def driver_version(self) -> str: return "580.159.04"
    def device_count(self) -> int: return self.n
    def name(self, i: int) -> str: return "NVIDIA H200"
    def utilization_percent(self, i: int) -> int: return 0
    def temperature_c(self, i: int) -> int: return 30
    def power_mw(self, i: int) -> int: return 80000
    def mig_mode(self, i: int) -> int: return 0


# -- the run -------------------------------------------------------------------------------------


def table(checks: Sequence[Check]) -> str:
    lines = ["| section | subject | check | expected | got | result |",
             "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {c.section} | {c.subject} | {c.what} | {c.expected} | {c.got} | "
              f"{'PASS' if c.ok else 'FAIL'} |" for c in checks]
    return "\n".join(lines)


async def scan(nvml: NvmlApi | None) -> tuple[list[GpuRecord], list[GpuRecord]]:
    """The inventory's GPUs and the offerable ones, from the machine or from ``nvml``."""
    with tempfile.TemporaryDirectory() as empty_sys:
        # A fake machine has no sysfs GPUs either: an empty tree keeps the host's out.
        inventory = Inventory(empty_sys if nvml is not None else "/sys", nvml)
        try:
            gpus = await inventory.scan()
        finally:
            inventory.close()
        return gpus, inventory.offerable(gpus)


def run(fake: int | None, cuda: bool) -> int:
    """Scan, compare, place, check; print the table; 0 when every row passes."""
    print(f"host: {platform.node()} kernel {platform.release()} "
          f"python {platform.python_version()}" + (f" (fake: {fake} GPUs)" if fake else ""))
    nvml = FakeNvml(fake) if fake is not None else None
    gpus, offerable = asyncio.run(scan(nvml))
    if nvml is not None:
        smi_text = nvml.smi()
    else:
        smi_text = subprocess.run(SMI_COMMAND, check=True, capture_output=True,
                                  text=True).stdout
    print(f"$ {' '.join(SMI_COMMAND)}\n{smi_text}")
    smi = parse_smi(smi_text)
    checks = compare_inventory(gpus, smi)
    visible: dict[str, list[str]] = {}
    for scenario in scenarios(len(gpus)):
        if len(gpus) < scenario.min_gpus:
            print(f"scenario {scenario.name}: skipped, needs {scenario.min_gpus} GPUs")
            continue
        rows, seen = check_scenario(scenario, gpus, offerable, smi)
        checks += rows
        visible.update(seen)
    if cuda:
        for key in sorted({tuple(u) for u in visible.values()}):
            names = ", ".join(b for b, u in visible.items() if tuple(u) == key)
            checks.append(check_cuda(names, key, gpus))
    print(table(checks))
    failed = sum(not c.ok for c in checks)
    print(f"\nRESULT: {'PASS' if not failed else 'FAIL'} ({len(checks) - failed}/{len(checks)} "
          f"checks pass, {len(gpus)} GPUs)")
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fake", type=int, metavar="N",
                        help="use a built-in NVML double with N GPUs instead of the machine's")
    parser.add_argument("--cuda", action="store_true",
                        help="also enumerate each backend's GPUs through the CUDA driver")
    args = parser.parse_args(argv)
    if args.fake is not None and args.cuda:
        parser.error("--cuda needs the real machine")
    return run(args.fake, args.cuda)


if __name__ == "__main__":
    sys.exit(main())
