"""`make demo` / `make down`: a whole aivmm cluster on this machine, and real requests through it.

``up`` starts (or reuses) etcd and a Docker engine, builds the sim image, starts two agents as
two nodes (``demo-a`` reports two AMD GPUs and ``demo-b`` an Intel Arc from fake sysfs trees,
see docs/cluster.md; neither agent.toml names a backend) and one scheduler, whose elected
placer places deployments. Once both nodes registered it runs the operator's own
``aivmmctl deploy demo --model demo-model --engine sim --replicas 2 --gpus 1``: the spread
policy puts one replica on each node, one on an AMD GPU and one on the Arc (sim engines hold
their GPU "on paper"). It waits until both replicas are ready, shows ``aivmmctl deployments``,
sends a chat completion and a streamed one through the scheduler with the ``openai`` package,
and shows ``aivmmctl status``. The cluster keeps running; ``down`` undeploys, stops
everything ``up`` started and removes its containers. ``up`` twice in a row restarts the
daemons, which adopt the running replicas; the deploy is then an unchanged update.

``autoscale`` (``make demo-autoscale``; it runs ``up`` first when no demo cluster answers)
shows scale from zero and back (docs/autoscaling.md): it deploys ``cold-model`` with no
replica, autoscaled ``--min 0 --max 2 --target 4 --idle 10``, whose sim engine takes
``COLD_STARTUP_S`` seconds to start; sends one streamed request, which waits while the placer
starts a replica and is answered once the engine is up (the time to the first token is
printed); then waits for the idle replica to be drained and removed, and undeploys.

``routes`` (``make demo-routes``; it runs ``up`` first when no demo cluster answers) shows a
route (docs/routes.md): two sim deployments of ``demo-model``, ``demo-radeon`` pinned to
``demo-a`` and ``demo-arc`` to ``demo-b``, then ``aivmmctl route chat --to demo-radeon=90
--to demo-arc=10 --fallback demo`` with a guard; 400 requests for model ``chat`` and the
split they took (``x-aivmm-route``), then ``aivmmctl routes``. The route and both
deployments stay.
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
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
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
PREFIX = "/aivmm/v1"
SCHEDULER = "127.0.0.1:8080"
MODEL = "demo-model"
DEPLOYMENT = "demo"
REPLICAS = 2
# node -> (agent listen port, label rack, the ports it gives deployment replicas). The agents
# share this host's loopback and replicas use host networking: each agent its own port range.
NODES = {
    "demo-a": (9411, "r1", "20100-20119"),
    "demo-b": (9412, "r2", "20200-20219"),
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
    # The PCI ID database a distribution ships, beside the fake root: the agents name the
    # cards from it ("Radeon RX 7900 XT/7900 XTX", "Arc A770"), as on a real machine.
    tree.pci_ids()


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
    listen, rack, ports = NODES[node]
    sysfs = RUN / node / "sys"
    fake_gpus(node, sysfs)
    models = RUN / "models"
    models.mkdir(parents=True, exist_ok=True)
    path = RUN / f"{node}.toml"
    # No [[backend]]: what runs here is what the placer assigns (aivmmctl deploy).
    path.write_text(f"""\
node_name = "{node}"
etcd = ["{etcd}"]
listen = "127.0.0.1:{listen}"
advertise_host = "127.0.0.1"
heartbeat_interval = 2.0
lease_ttl = 10  # the time a restarted agent has to take its records over
docker_host = "{docker_host}"
models_dir = "{models}"
sysfs_root = "{sysfs}"
assignment_ports = "{ports}"  # each agent on this host its own range
# Models with hub ids come from the local mirror of `make demo-models` (docs/models.md).
hf_endpoint = "http://{MIRROR}"
download_free_margin = 0

[labels]
rack = "{rack}"
""")
    return path


def ctl(etcd: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the operator's ``aivmmctl`` against the demo's etcd, echoing the command."""
    say("$ aivmmctl " + " ".join(args))
    done = subprocess.run([sys.executable, "-m", "ctl.main", "--etcd", etcd, *args], cwd=ROOT,
                          check=False, timeout=60, text=True, capture_output=True)
    for line in (done.stdout + done.stderr).rstrip("\n").splitlines():
        print(f"  {line}", flush=True)
    if check and done.returncode != 0:
        raise SystemExit(f"[demo] aivmmctl {args[0]} exited {done.returncode}")
    return done


async def wait_registered(etcd: str, within: float) -> None:
    """Until both demo nodes and their GPUs are in etcd (the placer places on those)."""
    from ctl.main import fetch

    deadline = time.monotonic() + within
    last = ""
    while True:
        view = await fetch([etcd], PREFIX, 3.0)
        seen = {n.node: n for n in view["nodes"]}
        text = ", ".join(f"{name} ({', '.join(f'{g.vendor} {g.name}' for g in n.gpus)}"
                         f"; rack={n.labels.get('rack', '-')})"
                         for name, n in sorted(seen.items()) if name in NODES) or "none yet"
        if text != last:
            say(f"nodes: {text}")
            last = text
        if all(node in seen and seen[node].gpus for node in NODES):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"nodes not registered after {within:.0f}s; see {RUN}/*.log")
        await asyncio.sleep(0.5)


def _replica_text(r: dict[str, Any]) -> str:
    gpus = ",".join(str(g) for g in r["gpus"]) or "-"
    state = (r["state"] or "assigned") if r["assigned"] else f"{r['state']} (removing)"
    return f"{r['node']}/{r['backend']} ({r['vendor'] or 'no'} GPU {gpus}) {state}"


async def wait_deployed(etcd: str, within: float) -> dict[str, Any]:
    """Until the demo deployment has all its replicas placed and ready, and nothing else."""
    from ctl.main import fetch

    deadline = time.monotonic() + within
    last = ""
    while True:
        view = await fetch([etcd], PREFIX, 3.0)
        mine: dict[str, Any] | None = next(
            (v for v in view["deployments"] if v["name"] == DEPLOYMENT), None)
        if mine is None:
            text = "no deployment record yet"
        else:
            text = (f"desired {mine['desired']}, placed {mine['placed']}, ready {mine['ready']}"
                    + "".join(f"; {_replica_text(r)}" for r in mine["replicas"]))
            if mine["pending"]:
                text += f"; pending {mine['pending']}: {'; '.join(mine['reasons'])}"
        if text != last:
            say(f"deployment {DEPLOYMENT}: {text}")
            last = text
        if mine is not None and mine["placed"] == mine["desired"] == REPLICAS and all(
                r["assigned"] and r["state"] == "ready" for r in mine["replicas"]) and \
                len(mine["replicas"]) == REPLICAS:
            return mine
        if time.monotonic() > deadline:
            raise TimeoutError(f"deployment {DEPLOYMENT} not ready after {within:.0f}s; see "
                               f"aivmmctl deployments and {RUN}/*.log")
        await asyncio.sleep(0.5)


def scheduler_sees(count: int) -> bool:
    """The scheduler is ready and routes to at least ``count`` ready backends."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{SCHEDULER}/readyz", timeout=2) as resp:
            body = orjson.loads(resp.read())
    except (OSError, urllib.error.URLError):
        return False
    return bool(body.get("ready")) and body.get("backends", {}).get("ready", 0) >= count


def talk(where: dict[str, str]) -> None:
    from openai import OpenAI

    def served(raw: Any) -> str:
        key = raw.headers.get("x-aivmm-backend") or "?"
        return f"{key}, {where[key]}" if key in where else key

    client = OpenAI(base_url=f"http://{SCHEDULER}/v1", api_key="demo", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hello to the fleet."}],
        max_tokens=16)
    answer = raw.parse()
    say(f"chat answer: {answer.choices[0].message.content!r}")
    tokens = answer.usage.completion_tokens if answer.usage else "?"
    say(f"  served by {served(raw)}, {tokens} tokens")
    streamed = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "Stream me a few words."}],
        max_tokens=16, stream=True)
    chunks = [c.choices[0].delta.content or "" for c in streamed.parse() if c.choices]
    say(f"streamed answer ({len(chunks)} chunks): {''.join(chunks)!r}")
    say(f"  served by {served(streamed)}")

    def ping(_: int) -> str:
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "ping"}], max_tokens=8)
        raw.parse()
        return raw.headers.get("x-aivmm-backend") or "?"

    with ThreadPoolExecutor(4) as pool:
        tally = Counter(pool.map(ping, range(24)))
    say("24 more, 4 at a time, by replica: " + ", ".join(
        f"{k} ({where.get(k, '?')}) {n}" for k, n in sorted(tally.items())))


def up() -> None:
    RUN.mkdir(parents=True, exist_ok=True)
    state = load_state()
    etcd = ensure_etcd(state)
    docker_host = ensure_docker(state)
    save_state(state)

    from devtools.image import build_image

    image = build_image(docker_host)
    say(f"sim image {image}")

    # A second `make demo` restarts the daemons and they adopt the running replicas. Each agent
    # is replaced as soon as its predecessor exits: the node record lives on the old agent's
    # lease (lease_ttl), and were it to expire first the placer would move the node's
    # replicas, and the new agent would remove its container to start it again.
    for node in NODES:
        cfg = agent_config(node, etcd, docker_host)
        if alive(state.get(f"{node}_pid")):
            say(f"agent {node}: replacing the running one")
            terminate(state.get(f"{node}_pid"))
        state[f"{node}_pid"] = spawn(node, ["-m", "agent.main", "--config", str(cfg)])
        state[f"{node}_config"] = str(cfg)
        say(f"agent {node} started (config {cfg}, log {RUN / (node + '.log')})")
    terminate(state.get("scheduler_pid"))
    state["scheduler_pid"] = spawn("scheduler", ["-m", "scheduler.main", "--etcd", etcd,
                                                 "--listen", SCHEDULER, "--config",
                                                 str(write_scheduler_config())])
    say(f"scheduler started on http://{SCHEDULER}, the placer among its roles "
        f"(log {RUN / 'scheduler.log'})")
    save_state(state)

    asyncio.run(wait_registered(etcd, within=60))
    ctl(etcd, "deploy", DEPLOYMENT, "--model", MODEL, "--engine", "sim",
        "--replicas", str(REPLICAS), "--gpus", "1")
    view = asyncio.run(wait_deployed(etcd, within=120))
    where = {f"{r['node']}/{r['backend']}":
             f"{r['vendor']} GPU {','.join(str(g) for g in r['gpus'])}"
             for r in view["replicas"]}
    say(f"{REPLICAS} replicas ready: " + "; ".join(f"{k} on {v}" for k, v in where.items()))
    say("the placement as aivmmctl sees it:")
    ctl(etcd, "deployments")
    wait_until(lambda: scheduler_sees(REPLICAS), 30,
               f"the scheduler to route to {REPLICAS} ready replicas")
    talk(where)
    say("the cluster as aivmmctl sees it:")
    ctl(etcd, "status", check=False)
    ctl_cmd = f".venv/bin/aivmmctl --etcd {etcd}"
    print(f"""
The cluster keeps running. Look further:
  {ctl_cmd} status         nodes, GPUs, backends, deployments
  {ctl_cmd} deployments    where each replica runs
  {ctl_cmd} scale demo 3   a third replica, on demo-a's second Radeon
  {ctl_cmd} deploy demo --model demo-model --engine sim --replicas 2 --gpus 1 --env V=2
                           a rolling update, one replica at a time (aivmmctl audit: each step)
  {ctl_cmd} undeploy demo  the replicas are stopped and their containers removed
  curl http://{SCHEDULER}/v1/models      the models the fleet serves
  http://{SCHEDULER}/                    the scheduler's status page
  curl http://{SCHEDULER}/metrics        scheduler metrics (agents: :9411, :9412)
  docker -H {docker_host} ps -a   the replicas' containers
  make down    undeploy, stop everything this started and remove its containers
""")


COLD_DEPLOYMENT, COLD_MODEL, COLD_STARTUP_S, COLD_IDLE_S = "cold", "cold-model", 5, 10


def cold_state(etcd: str) -> tuple[int | None, int]:
    """(the autoscaler's count, assignments) of the cold deployment."""
    from common.deployview import read_records
    from common.keys import Keys
    from common.store import EtcdStore

    async def read() -> tuple[int | None, int]:
        async with EtcdStore([etcd], timeout=3.0) as store:
            records = await read_records(store, Keys(PREFIX))
        status = records.placements.get(COLD_DEPLOYMENT)
        return (None if status is None else status.desired,
                sum(1 for a in records.assignments if a.deployment == COLD_DEPLOYMENT))
    return asyncio.run(read())


def autoscale() -> None:
    """Scale from zero on the first request, and back to zero when idle."""
    if not scheduler_sees(0):
        up()
    etcd = f"http://127.0.0.1:{ETCD_PORT}"
    ctl(etcd, "deploy", COLD_DEPLOYMENT, "--model", COLD_MODEL, "--engine", "sim",
        "--gpus", "1", "--replicas", "0", "--env", f"SIM_STARTUP_DELAY_S={COLD_STARTUP_S}")
    ctl(etcd, "autoscale", COLD_DEPLOYMENT, "--min", "0", "--max", "2", "--target", "4",
        "--scale-down-delay", "10", "--idle", str(COLD_IDLE_S))
    wait_until(lambda: cold_state(etcd) == (0, 0), 30, "the placer to report it at zero")
    say(f"{COLD_DEPLOYMENT}: 0 replicas; its sim engine takes {COLD_STARTUP_S}s to start")
    ctl(etcd, "deployments")
    from openai import OpenAI

    client = OpenAI(base_url=f"http://{SCHEDULER}/v1", api_key="demo", max_retries=0,
                    timeout=120)
    say(f"one streamed request for {COLD_MODEL}: queued by the scheduler while the placer "
        "starts a replica")
    sent = time.monotonic()
    first: float | None = None
    words = []
    for chunk in client.chat.completions.create(
            model=COLD_MODEL, messages=[{"role": "user", "content": "Wake up."}],
            max_tokens=8, stream=True):
        if first is None:
            first = time.monotonic() - sent
        if chunk.choices and chunk.choices[0].delta.content:
            words.append(chunk.choices[0].delta.content)
    say(f"first token after {first or 0:.1f}s (cold start), answer {''.join(words)!r}")
    ctl(etcd, "deployments")
    say(f"no more requests: after {COLD_IDLE_S}s idle the replica is drained and removed")
    idle_from = time.monotonic()
    wait_until(lambda: cold_state(etcd) == (0, 0), 120, "scale to zero", interval=0.5)
    say(f"back to 0 replicas {time.monotonic() - idle_from:.1f}s after the last request; "
        "its GPU is free again")
    ctl(etcd, "audit", "--target", COLD_DEPLOYMENT, "--limit", "10", check=False)
    ctl(etcd, "undeploy", COLD_DEPLOYMENT)


MIRROR = "127.0.0.1:8990"
FETCHED_DEPLOYMENT, FETCHED_MODEL = "fetched", "demo/tiny-model"


def fetched_replica(etcd: str) -> dict[str, Any] | None:
    done = subprocess.run([sys.executable, "-m", "ctl.main", "--etcd", etcd, "deployments",
                           "--json"], cwd=ROOT, check=False, timeout=30, text=True,
                          capture_output=True)
    try:
        views = orjson.loads(done.stdout)["deployments"]
    except (orjson.JSONDecodeError, KeyError):
        return None
    view = next((v for v in views if v["name"] == FETCHED_DEPLOYMENT), None)
    return view["replicas"][0] if view and view["replicas"] else None


def models() -> None:
    """``make demo-models``: a deployment whose model the agent fetches from a local hub
    mirror (devtools/hubmirror.py), its progress shown until the replica is ready."""
    if not scheduler_sees(0):
        up()
    etcd = f"http://127.0.0.1:{ETCD_PORT}"
    state = load_state()
    if not alive(state.get("mirror_pid")):
        host, port = MIRROR.split(":")
        state["mirror_pid"] = spawn("hubmirror", [
            "-m", "devtools.hubmirror", "--host", host, "--port", port, "--repo",
            FETCHED_MODEL, "--size", "96MiB", "--rate", "8MiB"])
        save_state(state)
        say(f"local hub mirror at http://{MIRROR} serving {FETCHED_MODEL} (96 MiB of "
            "weights, 8 MiB/s per connection)")
    ctl(etcd, "deploy", FETCHED_DEPLOYMENT, "--model", FETCHED_MODEL, "--engine", "sim",
        "--gpus", "0")
    from common.deployview import download_text

    deadline = time.monotonic() + 180
    last = ""
    while time.monotonic() < deadline:
        r = fetched_replica(etcd)
        state_text = "assigned" if r is None else str(r["state"])
        if r is not None and r["state"] == "downloading":
            state_text = download_text(r["bytes_done"], r["bytes_total"], r["download_rate"])
        if state_text != last:
            say(f"{FETCHED_DEPLOYMENT}-0 on {r['node'] if r else '?'}: {state_text}")
            last = state_text
        if r is not None and r["state"] == "ready":
            break
        time.sleep(1.0)
    else:
        raise SystemExit("[demo] the fetched model's replica was not ready within 180s")
    ctl(etcd, "models")
    from openai import OpenAI

    client = OpenAI(base_url=f"http://{SCHEDULER}/v1", api_key="demo", max_retries=3)
    answer = client.chat.completions.create(
        model=FETCHED_MODEL, messages=[{"role": "user", "content": "Fetched?"}], max_tokens=8)
    say(f"{FETCHED_MODEL} answers: {answer.choices[0].message.content!r}")
    say(f"a second deployment of it reuses the files: 'aivmmctl models rm NODE "
        f"{FETCHED_MODEL}' removes them once it is undeployed")


ROUTE = "chat"
# The route's two targets: one sim deployment pinned to each demo node (no GPU: they share
# the nodes with the demo deployment), and the demo deployment as the fallback.
ROUTE_TARGETS = {"demo-radeon": ("demo-a", 90), "demo-arc": ("demo-b", 10)}


def routes() -> None:
    """``make demo-routes``: a route split 90/10 over two deployments, one per demo node."""
    if not scheduler_sees(0):
        up()
    etcd = f"http://127.0.0.1:{ETCD_PORT}"
    from ctl.main import fetch

    for name, (node, _) in ROUTE_TARGETS.items():
        ctl(etcd, "deploy", name, "--model", MODEL, "--engine", "sim", "--gpus", "0",
            "--node", node)

    def both_ready() -> bool:
        view = asyncio.run(fetch([etcd], PREFIX, 3.0))
        ready = {v["name"]: v["ready"] for v in view["deployments"]}
        return all(ready.get(name) == 1 for name in ROUTE_TARGETS)
    wait_until(both_ready, 120, "both route targets to be ready", interval=0.5)
    ctl(etcd, "route", ROUTE, *[a for name, (_, w) in ROUTE_TARGETS.items()
                                for a in ("--to", f"{name}={w}")],
        "--fallback", DEPLOYMENT, "--guard-error-rate", "0.5", "--guard-min-requests", "20")

    def listed() -> bool:
        import urllib.request
        with urllib.request.urlopen(f"http://{SCHEDULER}/v1/models", timeout=2) as resp:
            return ROUTE in {m["id"] for m in orjson.loads(resp.read())["data"]}
    wait_until(listed, 30, f"the scheduler to list the route {ROUTE}")
    from openai import OpenAI

    client = OpenAI(base_url=f"http://{SCHEDULER}/v1", api_key="demo", max_retries=0)

    def ask(_: int) -> str:
        raw = client.chat.completions.with_raw_response.create(
            model=ROUTE, messages=[{"role": "user", "content": "ping"}], max_tokens=8)
        raw.parse()
        return raw.headers.get("x-aivmm-route") or "?"

    n = 400
    with ThreadPoolExecutor(8) as pool:
        tally = Counter(pool.map(ask, range(n)))
    say(f"{n} requests for model {ROUTE!r}, by target: " + ", ".join(
        f"{k} {v} ({100 * v / n:.1f}%)" for k, v in sorted(tally.items())))
    say("the schedulers publish their figures every 5 s; aivmmctl sums them:")
    time.sleep(6)
    ctl(etcd, "routes")
    ctl_cmd = f".venv/bin/aivmmctl --etcd {etcd}"
    print(f"""
The route stays. Try:
  {ctl_cmd} route {ROUTE} --to demo-radeon=50 --to demo-arc=50    another split
  {ctl_cmd} routes --json        the figures per target, for an A/B comparison
  http://{SCHEDULER}/            the status page's Routes table
  {ctl_cmd} unroute {ROUTE}; {ctl_cmd} undeploy demo-radeon; {ctl_cmd} undeploy demo-arc
""")


def write_scheduler_config() -> Path:
    path = RUN / "scheduler.toml"
    path.write_text("# The demo's scheduler: defaults, no API keys.\n")
    return path


async def replicas_left(etcd: str) -> int:
    """The demo deployment's assignments and backend records still in etcd."""
    from common.deployview import read_records
    from common.keys import Keys
    from common.store import EtcdStore
    from ctl.main import fetch

    keys = Keys(PREFIX)
    async with EtcdStore([etcd], timeout=3.0) as store:
        records = await read_records(store, keys)
    view = await fetch([etcd], PREFIX, 3.0)
    return sum(1 for a in records.assignments if a.deployment == DEPLOYMENT) + \
        sum(1 for b in view["backends"] if b.deployment == DEPLOYMENT)


def undeploy(state: dict[str, Any]) -> None:
    """``aivmmctl undeploy demo`` while the placer and agents still run, so etcd is left with
    no deployment, assignment or replica record (a later ``up`` starts from nothing)."""
    etcd = f"http://127.0.0.1:{ETCD_PORT}"
    with contextlib.suppress(OSError):
        if not etcd_answers(etcd):
            return
    if ctl(etcd, "undeploy", DEPLOYMENT, check=False).returncode != 0:
        return
    if not (alive(state.get("scheduler_pid")) and all(alive(state.get(f"{n}_pid"))
                                                       for n in NODES)):
        return  # no placer or agent to act on it: the drain below removes the containers
    try:
        wait_until(lambda: asyncio.run(replicas_left(etcd)) == 0, 30,
                   "the replicas to be removed", interval=0.5)
        say("replicas removed")
    except TimeoutError:
        say("replicas still listed after 30s; the drain below removes their containers")


def down() -> None:
    state = load_state()
    if not state:
        say("nothing to stop")
        return
    undeploy(state)
    terminate(state.get("scheduler_pid"))
    terminate(state.get("mirror_pid"))
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
    parser.add_argument("verb", choices=["up", "down", "autoscale", "routes", "models"])
    args = parser.parse_args()
    {"up": up, "down": down, "autoscale": autoscale, "routes": routes,
     "models": models}[args.verb]()


if __name__ == "__main__":
    main()
