"""Each benchmark still runs end to end at a tiny size (figures are not checked: benchmarks
print them, docs/benchmarks.md keeps them)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def bench(module: str, *args: str, timeout: float = 120) -> str:
    proc = subprocess.run([sys.executable, "-m", f"bench.{module}", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_fleet_bench_runs_small() -> None:
    out = bench("fleet", "--nodes", "5", "--gpus", "2", "--duration", "1", "--interval",
                "0.5", "--ttl", "2", "--decisions", "1000", "--probes", "5")
    assert "| Router.choose p50 / p99 (" in out
    assert "5 nodes, 20 backends" in out


def test_throughput_bench_runs_small() -> None:
    out = bench("throughput", "--concurrency", "8", "--requests", "50", "--max-procs", "1")
    assert "| 1 scheduler process | stream |" in out


def test_container_bench_runs_small() -> None:
    out = bench("containers", "--rounds", "1", "--requests", "20", "--concurrency", "4")
    assert "| container, host network |" in out


def test_failover_bench_runs_small() -> None:
    out = bench("failover", "--kills", "1", "--backends", "1", "--ttls", "3", "--reps", "1",
                timeout=180)
    assert "| total |" in out
    assert "| 3 |" in out


def test_placement_bench_runs_small() -> None:
    out = bench("placement", "--nodes", "5", "--gpus", "2", "--replicas", "6",
                "--deployments", "2", "--repeat", "1")
    assert "| place() from scratch |" in out


def test_deployments_bench_runs_small() -> None:
    out = bench("deployments", "--nodes", "5", "--gpus", "2", "--replicas", "6",
                "--deployments", "2", "--interval", "0.5", "--node-ttl", "2",
                "--placer-ttl", "2", "--steady", "1", "--failover-replicas", "2")
    assert "| **deploy → all assigned in etcd**" in out
    assert "5 nodes x 2 GPUs" in out


def test_decision_bench_runs_small() -> None:
    out = bench("decision", "--models", "2", "--per-model", "20", "--decisions", "200")
    assert "40 backends (2 models x 20)" in out
    assert "| pool of 6 weighed in full, prefix hint |" in out
