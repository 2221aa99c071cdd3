"""deploy/grafana/aivmm.json: every query parses as PromQL and names metrics that a running
agent and scheduler expose."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from devtools.agentproc import ROOT
from devtools.observed import exposed_names, expr_names, running_stack
from devtools.services import DockerEngine, EtcdServer

DASHBOARD = ROOT / "deploy" / "grafana" / "aivmm.json"
_LABEL_VALUES = re.compile(r"label_values\((\w+),\s*\w+\)")


def dashboard_queries() -> tuple[list[str], list[str]]:
    """The panels' PromQL expressions, and the templating queries (Grafana's own syntax)."""
    doc = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    variables = [v["query"]["query"] for v in doc["templating"]["list"]
                 if v["type"] == "query"]
    return exprs, variables


def as_promql(expr: str) -> str:
    """Grafana's variables replaced the way it does for "All"."""
    return expr.replace("$node", ".*").replace("$model", ".*")


def test_every_panel_query_is_valid_promql(tmp_path: Path) -> None:
    exprs, variables = dashboard_queries()
    assert len(exprs) >= 20
    # promtool parses rule expressions: each query becomes a recording rule.
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"aivmm:dashboard_query_{i}", "expr": as_promql(e)}
        for i, e in enumerate(exprs)]}]}
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump(rules))
    tool = shutil.which("promtool")
    if tool is None:
        pytest.fail("promtool missing: run scripts/install-services (Debian's prometheus)")
    out = subprocess.run([tool, "check", "rules", str(path)], capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert all(_LABEL_VALUES.fullmatch(v) for v in variables), variables


def test_dashboard_covers_gpus_backends_requests_latency_and_failovers() -> None:
    exprs, _ = dashboard_queries()
    named = set().union(*(expr_names(e) for e in exprs))
    for needed in ("aivmm_gpu_utilization_ratio", "aivmm_gpu_memory_used_bytes",
                   "aivmm_gpu_temperature_celsius", "aivmm_backend_up",
                   "aivmm_backend_state", "aivmm_scheduler_requests_total",
                   "aivmm_scheduler_request_duration_seconds_bucket",
                   "aivmm_scheduler_failovers_total"):
        assert needed in named, needed


@pytest.mark.docker
async def test_every_dashboard_metric_is_exposed_by_a_running_agent_or_scheduler(
        tmp_path: Path, etcd_server: EtcdServer, prefix: str, docker_engine: DockerEngine,
        sim_image: str) -> None:
    async with running_stack(tmp_path, etcd_server.url, prefix, docker_engine.host) as stack:
        exposed = (exposed_names(await stack.metrics(stack.agent_url))
                   | exposed_names(await stack.metrics(stack.scheduler_url)))
    exprs, variables = dashboard_queries()
    for expr in exprs:
        assert expr_names(expr) <= exposed, (expr, expr_names(expr) - exposed)
    for v in variables:
        match = _LABEL_VALUES.fullmatch(v)
        assert match is not None and match.group(1) in exposed, v
