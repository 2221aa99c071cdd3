"""A sim engine as a child process on 127.0.0.1, for tests that need a real backend.

    sim = SimProcess("m1", name="a", latency_ms=5).start()
    sim.set(fail_mode="status", fail_status=503)   # live, through POST /sim/config
    sim.stop()

Knobs are those of :class:`sim.settings.SimSettings` (``node_label`` defaults to ``name``).
Also a context manager: ``with SimProcess("m") as sim: ...`` starts and stops it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from devtools.services import free_port, wait_until


class SimProcess:
    """One ``aivmm-sim`` child process; restartable on the same port."""

    def __init__(self, model: str | list[str], *, port: int | None = None, name: str = "sim",
                 **knobs: Any) -> None:
        self.models = [model] if isinstance(model, str) else list(model)
        self.port = port or free_port()
        self.name = name
        self.knobs: dict[str, Any] = {"node_label": name, **knobs}
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self._logdir = Path(tempfile.mkdtemp(prefix=f"aivmm-sim-{name}-"))
        self.log_path = self._logdir / "sim.log"

    def __enter__(self) -> SimProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def command(self) -> list[str]:
        args = [sys.executable, "-m", "sim.main", "--host", "127.0.0.1",
                "--port", str(self.port), "--log-level", "warning"]
        for m in self.models:
            args += ["--model", m]
        for key, value in self.knobs.items():
            args += ["--" + key.replace("_", "-"), str(value)]
        return args

    def start(self, timeout: float = 15) -> SimProcess:
        """Start the process and wait until ``/health`` answers (any status: a sim started
        with ``fail_mode="unhealthy"`` answers 503)."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError(f"sim {self.name} already running")
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=Path(__file__).parent.parent,
                                     env={k: v for k, v in os.environ.items()
                                          if not k.startswith("SIM_")})
        log.close()
        try:
            wait_until(self._answers, timeout, f"sim {self.name} on {self.url}")
        except BaseException:
            self.kill()
            raise
        return self

    def _answers(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"sim {self.name} exited: {self.log_tail()}")
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=1):
                return True
        except urllib.error.HTTPError:
            return True

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM and wait (SIGKILL if it does not exit within ``timeout``)."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """SIGKILL: the backend dies without a word."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        """Stop and start again on the same port, with the knobs given at construction
        plus those changed by :meth:`set` since."""
        self.stop()
        self.start()

    def set(self, **knobs: Any) -> None:
        """Change knobs live through ``POST /sim/config``; raises on a rejected change."""
        body = json.dumps({k: list(v) if isinstance(v, tuple) else v
                           for k, v in knobs.items()}).encode()
        request = urllib.request.Request(self.url + "/sim/config", data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=5) as resp:
            resp.read()
        if "models" in knobs:
            self.models = list(knobs.pop("models"))
        self.knobs.update(knobs)

    def config(self) -> dict[str, Any]:
        """The live knobs (``GET /sim/config``)."""
        with urllib.request.urlopen(self.url + "/sim/config", timeout=5) as resp:
            return json.loads(resp.read())

    def __del__(self) -> None:
        # A forgotten sim must not outlive the test run; its log goes with it.
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(Exception):
                os.killpg(self.proc.pid, signal.SIGKILL)
        shutil.rmtree(self._logdir, ignore_errors=True)
