"""`make demo` / `make down`: a whole aivmm cluster on this machine, and real requests through it.

``up`` starts (or reuses) etcd and a Docker engine, builds the sim image, starts two agents as
two nodes (``demo-a`` and ``demo-b``, each running one sim backend of the same model with a
different latency; ``demo-a`` reports two AMD GPUs and ``demo-b`` an Intel Arc from fake sysfs
trees, see docs/cluster.md) and one scheduler, waits until both backends are ready, then
sends a chat completion and a streamed one through the scheduler with the ``openai`` package,
and shows ``aivmmctl status``. The cluster keeps running; ``down`` stops everything ``up``
started and removes its containers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from devtools.gpu_trees import SysfsTree
from devtools.services import DockerEngine, EtcdServer, docker_answers, etcd_answers, wait_until

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / ".run" / "demo"
STATE = RUN / "state.json"
# Unix socket paths are short-limited; keep the demo's engine out of deep checkouts.
DOCKER_DIR = Path("/tmp/aivmm-demo-docker")
SYSTEM_DOCKER = "/var/run/docker.sock"
ETCD_PORT, ETCD_PEER_PORT = 23790, 23800
SCHEDULER = "127.0.0.1:8080"
MODEL = "demo-model"
NODES = {  # node -> (agent listen port, backend port, sim time to first token in ms)
    "demo-a": (9411, 8101, 20),
    "demo-b": (9412, 8102, 80),
}


def fake_gpus(node: str, root: Path) -> None:
    """The node's GPUs as sysfs shows them: demo-a two Radeon RX 7900 XTX, demo-b an Arc A770.

    The agents inventory these like real ones; the sim backends use none of them.
    """
    shutil.rmtree(root, ignore_errors=True)
    tree = SysfsTree(root)
    if node == "demo-a":
        tree.add_amdgpu("0000:03:00.0", unique_id="0x2c2c2cf05f6b5a1e")
        tree.add_amdgpu("0000:43:00.0", unique_id="0x7a1e0c22d40b9e31")
        tree.module_version("amdgpu", "6.10.5")
    else:
        tree.add_i915_arc("0000:04:00.0")


def say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


def load_state() -> dict[str, Any]:
    return orjson.loads(STATE.read_bytes()) if STATE.exists() else {}


def save_state(state: dict[str, Any]) -> None:
    RUN.mkdir(parents=True, exist_ok=True)
    STATE.write_bytes(orjson.dumps(state, option=orjson.OPT_INDENT_2))


def alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def terminate(pid: int | None, timeout: float = 20.0) -> None:
    if not alive(pid):
        return
    assert pid is not None
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    with contextlib.suppress(TimeoutError):
        wait_until(lambda: not alive(pid) or _reap(pid), timeout, f"pid {pid} to exit")
    if alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _reap(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == pid
    return False


def spawn(name: str, args: list[str]) -> int:
    """Start a daemon detached from this process (it outlives `make demo`)."""
    log = (RUN / f"{name}.log").open("ab")
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    log.close()
    return proc.pid


def ensure_etcd(state: dict[str, Any]) -> str:
    url = f"http://127.0.0.1:{ETCD_PORT}"
    with contextlib.suppress(OSError):
        if etcd_answers(url):
            say(f"etcd already running at {url}")
            return url
    server = EtcdServer(RUN / "etcd", port=ETCD_PORT, peer_port=ETCD_PEER_PORT)
    server.start()
    assert server.proc is not None
    state["etcd_pid"] = server.proc.pid
    say(f"etcd started at {url} (data in {server.workdir})")
    return url


def ensure_docker(state: dict[str, Any]) -> str:
    if docker_answers(SYSTEM_DOCKER):
        say(f"using the running Docker engine at {SYSTEM_DOCKER}")
        return f"unix://{SYSTEM_DOCKER}"
    sock = DOCKER_DIR / "docker.sock"
    if docker_answers(str(sock)):
        say(f"Docker engine already running at {sock}")
        return f"unix://{sock}"
    engine = DockerEngine(DOCKER_DIR)
    engine.start()
    assert engine.proc is not None
    state["dockerd_pid"] = engine.proc.pid
    say(f"Docker engine started at {engine.host} (bridge off, iptables off)")
    return engine.host


def agent_config(node: str, etcd: str, docker_host: str) -> Path:
    listen, port, latency = NODES[node]
    sysfs = RUN / node / "sys"
    fake_gpus(node, sysfs)
    models = RUN / "models"
    models.mkdir(parents=True, exist_ok=True)
    path = RUN / f"{node}.toml"
    path.write_text(f"""\
node_name = "{node}"
etcd = ["{etcd}"]
listen = "127.0.0.1:{listen}"
advertise_host = "127.0.0.1"
heartbeat_interval = 2.0
lease_ttl = 6
docker_host = "{docker_host}"
models_dir = "{models}"
sysfs_root = "{sysfs}"

[[backend]]
name = "sim"
model = "{MODEL}"
engine = "sim"
gpus = []  # the sim computes nothing: it leaves the node's GPUs to real engines
port = {port}
env = {{ SIM_LATENCY_MS = "{latency}", SIM_TOKENS_PER_SECOND = "200", SIM_NAME = "{node}" }}
""")
    return path


async def wait_ready(etcd: str, count: int, within: float) -> list[Any]:
    from ctl.main import fetch

    deadline = time.monotonic() + within
    last = ""
    while True:
        view = await fetch([etcd], "/aivmm/v1", 3.0)
        ready = [b for b in view["backends"] if b.state == "ready" and MODEL in b.models]
        states = ", ".join(f"{b.node}/{b.name}={b.state}" for b in view["backends"]) or "none"
        if states != last:
            say(f"backends: {states}")
            last = states
        if len(ready) >= count:
            return ready
        if time.monotonic() > deadline:
            raise TimeoutError(f"backends not ready after {within:.0f}s; see {RUN}/*.log")
        await asyncio.sleep(0.5)


def talk() -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"http://{SCHEDULER}/v1", api_key="demo", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hello to the fleet."}],
        max_tokens=16)
    answer = raw.parse()
    say(f"chat answer: {answer.choices[0].message.content!r}")
    say(f"  served by {raw.headers.get('x-aivmm-backend')}, usage {answer.usage}")
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "Stream me a few words."}],
        max_tokens=16, stream=True)
    chunks = [c.choices[0].delta.content or "" for c in raw.parse() if c.choices]
    say(f"streamed answer ({len(chunks)} chunks): {''.join(chunks)!r}")
    say(f"  served by {raw.headers.get('x-aivmm-backend')}")


def up() -> None:
    RUN.mkdir(parents=True, exist_ok=True)
    state = load_state()
    etcd = ensure_etcd(state)
    docker_host = ensure_docker(state)
    save_state(state)

    from devtools.image import build_image

    image = build_image(docker_host)
    say(f"sim image {image}")

    # Restarting the daemons on a second `make demo` shows adoption: the backends keep running.
    for name in ["scheduler", *NODES]:
        terminate(state.get(f"{name}_pid"))
    for node in NODES:
        cfg = agent_config(node, etcd, docker_host)
        state[f"{node}_pid"] = spawn(node, ["-m", "agent.main", "--config", str(cfg)])
        state[f"{node}_config"] = str(cfg)
        say(f"agent {node} started (config {cfg}, log {RUN / (node + '.log')})")
    state["scheduler_pid"] = spawn("scheduler", ["-m", "scheduler.main", "--etcd", etcd,
                                                 "--listen", SCHEDULER, "--config",
                                                 str(write_scheduler_config())])
    say(f"scheduler started on http://{SCHEDULER} (log {RUN / 'scheduler.log'})")
    save_state(state)

    ready = asyncio.run(wait_ready(etcd, len(NODES), within=120))
    say(f"{len(ready)} backends ready: " + ", ".join(f"{b.node}/{b.name} at {b.url}"
                                                       for b in ready))
    wait_until(lambda: _http_ok(f"http://{SCHEDULER}/readyz"), 30, "the scheduler to be ready")
    talk()
    say("the cluster as aivmmctl sees it:")
    subprocess.run([sys.executable, "-m", "ctl.main", "--etcd", etcd, "status"], cwd=ROOT,
                   check=False, timeout=30)
    print(f"""
The cluster keeps running. Look further:
  .venv/bin/aivmmctl --etcd {etcd} status       nodes, GPUs, backends
  curl http://{SCHEDULER}/v1/models             the models the fleet serves
  http://{SCHEDULER}/                           the scheduler's status page
  curl http://{SCHEDULER}/metrics               scheduler metrics (agents: :9411, :9412)
  make down                                     stop everything and remove the containers
""")


def write_scheduler_config() -> Path:
    path = RUN / "scheduler.toml"
    path.write_text("# The demo's scheduler: defaults, no API keys.\n")
    return path


def _http_ok(url: str) -> bool:
    import urllib.request

    with urllib.request.urlopen(url, timeout=2) as resp:
        return resp.status == 200


def down() -> None:
    state = load_state()
    if not state:
        say("nothing to stop")
        return
    terminate(state.get("scheduler_pid"))
    for node in NODES:
        terminate(state.get(f"{node}_pid"))
    for node in NODES:
        cfg = state.get(f"{node}_config")
        if cfg and Path(cfg).exists():
            say(f"draining {node} (stops and removes its containers)")
            subprocess.run([sys.executable, "-m", "agent.main", "--config", cfg, "--drain"],
                           cwd=ROOT, check=False, timeout=120)
    terminate(state.get("dockerd_pid"), timeout=30)
    terminate(state.get("etcd_pid"))
    STATE.unlink(missing_ok=True)
    say("stopped")


def main() -> None:
    parser = argparse.ArgumentParser(prog="demo")
    parser.add_argument("verb", choices=["up", "down"])
    args = parser.parse_args()
    up() if args.verb == "up" else down()


if __name__ == "__main__":
    main()
