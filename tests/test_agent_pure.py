"""The agent's small pure pieces: restart backoff, probe parsing, EWMA, container reading."""

from __future__ import annotations

from agent.backoff import RestartBackoff
from agent.docker.observed import exit_reason, observe
from agent.health.probe import Ewma, lists_model, parse_vllm_load
from common.records import BackendLoad


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_backoff_doubles_from_one_second_to_a_minute() -> None:
    b = RestartBackoff(Clock())
    assert [b.failed() for _ in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]


def test_backoff_resets_only_after_five_minutes_healthy() -> None:
    clock = Clock()
    b = RestartBackoff(clock)
    b.failed(), b.failed(), b.failed()
    b.healthy()
    clock.now += 299
    assert b.failed() == 8  # healthy for less than five minutes: keeps growing
    b.healthy()
    clock.now += 300
    b.healthy()  # a later healthy probe does not move the start of the stretch
    assert b.failed() == 1


def test_backoff_unhealthy_interrupts_the_healthy_stretch() -> None:
    clock = Clock()
    b = RestartBackoff(clock)
    b.failed()
    b.healthy()
    clock.now += 200
    b.unhealthy()
    b.healthy()
    clock.now += 200
    assert b.failed() == 2


VLLM = """# HELP vllm:num_requests_running Number of requests running.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="a"} 3.0
vllm:num_requests_running{model_name="b"} 1.0
vllm:num_requests_waiting{model_name="a"} 7.0
vllm:gpu_cache_usage_perc{model_name="a"} 0.25
vllm:gpu_cache_usage_perc{model_name="b"} 0.5
vllm:prompt_tokens_total{model_name="a"} 1234.0
"""


def test_vllm_metrics_parse_to_the_three_load_figures() -> None:
    assert parse_vllm_load(VLLM) == BackendLoad(running=4, waiting=7, kv_cache_usage=0.5)


def test_metrics_without_vllm_series_mean_no_load_figures() -> None:
    assert parse_vllm_load("process_cpu_seconds_total 1.5\n") is None
    assert parse_vllm_load("vllm:num_requests_waiting 2\n") == BackendLoad(waiting=2)


def test_models_listing_must_contain_the_model() -> None:
    assert lists_model({"data": [{"id": "x"}, {"id": "m"}]}, "m")
    assert not lists_model({"data": [{"id": "x"}]}, "m")
    assert not lists_model({"error": "nope"}, "m")


def test_ewma_starts_at_the_first_sample_and_smooths() -> None:
    e = Ewma(alpha=0.5)
    assert e.add(10) == 10
    assert e.add(20) == 15


def test_observed_container_from_inspect_data() -> None:
    attrs = {"Id": "abc", "Name": "/aivmm-n-b",
             "Config": {"Labels": {"aivmm.managed": "true", "aivmm.node": "n",
                                   "aivmm.backend": "b", "aivmm.config-hash": "h"}},
             "State": {"Running": False, "Status": "exited", "ExitCode": 137,
                       "OOMKilled": True, "FinishedAt": "t"}}
    c = observe(attrs)
    assert c is not None and c.backend == "b" and c.config_hash == "h" and not c.running
    assert exit_reason(c) == "container was killed: out of memory"
    assert observe({"Id": "x", "Config": {"Labels": {"other": "1"}}}) is None
