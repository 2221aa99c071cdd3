"""The ``aivmm-scheduler`` command as an operator runs it: config errors, serve, SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest

from common.store import EtcdStore
from devtools.schedharness import publish
from devtools.services import EtcdServer, free_port, wait_until
from devtools.simproc import SimProcess

pytestmark = pytest.mark.timeout(60)


def run(*args: str, **kw: object) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "scheduler.main", *args], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)  # type: ignore[call-overload]


@pytest.mark.parametrize("toml, key", [
    ("max_attempts = 0\n", "max_attempts"),
    ('api_keys = ["sha256:nothex"]\n', "api_keys"),
    ('api_keys_file = "/nonexistent/keys"\n', "api_keys_file"),
    ("no_such_key = 1\n", "no_such_key"),
])
def test_bad_config_exits_2_with_one_line(tmp_path: Path, toml: str, key: str) -> None:
    path = tmp_path / "scheduler.toml"
    path.write_text(toml)
    proc = run("--config", str(path))
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and key in lines[0], err


def test_serves_until_sigterm(tmp_path: Path, etcd_server: EtcdServer) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# operators\nk1\n")
    path = tmp_path / "scheduler.toml"
    path.write_text(f'api_keys_file = "{keys}"\n')
    port = free_port()
    proc = run("--config", str(path), "--etcd", etcd_server.url, "--listen", f"127.0.0.1:{port}")
    try:
        def ready() -> bool:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                return r.status == 200
        wait_until(ready, 20, "scheduler ready")
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models",
                                     headers={"Authorization": "Bearer k1"})
        with urllib.request.urlopen(req, timeout=5) as r:
            assert r.status == 200
        # systemctl reload without TLS: nothing to reload, and the scheduler goes on serving.
        proc.send_signal(signal.SIGHUP)
        wait_until(ready, 5, "scheduler still serving after SIGHUP")
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]


def test_reuse_port_lets_several_processes_share_one_port(tmp_path: Path,
                                                           etcd_server: EtcdServer) -> None:
    # One process per core behind one address: the kernel spreads the connections.
    port = free_port()
    env = {**os.environ, "AIVMM_REUSE_PORT": "true"}
    args = ("--config", str(tmp_path / "none.toml"), "--etcd", etcd_server.url,
            "--listen", f"127.0.0.1:{port}")
    (tmp_path / "none.toml").write_text("")
    procs = [run(*args, env=env), run(*args, env=env)]
    try:
        def ready() -> bool:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                return r.status == 200
        wait_until(ready, 20, "a scheduler ready")
        wait_until(lambda: all(p.poll() is None for p in procs), 5, "both running")
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait(10)
        wait_until(ready, 20, "the survivor answering on the shared port")
        assert procs[1].poll() is None
        # Without the option a second process cannot bind: it says so and exits 1.
        lone = run(*args, env={k: v for k, v in os.environ.items() if k != "AIVMM_REUSE_PORT"})
        _, err = lone.communicate(timeout=30)
        assert lone.returncode == 1 and "cannot listen" in err
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            p.stdout.close()  # type: ignore[union-attr]
            p.stderr.close()  # type: ignore[union-attr]


def test_client_leaving_before_the_first_byte_stops_the_backend_work(
        tmp_path: Path, etcd_server: EtcdServer, prefix: str) -> None:
    # The real command, so its own server settings are what is tested: a client that gives
    # up must not leave the engine generating for nobody.
    async def publish_sim(sim: SimProcess) -> None:
        async with EtcdStore([etcd_server.url]) as store:
            await publish(store, prefix, sim)

    def running(sim: SimProcess) -> float:
        with urllib.request.urlopen(sim.url + "/metrics", timeout=2) as r:
            text = r.read().decode()
        return sum(float(line.rpartition(" ")[2]) for line in text.splitlines()
                   if line.startswith("vllm:num_requests_running"))

    with SimProcess(["m"], name="slow", latency_ms=20000) as sim:
        asyncio.run(publish_sim(sim))
        port = free_port()
        (tmp_path / "s.toml").write_text(f'etcd_prefix = "{prefix}"\n')
        proc = run("--config", str(tmp_path / "s.toml"), "--etcd", etcd_server.url,
                   "--listen", f"127.0.0.1:{port}")
        try:
            def has_model() -> bool:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models",
                                            timeout=1) as r:
                    return b'"m"' in r.read()
            wait_until(has_model, 20, "the scheduler to see the backend")
            body = b'{"model": "m", "prompt": "hi", "stream": true}'
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})

            def client() -> None:
                with contextlib.suppress(TimeoutError, OSError):
                    urllib.request.urlopen(req, timeout=3.0)  # gives up long before 20 s

            gives_up = threading.Thread(target=client)
            gives_up.start()
            wait_until(lambda: running(sim) == 1, 5, "the backend working on the request")
            gives_up.join(10)
            # The engine stops well before its 20 s would have ended.
            wait_until(lambda: running(sim) == 0, 8, "the backend to drop the request")
        finally:
            proc.terminate()
            proc.wait(20)
            proc.stdout.close()  # type: ignore[union-attr]
            proc.stderr.close()  # type: ignore[union-attr]
