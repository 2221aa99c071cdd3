"""deploy/prometheus against Debian's Prometheus: promtool accepts the files and the metrics,
a real Prometheus scrapes a running agent and scheduler, and the alert rules evaluate."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from devtools.agentproc import ROOT
from devtools.observed import exposed_names, expr_names, running_stack
from devtools.services import DockerEngine, EtcdServer, free_port, until

pytestmark = pytest.mark.docker
DEPLOY = ROOT / "deploy" / "prometheus"


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.fail("promtool missing: run scripts/install-services (Debian's prometheus)")
    return subprocess.run([tool, *args], input=stdin, capture_output=True, text=True,
                          timeout=60, check=False)


def test_promtool_accepts_the_shipped_config_and_rules() -> None:
    config = promtool("check", "config", str(DEPLOY / "prometheus.yml"))
    assert config.returncode == 0, config.stdout + config.stderr
    rules = promtool("check", "rules", str(DEPLOY / "aivmm-rules.yml"))
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert "SUCCESS: 6 rules found" in rules.stdout


def rule_exprs() -> dict[str, str]:
    doc = yaml.safe_load((DEPLOY / "aivmm-rules.yml").read_text())
    return {r["alert"]: r["expr"] for g in doc["groups"] for r in g["rules"]}


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[tuple[str, Path, Callable[[], None]]]:
    """A private Prometheus on a free loopback port; its config is written by the test."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus missing: run scripts/install-services")
    port = free_port()
    config = tmp_path / "prometheus.yml"
    log = (tmp_path / "prometheus.log").open("wb")
    holder: dict[str, Any] = {}

    def start() -> None:
        holder["proc"] = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)

    yield f"http://127.0.0.1:{port}", config, start
    proc = holder.get("proc")
    if proc is not None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    log.close()


async def query(base: str, promql: str) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as s, s.get(base + "/api/v1/query",
                                                   params={"query": promql}) as r:
        body = await r.json()
    assert body["status"] == "success", body
    return body["data"]["result"]


async def test_prometheus_scrapes_agent_and_scheduler_and_evaluates_the_rules(
        tmp_path: Path, etcd_server: EtcdServer, prefix: str, docker_engine: DockerEngine,
        sim_image: str, prometheus: Any) -> None:
    base, config, start = prometheus
    async with running_stack(tmp_path, etcd_server.url, prefix, docker_engine.host) as stack:
        agent = stack.agent_url.removeprefix("http://")
        sched = stack.scheduler_url.removeprefix("http://")
        # The shipped file with its targets swapped for this test's daemons, scraped each
        # second; the rules file is the shipped one.
        doc = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
        doc["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
        doc["rule_files"] = [str(DEPLOY / "aivmm-rules.yml")]
        for job in doc["scrape_configs"]:
            job.pop("file_sd_configs", None)
            target = agent if job["job_name"] == "aivmm-agent" else sched
            job["static_configs"] = [{"targets": [target]}]
        config.write_text(yaml.safe_dump(doc))
        start()

        async def series(promql: str, job: str) -> list[dict[str, Any]]:
            return [r for r in await query(base, promql) if r["metric"].get("job") == job]

        up_agent = await until(lambda: series('aivmm_backend_up{backend="s1"}', "aivmm-agent"),
                               60, "the agent's backend series in Prometheus", interval=0.5)
        assert up_agent[0]["value"][1] == "1"
        assert up_agent[0]["metric"]["model"] == "m1"
        temps = await until(lambda: series("aivmm_gpu_temperature_celsius", "aivmm-agent"),
                            30, "GPU temperature series", interval=0.5)
        assert float(temps[0]["value"][1]) > 0
        served = await until(
            lambda: series('aivmm_scheduler_requests_total{model="m2",status="200"}',
                           "aivmm-scheduler"), 30, "the scheduler's request counter",
            interval=0.5)
        assert served[0]["value"][1] == "1"
        assert await series("aivmm_scheduler_etcd_watch_up == 1", "aivmm-scheduler")

        async def rules_evaluated() -> list[dict[str, Any]] | None:
            async with aiohttp.ClientSession() as s, s.get(base + "/api/v1/rules") as r:
                groups = (await r.json())["data"]["groups"]
            rules = [rule for g in groups for rule in g["rules"]]
            done = all(not r.get("lastEvaluation", "0001").startswith("0001") for r in rules)
            return rules if rules and done else None
        rules = await until(rules_evaluated, 30, "every rule evaluated once", interval=0.5)
        assert {r["name"] for r in rules} == set(rule_exprs())
        assert [r["name"] for r in rules if r["health"] != "ok"] == []
        # A healthy test cluster fires nothing.
        assert [r["name"] for r in rules if r["state"] != "inactive"] == []


async def test_exposed_metrics_pass_promtool_and_rules_name_only_exposed_metrics(
        tmp_path: Path, etcd_server: EtcdServer, prefix: str, docker_engine: DockerEngine,
        sim_image: str) -> None:
    async with running_stack(tmp_path, etcd_server.url, prefix, docker_engine.host) as stack:
        texts = {"agent": await stack.metrics(stack.agent_url),
                 "scheduler": await stack.metrics(stack.scheduler_url)}
    for who, text in texts.items():
        lint = await asyncio.to_thread(promtool, "check", "metrics", stdin=text)
        assert lint.returncode == 0, f"{who}: {lint.stdout}{lint.stderr}"
    exposed = exposed_names(texts["agent"]) | exposed_names(texts["scheduler"])
    named = set()
    for alert, expr in rule_exprs().items():
        assert expr_names(expr) <= exposed, (alert, expr_names(expr) - exposed)
        named |= expr_names(expr)
    assert len(named) >= 5  # the extraction found the rules' metrics


def test_metric_name_extraction_knows_the_sample_suffixes() -> None:
    text = ("# TYPE aivmm_x_total counter\n# TYPE aivmm_h_seconds histogram\n"
            "# TYPE aivmm_g gauge\naivmm_g 1\n")
    assert exposed_names(text) == {
        "aivmm_x_total", "aivmm_x_created", "aivmm_h_seconds", "aivmm_h_seconds_bucket",
        "aivmm_h_seconds_sum", "aivmm_h_seconds_count", "aivmm_h_seconds_created", "aivmm_g"}
    assert expr_names("sum(rate(aivmm_a_total[5m])) / up{job='x'} > aivmm_b") == {
        "aivmm_a_total", "aivmm_b"}

