"""Engine containers locked down (docs/security.md): capabilities, pids, logs, the engine key
and models_dir."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import AgentConfig, BackendConfig
from agent.docker.spec import build_spec
from common.config import ConfigError, build
from tests.test_placement import gpu


def _spec(engine: str, key: str | None, vendor: str | None = "nvidia"):  # type: ignore[no-untyped-def]
    b = BackendConfig(name="b", model="m", engine=engine, port=8001)  # type: ignore[arg-type]
    gpus = [gpu(0, vendor)] if vendor else []  # type: ignore[arg-type]
    return build_spec("n1", b, gpus, vendor, models_dir="/srv/models",  # type: ignore[arg-type]
                      advertise_host="10.0.0.5", engine_api_key=key)


def test_every_engine_drops_capabilities_and_is_bounded() -> None:
    for engine, vendor in [("vllm", "nvidia"), ("sglang", "nvidia"), ("llamacpp", None),
                           ("sim", None)]:
        spec = _spec(engine, None, vendor)
        assert spec.cap_drop == ["ALL"] and spec.cap_add == []
        assert spec.pids_limit > 0 and spec.log_config["type"] == "json-file"
        assert "no-new-privileges" in spec.security_opt
        assert "10.0.0.5" in spec.command  # binds the advertised address only


def test_engine_key_goes_in_the_environment_never_the_command_line() -> None:
    spec = _spec("vllm", "k-123")
    assert spec.env["VLLM_API_KEY"] == "k-123"
    assert not any("k-123" in a for a in spec.command)
    assert _spec("llamacpp", "k-123", None).env["LLAMA_ARG_API_KEY"] == "k-123"
    assert _spec("sim", "k-123", None).env["SIM_API_KEY"] == "k-123"
    # A different key is a different container (the hash covers it).
    assert _spec("vllm", "k-123").config_hash != _spec("vllm", "other").config_hash


@pytest.mark.parametrize("path", ["/", "/etc", "/etc/aivmm", "/var/lib/docker/x", "/proc",
                                  "/root", "/usr/share", "/var", "/home"])
def test_system_models_dir_is_refused(path: str) -> None:
    with pytest.raises(ConfigError, match="models_dir"):
        build(AgentConfig, {"models_dir": path}, "t")


def test_models_dir_allowed(tmp_path: Path) -> None:
    assert build(AgentConfig, {"models_dir": "/srv/models"}, "t").models_dir == "/srv/models"
    key = tmp_path / "k"
    key.write_text("sekrit\n")
    c = build(AgentConfig, {"engine_api_key_file": str(key)}, "t")
    assert c.engine_api_key == "sekrit"
    with pytest.raises(ConfigError, match="engine_api_key_file"):
        build(AgentConfig, {"engine_api_key_file": str(tmp_path / "none")}, "t")
