"""Configuration: precedence, every kind of bad value, and the exit-2 one-liner."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import AgentConfig
from common import config
from common.config import ConfigError
from scheduler.config import SchedulerConfig


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


BACKEND = """
[[backend]]
name = "llama"
model = "meta-llama/Llama-3.1-8B-Instruct"
engine = "vllm"
port = 8001
"""


def test_defaults_without_a_file(tmp_path: Path) -> None:
    cfg = config.load(AgentConfig, tmp_path / "absent.toml", explicit=False, environ={})
    assert cfg.etcd == ["http://127.0.0.1:2379"]
    assert cfg.etcd_prefix == "/aivmm/v1"
    assert cfg.listen == "127.0.0.1:9410"
    assert cfg.sysfs_root == "/sys"
    assert cfg.node_name  # the host name
    assert cfg.backend == []


def test_a_typical_backend_is_four_lines(tmp_path: Path) -> None:
    cfg = config.load(AgentConfig, write(tmp_path, BACKEND), explicit=True, environ={})
    (b,) = cfg.backend
    assert (b.name, b.engine, b.port, b.gpus) == ("llama", "vllm", 8001, "auto")


def test_precedence_flag_over_env_over_file_over_default(tmp_path: Path) -> None:
    path = write(tmp_path, 'listen = "127.0.0.1:1111"\nlog_level = "warning"\n'
                           'etcd = ["http://file:2379"]\n')
    from_file = config.load(AgentConfig, path, explicit=True, environ={})
    assert from_file.listen == "127.0.0.1:1111"
    env = {"AIVMM_LISTEN": "127.0.0.1:2222", "AIVMM_ETCD": "http://a:1,http://b:2"}
    from_env = config.load(AgentConfig, path, explicit=True, environ=env)
    assert from_env.listen == "127.0.0.1:2222"
    assert from_env.etcd == ["http://a:1", "http://b:2"]
    from_flag = config.load(AgentConfig, path, explicit=True, environ=env,
                            flags={"listen": "127.0.0.1:3333", "etcd": None})
    assert from_flag.listen == "127.0.0.1:3333"
    assert from_flag.etcd == ["http://a:1", "http://b:2"]  # no flag: env still wins over file
    assert from_flag.log_level == "warning"  # only in the file


def test_environment_values_are_typed(tmp_path: Path) -> None:
    env = {"AIVMM_LEASE_TTL": "20", "AIVMM_HEARTBEAT_INTERVAL": "2.5",
           "AIVMM_OFFER_INTEGRATED": "true", "AIVMM_DOCKER_HOST": ""}
    cfg = config.load(AgentConfig, tmp_path / "none.toml", explicit=False, environ=env)
    assert (cfg.lease_ttl, cfg.heartbeat_interval, cfg.offer_integrated) == (20, 2.5, True)
    assert cfg.docker_host is None


def test_log_level_any_case(tmp_path: Path) -> None:
    cfg = config.load(SchedulerConfig, tmp_path / "none.toml", explicit=False, environ={},
                      flags={"log_level": "DEBUG"})
    assert cfg.log_level.lower() == "debug"


@pytest.mark.parametrize(
    ("text", "key", "expected"),
    [
        ("lease_ttl = 'ten'", "lease_ttl", "an integer"),
        ("lease_ttl = 1", "lease_ttl", "an integer >= 2"),
        ("heartbeat_interval = true", "heartbeat_interval", "a number"),
        ("heartbeat_interval = 9", "heartbeat_interval", "at most lease_ttl / 2"),
        ("models_dir = 'models'", "models_dir", "an absolute path"),
        ("listen = '9410'", "listen", "HOST:PORT"),
        ("etcd = 'http://x:2379'", "etcd", "a list of strings"),
        ("etcd = ['x:2379']", "etcd", "URLs like http://HOST:PORT"),
        ("etcd = ['http://x:port']", "etcd", "URLs like http://HOST:PORT"),
        ("etcd = ['http://x:99999']", "etcd", "port 1..65535"),
        ("etcd = ['ftp://x:2379']", "etcd", "https://HOST:PORT"),
        ("etcd = ['http://x:2379', 'https://y:2379']", "etcd", "not mixed"),
        ("etcd_prefix = 'aivmm/'", "etcd_prefix", "a path like /aivmm/v1"),
        ("log_level = 'loud'", "log_level", "one of debug, info, warning, error"),
        ("colour = 'blue'", "colour", "unknown key"),
        (BACKEND.replace('"vllm"', '"tensorrt"'), "backend[0].engine", "one of"),
        (BACKEND.replace("port = 8001", "port = 70000"), "backend[0].port", "1..65535"),
        (BACKEND.replace("port = 8001", ""), "backend[0].port", "missing"),
        (BACKEND + "gpus = [0, 'one']", "backend[0].gpus[1]", "an integer"),
        (BACKEND + "gpus = 'all'", "backend[0].gpus", "'auto'"),
        (BACKEND + "memory_limit = 'lots'", "backend[0].memory_limit", "a size"),
        (BACKEND + "env = { A = [1] }", "backend[0].env.A", "a string"),
        (BACKEND + "mystery = 1", "backend[0].mystery", "unknown key"),
        (BACKEND + BACKEND.replace("8001", "8002"), "backend", "unique backend names"),
        ("this is not toml", "-", "valid TOML"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, text: str, key: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        config.load(AgentConfig, path, explicit=True, environ={})
    err = info.value
    assert err.source == str(path)
    assert err.key == key
    assert expected in err.expected
    assert str(err).startswith(f"{path}: key '{key}': expected")


def test_bad_environment_value_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(SchedulerConfig, tmp_path / "none.toml", explicit=False,
                    environ={"AIVMM_MAX_ATTEMPTS": "many"})
    assert info.value.source == "environment AIVMM_MAX_ATTEMPTS"
    assert info.value.key == "max_attempts"


def test_bad_flag_names_the_flag(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(SchedulerConfig, tmp_path / "none.toml", explicit=False, environ={},
                    flags={"listen": "nowhere"})
    assert info.value.source == "flag --listen"


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(AgentConfig, tmp_path / "absent.toml", explicit=True, environ={})
    assert "not found" in str(info.value)


@pytest.mark.parametrize("program", ["agent.main", "scheduler.main"])
def test_daemon_exits_2_with_one_line(tmp_path: Path, program: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("max_attempts = 'x'\nlease_ttl = 'x'\n")
    proc = subprocess.run([sys.executable, "-m", program, "--config", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert str(path) in lines[0]
    assert "key '" in lines[0] and "expected" in lines[0]
    assert "Traceback" not in proc.stderr
