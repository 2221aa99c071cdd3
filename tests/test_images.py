"""Container images and docker/compose.yaml.

The agent and scheduler images are built FROM scratch here (no registry) and run against
the test etcd and Docker engine; the vendor images and compose.yaml cannot be pulled here,
so they are parsed and checked against the rules in ``dockerfile_problems``.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from typing import Any

import docker
import pytest
import yaml

from agent.config import AgentConfig
from agent.engines import DOCKERFILES as ENGINE_DOCKERFILES
from agent.engines import PROFILES
from common.config import load
from devtools.agentproc import ROOT
from devtools.services import DockerEngine, EtcdServer, free_port, wait_until
from scheduler.config import SchedulerConfig

DOCKER_DIR = ROOT / "docker"
DOCKERFILES = sorted(DOCKER_DIR.glob("*/Dockerfile"))
LOCAL_IMAGES = {"aivmm-agent:local", "aivmm-scheduler:local"}
PINNED = re.compile(r"^[a-z0-9][a-z0-9./_-]*:(?!latest$)[A-Za-z0-9_][A-Za-z0-9._-]*$")


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def dockerfile_problems(text: str) -> list[str]:
    """The house rules (hadolint is not available here): what is wrong with one Dockerfile."""
    steps = instructions(text)
    problems = []
    bases = [args.split()[0] for word, args in steps if word == "FROM"]
    if not bases:
        problems.append("no FROM")
    problems += [f"FROM {b}: not a pinned tag" for b in bases
                 if b != "scratch" and not PINNED.match(b)]
    problems += [f"ADD {args}: fetches a URL; use a checked download in RUN"
                 for word, args in steps if word == "ADD" and "://" in args]
    if not any(word == "HEALTHCHECK" for word, _ in steps):
        problems.append("no HEALTHCHECK")
    # Root must be a decision written down, not an accident.
    if not any(word == "USER" for word, _ in steps) and "# root:" not in text:
        problems.append("no USER and no '# root:' comment saying why")
    for word, args in steps:
        if word in ("ENTRYPOINT", "CMD") or (word == "HEALTHCHECK" and " CMD " in f" {args}"):
            exec_form = args.split("CMD", 1)[1].strip() if word == "HEALTHCHECK" else args
            try:
                json.loads(exec_form)
            except ValueError:
                problems.append(f"{word}: not in exec (JSON) form")
    return problems


def test_dockerfile_rules_catch_what_they_should() -> None:
    bad = "FROM python:latest\nADD https://example.org/x.tgz /x\nCMD python -m x\n"
    assert dockerfile_problems(bad) == [
        "FROM python:latest: not a pinned tag",
        "ADD https://example.org/x.tgz /x: fetches a URL; use a checked download in RUN",
        "no HEALTHCHECK", "no USER and no '# root:' comment saying why",
        "CMD: not in exec (JSON) form"]


def test_every_image_has_a_dockerfile_that_keeps_the_rules() -> None:
    names = {p.parent.name for p in DOCKERFILES}
    assert names == {*ENGINE_DOCKERFILES, "agent", "scheduler"}
    for path in DOCKERFILES:
        assert dockerfile_problems(path.read_text()) == [], path


def test_every_profile_and_its_dockerfile_are_in_step() -> None:
    # Both ways: each profile with an upstream image has a docker/<folder>/Dockerfile built
    # FROM that very tag (pinned, never :latest), and each engine folder names a profile.
    upstream = {key for key, p in PROFILES.items() if p.image and not p.image.startswith("aivmm-")}
    assert set(ENGINE_DOCKERFILES.values()) == upstream
    for folder, key in ENGINE_DOCKERFILES.items():
        steps = instructions((DOCKER_DIR / folder / "Dockerfile").read_text())
        (base,) = [args.split()[0] for word, args in steps if word == "FROM"]
        image = PROFILES[key].image
        assert image == base, (folder, image, base)
        assert PINNED.match(base), (folder, base)
        labels = " ".join(args for word, args in steps if word == "LABEL")
        assert f"aivmm.engine={key[0]}" in labels, folder
        assert f"aivmm.vendor={key[1] or 'none'}" in labels, folder
        # The image's own entrypoint is the one the profile relies on (or replaces).
        entry = json.loads(next(args for word, args in steps if word == "ENTRYPOINT"))
        assert PROFILES[key].entrypoint in (None, entry), (folder, entry)


def test_engine_images_mount_models_and_serve_the_ports_the_agent_expects() -> None:
    for name, (engine, _) in ENGINE_DOCKERFILES.items():
        steps = instructions((DOCKER_DIR / name / "Dockerfile").read_text())
        assert ("VOLUME", '["/models"]') in steps, name
        if engine in ("vllm", "sglang", "openvino"):
            env = " ".join(args for word, args in steps if word == "ENV")
            assert "HF_HUB_OFFLINE=1" in env, name  # weights only from /models
        health = next(args for word, args in steps if word == "HEALTHCHECK")
        path = PROFILES[ENGINE_DOCKERFILES[name]].health_path
        assert path in health, (name, path)


def test_app_dockerfiles_copy_what_exists() -> None:
    for name in ("agent", "scheduler"):
        for word, args in instructions((DOCKER_DIR / name / "Dockerfile").read_text()):
            if word == "COPY":
                for source in args.split()[:-1]:
                    assert (ROOT / source).exists(), f"{name}: COPY {source}"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((DOCKER_DIR / "compose.yaml").read_text())


def test_compose_services_and_images(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"etcd", "scheduler", "agent", "prometheus"}
    for name, svc in services.items():
        image = svc["image"]
        if image in LOCAL_IMAGES:
            build = svc["build"]
            assert (DOCKER_DIR / build["context"] / build["dockerfile"]).is_file(), name
        else:
            assert PINNED.match(image), f"{name}: {image} is not a pinned upstream tag"
        assert svc["network_mode"] == "host", name
        assert "ports" not in svc, f"{name}: ports mean nothing on the host network"
        for dep in svc.get("depends_on", []):
            assert dep in services


def test_compose_volumes_name_real_files(compose: dict[str, Any]) -> None:
    named = set(compose.get("volumes") or {})
    for name, svc in compose["services"].items():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DOCKER_DIR / source).exists(), f"{name}: {source} does not exist"
            elif not source.startswith("/"):
                assert source in named, f"{name}: volume {source} is not declared"
    prometheus = compose["services"]["prometheus"]
    config = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    mount = next(v for v in prometheus["volumes"] if v.startswith("../deploy/prometheus:"))
    inside = mount.split(":")[1]
    assert config == f"--config.file={inside}/prometheus.yml"
    assert (DOCKER_DIR / "../deploy/prometheus/prometheus.yml").is_file()


def test_compose_agent_config_is_a_valid_agent_config(compose: dict[str, Any]) -> None:
    agent = compose["services"]["agent"]
    env = {k: str(v) for k, v in agent["environment"].items()}
    mount = next(v for v in agent["volumes"] if v.endswith(":/etc/aivmm/agent.toml:ro"))
    # The agent's own loader: unknown keys and bad values fail, and name themselves.
    config = load(AgentConfig, DOCKER_DIR / mount.split(":")[0], explicit=True, environ=env)
    assert config.sysfs_root == "/host/sys"
    assert "/sys:/host/sys:ro" in agent["volumes"]
    assert "/var/run/docker.sock:/var/run/docker.sock" in agent["volumes"]
    assert config.docker_host in (None, "unix:///var/run/docker.sock")
    assert [b.name for b in config.backend]
    scheduler = compose["services"]["scheduler"]
    sched = load(SchedulerConfig, "/nonexistent/scheduler.toml", explicit=False,
                 environ={k: str(v) for k, v in scheduler["environment"].items()})
    assert sched.etcd == config.etcd == ["http://127.0.0.1:2379"]


# --- the images built here --------------------------------------------------------------


@pytest.fixture(scope="module")
def app_images(docker_engine: DockerEngine) -> dict[str, str]:
    """aivmm-agent:local and aivmm-scheduler:local, built once for this module."""
    from devtools.images import build

    return {name: build(docker_engine.host, name, quiet=True) for name in ("agent", "scheduler")}


@pytest.fixture
def client(docker_engine: DockerEngine) -> Iterator[docker.DockerClient]:
    c = docker.DockerClient(base_url=docker_engine.host, version="auto")
    yield c
    c.close()


def http_status(url: str) -> int | None:
    import urllib.error
    import urllib.request
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return None


def run_container(client: docker.DockerClient, image: str, **kw: Any) -> Any:
    return client.containers.run(image, detach=True, network_mode="host",
                                 labels={"aivmm.test": "images"}, **kw)


def health_command(client: docker.DockerClient, image: str) -> list[str]:
    test = client.images.get(image).attrs["Config"]["Healthcheck"]["Test"]
    assert test[0] == "CMD"
    return test[1:]


@pytest.mark.docker
def test_scheduler_image_serves(app_images: dict[str, str], client: docker.DockerClient,
                                etcd_server: EtcdServer, prefix: str) -> None:
    image = app_images["scheduler"]
    assert client.images.get("aivmm-scheduler:local").id == client.images.get(image).id
    port = free_port()
    container = run_container(client, image, environment={
        "AIVMM_ETCD": etcd_server.url, "AIVMM_ETCD_PREFIX": prefix,
        "AIVMM_LISTEN": f"127.0.0.1:{port}"})
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: http_status(base + "/readyz") == 200, 30,
                   "the scheduler container's /readyz")
        assert http_status(base + "/healthz") == 200
        assert container.attrs["Config"]["User"] == "65532:65532"
        code, out = container.exec_run(health_command(client, image))
        assert code == 0, out
    finally:
        logs = container.logs().decode(errors="replace")
        container.remove(force=True)
    assert "Traceback" not in logs, logs


@pytest.mark.docker
def test_agent_image_serves_and_heartbeats(app_images: dict[str, str],
                                           client: docker.DockerClient,
                                           docker_engine: DockerEngine,
                                           etcd_server: EtcdServer, prefix: str) -> None:
    image = app_images["agent"]
    port = free_port()
    node = f"img{int(time.time() * 1000) % 10**8}"
    socket_path = docker_engine.host.removeprefix("unix://")
    container = run_container(
        client, image,
        environment={"AIVMM_ETCD": etcd_server.url, "AIVMM_ETCD_PREFIX": prefix,
                     "AIVMM_LISTEN": f"127.0.0.1:{port}", "AIVMM_NODE_NAME": node,
                     "AIVMM_SYSFS_ROOT": "/host/sys",
                     "AIVMM_DOCKER_HOST": "unix:///var/run/docker.sock"},
        volumes={socket_path: {"bind": "/var/run/docker.sock", "mode": "rw"},
                 "/sys": {"bind": "/host/sys", "mode": "ro"}})
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: http_status(base + "/healthz") == 200, 30,
                   "the agent container's /healthz")
        import urllib.request
        def state() -> dict[str, Any]:
            with urllib.request.urlopen(base + "/v1/state", timeout=2) as resp:
                return json.loads(resp.read())
        wait_until(lambda: state()["etcd_connected"], 20, "the agent to reach etcd")
        assert state()["node"] == node
        code, out = container.exec_run(health_command(client, image))
        assert code == 0, out
    finally:
        logs = container.logs().decode(errors="replace")
        container.remove(force=True)
    assert "Traceback" not in logs, logs
