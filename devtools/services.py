"""Real services for the tests and the demo: an etcd server and a Docker engine, on loopback only.

Each is started as a child process in its own session (so the test holds the real pid and
can SIGKILL or SIGSTOP it), on a free 127.0.0.1 port or a private unix socket, with
temporary data directories, and is stopped when the test session ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


class ServiceError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], object], timeout: float, what: str,
               interval: float = 0.05) -> object:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            result = predicate()
            if result:
                return result
        except Exception as err:  # the condition may raise until it holds
            last_error = err
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}"
                               + (f" (last error: {last_error!r})" if last_error else ""))
        time.sleep(interval)


async def until(predicate: Callable[[], Awaitable[T] | T], within: float = 10.0,
                what: str = "condition", interval: float = 0.05) -> T:
    """Await a sync or async ``predicate`` until it returns something truthy, else fail.

    An exception from the predicate counts as "not yet" (the condition may raise until it
    holds); the last one is named in the timeout error.
    """
    deadline = time.monotonic() + within
    last_error: Exception | None = None
    while True:
        try:
            result = predicate()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return result  # type: ignore[return-value]
        except Exception as err:
            last_error = err
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {within}s waiting for {what}"
                               + (f" (last error: {last_error!r})" if last_error else ""))
        await asyncio.sleep(interval)


async def holds(predicate: Callable[[], Awaitable[object] | object], during: float,
                what: str = "condition", interval: float = 0.02) -> None:
    """Check a sync or async ``predicate`` every ``interval`` for ``during`` seconds; fail the
    first time it is false. For what must stay true while time deliberately passes (a standby
    that must not take over), where one look at the end would miss a moment it did not hold."""
    deadline = time.monotonic() + during
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if not result:
            raise AssertionError(f"{what} stopped holding")
        if time.monotonic() > deadline:
            return
        await asyncio.sleep(interval)


@dataclass(frozen=True, slots=True)
class EtcdTls:
    """A TLS etcd: its server certificate and key, and the CA whose client certificates it
    demands (--client-cert-auth); ``client`` is a certificate and key to check its health."""

    ca: Path
    cert: Path
    key: Path
    client_cert: Path
    client_key: Path

    def args(self) -> tuple[str, ...]:
        return ("--cert-file", str(self.cert), "--key-file", str(self.key),
                "--trusted-ca-file", str(self.ca), "--client-cert-auth")


def etcd_answers(url: str, tls: EtcdTls | None = None) -> bool:
    """True when the etcd at ``url`` reports itself healthy."""
    context = None
    if tls is not None:
        context = ssl.create_default_context(cafile=str(tls.ca))
        context.load_cert_chain(str(tls.client_cert), str(tls.client_key))
    with urllib.request.urlopen(url + "/health", timeout=1, context=context) as resp:
        return b'"true"' in resp.read()


def docker_answers(socket_path: str) -> bool:
    """True when a Docker engine answers ``/_ping`` on the unix socket."""
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.settimeout(2)
        sock.connect(socket_path)
        sock.sendall(b"GET /_ping HTTP/1.0\r\n\r\n")
        return sock.recv(64).split(b" ", 2)[1:2] == [b"200"]
    except OSError:
        return False
    finally:
        sock.close()


def _need(binary: str, package: str) -> str:
    path = shutil.which(binary) or (f"/usr/sbin/{binary}" if os.path.exists(
        f"/usr/sbin/{binary}") else None)
    if path is None:
        raise ServiceError(
            f"{binary} not found: install Debian's {package} (make test does it as root: "
            f"scripts/install-services)")
    return path


class EtcdServer:
    """One etcd member on 127.0.0.1 with its own data dir; restartable on the same port."""

    def __init__(self, workdir: Path | None = None, port: int | None = None,
                 peer_port: int | None = None, *, tls: EtcdTls | None = None,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.binary = _need("etcd", "etcd-server")
        self.tls = tls
        self.extra_args = extra_args
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="aivmm-etcd-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.peer_port = peer_port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> None:
        peer = f"http://127.0.0.1:{self.peer_port}"
        log = (self.workdir / "etcd.log").open("ab")
        self.proc = subprocess.Popen(
            [
                self.binary, "--name", "test", "--data-dir", str(self.workdir / "data"),
                "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"test={peer}", "--log-level", "warn",
                *(self.tls.args() if self.tls else ()), *self.extra_args,
            ],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "ETCD_UNSUPPORTED_ARCH": os.uname().machine},
        )
        log.close()
        wait_until(self.healthy, timeout, f"etcd on {self.url}")

    def healthy(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise ServiceError(f"etcd exited; see {self.workdir / 'etcd.log'}")
        return etcd_answers(self.url, self.tls)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


class DockerEngine:
    """A private dockerd: own socket, data and exec roots; no bridge, no iptables."""

    def __init__(self, workdir: Path | None = None) -> None:
        self.binary = _need("dockerd", "docker.io")
        if os.geteuid() != 0:
            raise ServiceError("the Docker engine for the tests must be started as root")
        # Unix socket paths are limited to 107 bytes: keep the root short.
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="aivmm-dk-", dir="/tmp"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"unix://{self.workdir}/docker.sock"

    def start(self, timeout: float = 60.0) -> None:
        log = (self.workdir / "dockerd.log").open("ab")
        self.proc = subprocess.Popen(
            [
                self.binary, "--bridge=none", "--iptables=false", "--ip-masq=false",
                "--data-root", str(self.workdir / "data"),
                "--exec-root", str(self.workdir / "exec"),
                "--pidfile", str(self.workdir / "docker.pid"),
                "--host", self.host,
                # A private containerd per engine: never share the host's.
                "--containerd-namespace", f"aivmm-{os.getpid()}",
            ],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        wait_until(self.healthy, timeout, f"dockerd on {self.host}", interval=0.2)

    def healthy(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise ServiceError(f"dockerd exited; see {self.workdir / 'dockerd.log'}")
        return docker_answers(str(self.workdir / "docker.sock"))

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        # Containers' mounts under the data root must go before the tree can be removed.
        subprocess.run(["sh", "-c", f"grep -o ' {self.workdir}[^ ]*' /proc/mounts | sort -r |"
                        " xargs -r -n1 umount -l"], check=False, capture_output=True)
        shutil.rmtree(self.workdir, ignore_errors=True)
