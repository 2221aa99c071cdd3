"""The systemd units: `systemd-analyze verify` accepts them, and both daemons speak sd_notify.

The notify test plays systemd's part: it binds the unix datagram socket that NOTIFY_SOCKET
names, sets a short WATCHDOG_USEC, starts the real daemon process and reads what it sends.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from devtools.agentproc import ROOT, Fleet
from devtools.services import DockerEngine, EtcdServer, free_port, until

UNITS = ROOT / "systemd"
BIN = Path(sys.executable).parent


def unit_lines(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment; units repeat keys, so no dict."""
    section, out = "", []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


def values(path: Path, section: str, key: str) -> list[str]:
    return [v for s, k, v in unit_lines(path) if s == section and k == key]


def analyze(unit_dir: Path) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("systemd-analyze")
    if binary is None:
        pytest.fail("systemd-analyze not found: scripts/install-services installs Debian's "
                    "systemd package")
    return subprocess.run([binary, "verify", "--man=no",
                           *sorted(str(p) for p in unit_dir.glob("*.service"))],
                          capture_output=True, text=True, timeout=60, check=False)


def installed_copy(tmp: Path, exec_dir: Path) -> Path:
    """The units as they would be installed, ExecStart pointing at ``exec_dir``'s scripts."""
    out = tmp / "units"
    out.mkdir()
    for unit in UNITS.glob("*.service"):
        text = unit.read_text().replace("/usr/local/bin/", f"{exec_dir}/")
        (out / unit.name).write_text(text)
    return out


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    result = analyze(installed_copy(tmp_path, BIN))
    # verify exits 0 on an unknown key or a misspelt section and only says so on stderr.
    assert result.returncode == 0 and result.stdout + result.stderr == "", result.stderr


def test_verify_catches_a_missing_binary(tmp_path: Path) -> None:
    result = analyze(installed_copy(tmp_path, tmp_path / "nowhere"))
    assert result.returncode != 0
    assert "aivmm-agent" in result.stderr and "not executable" in result.stderr


@pytest.mark.parametrize("unit", ["aivmm-agent.service", "aivmm-scheduler.service"])
def test_units_are_notify_services_under_a_watchdog(unit: str) -> None:
    path = UNITS / unit
    assert values(path, "Service", "Type") == ["notify"]
    assert values(path, "Service", "Restart") == ["on-failure"]
    assert values(path, "Service", "WatchdogSec")
    assert values(path, "Unit", "StartLimitBurst") and values(path, "Unit",
                                                               "StartLimitIntervalSec")
    assert values(path, "Install", "WantedBy") == ["multi-user.target"]
    assert "network-online.target" in " ".join(values(path, "Unit", "After"))
    name = unit.removesuffix(".service")
    assert values(path, "Service", "ExecStart")[0].startswith(
        f"/usr/local/bin/{name} --config /etc/aivmm/{name.removeprefix('aivmm-')}.toml")


def test_agent_unit_keeps_docker_reachable() -> None:
    path = UNITS / "aivmm-agent.service"
    assert "docker.service" in " ".join(values(path, "Unit", "After"))
    families = " ".join(values(path, "Service", "RestrictAddressFamilies")).split()
    assert {"AF_UNIX", "AF_NETLINK"} <= set(families)  # Docker socket; udev uevents
    # The GPU device nodes and the engines' /proc entries must stay visible.
    assert values(path, "Service", "PrivateDevices") in ([], ["no"])
    assert values(path, "Service", "ProtectProc") in ([], ["default"])


def test_agent_unit_lets_the_agent_write_its_default_models_dir() -> None:
    # ProtectSystem=strict makes the whole file system read-only; the agent fetches model
    # files into models_dir, so the default one must be writable.
    from agent.config import AgentConfig

    path = UNITS / "aivmm-agent.service"
    assert values(path, "Service", "ProtectSystem") == ["strict"]
    writable = [v.lstrip("-") for line in values(path, "Service", "ReadWritePaths")
                for v in line.split()]
    default = AgentConfig().models_dir
    assert any(default == w or default.startswith(w.rstrip("/") + "/") for w in writable)


def test_scheduler_unit_runs_unprivileged() -> None:
    path = UNITS / "aivmm-scheduler.service"
    assert values(path, "Service", "DynamicUser") == ["yes"]
    assert values(path, "Service", "CapabilityBoundingSet") == [""]
    assert values(path, "Service", "NoNewPrivileges") == ["yes"]


@dataclass
class NotifySocket:
    """The socket systemd would listen on; every datagram with its arrival time."""

    path: Path
    sock: socket.socket = field(init=False)
    got: list[tuple[float, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.setblocking(False)

    def drain(self) -> list[tuple[float, str]]:
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return self.got
            self.got.append((time.monotonic(), data.decode()))

    def lines(self, key: str) -> list[tuple[float, str]]:
        return [(t, line) for t, msg in self.drain() for line in msg.splitlines()
                if line.startswith(f"{key}=")]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.close()


def start_daemon(module: str, config: Path, notify: NotifySocket, log: Path,
                 watchdog_usec: int) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIVMM_")}
    env.update(NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC=str(watchdog_usec))
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", module, "--config", str(config)],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def output(log: Path) -> str:
    return log.read_text(errors="replace")


async def check_notify_protocol(proc: subprocess.Popen[bytes], notify: NotifySocket,
                                listen: str, ready_path: str, log: Path) -> list[str]:
    """READY=1 only once ``ready_path`` answers 200; watchdog pings; STOPPING=1 on SIGTERM."""
    host, _, port = listen.rpartition(":")
    try:
        async def ready_seen() -> bool:
            assert proc.poll() is None, output(log)
            return bool(notify.lines("READY"))
        await until(ready_seen, 30, "READY=1")
        # Checked at once: the daemon must already be serving, and ready, when it says so.
        async with aiohttp.ClientSession() as http, \
                http.get(f"http://{listen}{ready_path}") as resp:
            assert resp.status == 200, await resp.text()
        assert len(notify.lines("READY")) == 1
        ready_at = notify.lines("READY")[0][0]

        async def pings() -> bool:
            return len([t for t, _ in notify.lines("WATCHDOG") if t > ready_at]) >= 4
        # WATCHDOG_USEC=500000: a ping every 0.25 s, so four arrive well within 10 s.
        await until(pings, 10, "four WATCHDOG=1 after READY=1")
        statuses = [line.removeprefix("STATUS=") for _, line in notify.lines("STATUS")]
        assert statuses, "no STATUS= line"
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 30)
        assert code == 0, output(log)
        assert notify.lines("STOPPING"), "no STOPPING=1 on SIGTERM"
        with socket.socket() as probe:  # and it has stopped listening
            assert probe.connect_ex((host, int(port))) != 0
        return statuses
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.docker
async def test_agent_speaks_sd_notify(tmp_path: Path, etcd_server: EtcdServer, prefix: str,
                                      docker_engine: DockerEngine,
                                      notify: NotifySocket) -> None:
    fleet = Fleet(tmp_path, etcd_server.url, prefix, docker_engine.host)
    try:
        config = fleet.config([], log_level="info")
        listen = next(line.split("=", 1)[1].strip().strip('"')
                      for line in config.read_text().splitlines() if line.startswith("listen"))
        log = tmp_path / "agent.log"
        proc = start_daemon("agent.main", config, notify, log, watchdog_usec=500_000)
        statuses = await check_notify_protocol(proc, notify, listen, "/healthz", log)
        assert any("0/0 backends ready" in s for s in statuses), statuses
    finally:
        fleet.close()


async def test_scheduler_speaks_sd_notify(tmp_path: Path, etcd_server: EtcdServer,
                                          prefix: str, notify: NotifySocket) -> None:
    listen = f"127.0.0.1:{free_port()}"
    config = tmp_path / "scheduler.toml"
    config.write_text(f'etcd = ["{etcd_server.url}"]\netcd_prefix = "{prefix}"\n'
                      f'listen = "{listen}"\n')
    log = tmp_path / "scheduler.log"
    proc = start_daemon("scheduler.main", config, notify, log, watchdog_usec=500_000)
    # /readyz: READY=1 waits for the backend table, not just the socket.
    statuses = await check_notify_protocol(proc, notify, listen, "/readyz", log)
    assert any("backends ready" in s and "etcd connected" in s for s in statuses), statuses
