"""bench.hw_multi_gpu_check on its built-in NVML double: it passes on a sound machine and
fails, naming the row, when nvidia-smi and the agent disagree."""

from __future__ import annotations

import asyncio
import importlib
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODULE = "bench.hw_multi_gpu_check"


@pytest.fixture(scope="module")
def hw() -> ModuleType:
    return importlib.import_module(MODULE)


def check_script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", MODULE, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def rows(out: str, subject: str, what: str) -> list[list[str]]:
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines()
             if line.startswith("| ")]
    return [c for c in cells if c[1] == subject and c[2] == what]


def test_two_fake_gpus_pass_every_layout() -> None:
    done = check_script("--fake", "2")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "RESULT: PASS" in done.stdout
    [pair] = rows(done.stdout, "pair", "NVIDIA_VISIBLE_DEVICES")
    assert pair[4].count("GPU-") == 2 and pair[5] == "PASS"
    [auto] = rows(done.stdout, "auto-c", "placement")
    assert auto[4] == "GPUs [0]"  # the explicit [1] was served first
    assert "FAIL" not in done.stdout


def test_one_fake_gpu_refuses_the_second_backend_and_skips_two_gpu_layouts() -> None:
    done = check_script("--fake", "1")
    assert done.returncode == 0, done.stdout + done.stderr
    [second] = rows(done.stdout, "idx-1", "placement")
    assert second[4] == "refused: GPU 1 is not in this node's inventory"
    assert "scenario c: one auto x2: skipped" in done.stdout


def test_a_disagreeing_nvidia_smi_fails_the_run(hw: ModuleType,
                                                monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    fake = hw.FakeNvml(2)
    u0, u1 = fake.uuid(0), fake.uuid(1)
    # nvidia-smi numbers the two GPUs the other way round from the inventory.
    swapped = fake.smi().replace(u0, "X").replace(u1, u0).replace("X", u1)
    monkeypatch.setattr(hw.FakeNvml, "smi", lambda self: swapped)
    assert hw.main(["--fake", "2"]) == 1
    out = capsys.readouterr().out
    assert "RESULT: FAIL" in out
    [uuid] = rows(out, "GPU 1", "uuid")
    assert uuid[5] == "FAIL"
    [visible] = rows(out, "idx-1", "NVIDIA_VISIBLE_DEVICES")
    assert visible[5] == "FAIL"


def test_memory_figures_off_by_more_than_a_mib_fail(hw: ModuleType) -> None:
    fake = hw.FakeNvml(1)
    [row] = hw.parse_smi(fake.smi())
    gpus, _ = asyncio.run(hw.scan(fake))
    assert all(c.ok for c in hw.compare_inventory(gpus, [row]))
    checks = hw.compare_inventory(gpus, [{**row, "memory.used": "600"}])
    assert [c.what for c in checks if not c.ok] == ["memory.used (MiB)"]
    assert not hw.compare_inventory(gpus, [])[0].ok  # a count mismatch
