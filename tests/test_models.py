"""Fetching models into models_dir (docs/models.md), against a local hub mirror.

devtools/hubmirror.py serves repositories of real generated files (a few MB) in the hub's
HTTP layout on 127.0.0.1; it can require a token, throttle, drop a connection half-way and
corrupt a file. The first tests drive :class:`ModelManager` in this process (with a real
etcd for the shared-storage lock); the last ones run ``aivmm-agent`` processes on real
Docker with the sim engine and look at what they publish.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from agent.config import AgentConfig
from agent.models import hub
from agent.models.layout import Layout
from agent.models.lock import ModelLocks
from agent.models.manager import ModelManager, Prep
from common.deployview import download_text
from common.keys import Keys
from common.records import parse_models
from common.store import EtcdStore
from devtools.hubmirror import HubMirror, generated
from devtools.services import until

MB = 1 << 20
REPO = "acme/tiny-chat"
TOKEN = "hf_test_sekrit_token_123"
FILES = {"config.json": 300, "tokenizer.json": 5000,
         "model-00001-of-00002.safetensors": 3 * MB, "model-00002-of-00002.safetensors": 2 * MB,
         "pytorch_model.bin": 2 * MB}  # not fetched: the safetensors are


@pytest.fixture
async def mirror() -> AsyncIterator[HubMirror]:
    m = HubMirror(token=TOKEN)
    m.add(REPO, generated(REPO, FILES))
    m.add("acme/tiny-gguf", generated("acme/tiny-gguf", {"tiny-q4.gguf": 2 * MB,
                                                         "tiny-q8.gguf": 3 * MB}))
    await m.start()
    yield m
    await m.close()


def config(tmp: Path, mirror: HubMirror, node: str = "n1", **kw: Any) -> AgentConfig:
    tmp.joinpath("token").write_text(TOKEN + "\n")
    base: dict[str, Any] = {"node_name": node, "models_dir": str(tmp / "models"),
                            "hf_endpoint": mirror.url, "hf_token_file": str(tmp / "token"),
                            "download_free_margin": 0}
    base.update(kw)
    return AgentConfig(**base)


async def ready(m: ModelManager, model: str, within: float = 30) -> list[Prep]:
    """Ask as the supervisor does until the model is ready; every answer seen."""
    seen: list[Prep] = []

    async def check() -> bool:
        p = m.status(model)
        seen.append(Prep(p.state, p.done, p.total, p.rate, p.error))
        assert p.state != "failed", p.error
        return p.state == "ready"
    await until(check, within, f"{model} ready", interval=0.05)
    return seen


def weights_gets(mirror: HubMirror) -> int:
    return sum(mirror.gets(p) for p in FILES if p.endswith(".safetensors"))


def test_targets() -> None:
    assert hub.target("org/name") == hub.Target("org/name", "org/name")
    assert hub.target("org/name/sub/f.Q4.gguf") == hub.Target(
        "org/name/sub/f.Q4.gguf", "org/name", file="sub/f.Q4.gguf")
    for plain in ("chat-m", "m", "/abs/path", "a/b/c", "org/../x.gguf", "../etc/x.gguf"):
        assert hub.target(plain) is None, plain
    assert download_text(50 * MB, 100 * MB, 10 * MB) == \
        "downloading 50% of 100.0 MiB, 10.0 MiB/s, ETA 5s"


async def test_download_verify_layout_and_token_never_logged(
        tmp_path: Path, mirror: HubMirror, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    mirror.rate = 20 * MB
    m = ModelManager(config(tmp_path, mirror))
    try:
        seen = await ready(m, REPO)
    finally:
        await m.close()
    assert any(p.state == "downloading" and p.total == 5 * MB + 5300 for p in seen)
    assert mirror.seen_auth == {f"Bearer {TOKEN}"}
    assert mirror.gets("pytorch_model.bin") == 0
    # The layout huggingface_hub itself reads offline (what engines do with HF_HOME=/models).
    from huggingface_hub import snapshot_download
    snap = await asyncio.to_thread(snapshot_download, REPO, cache_dir=str(tmp_path / "models/hub"),
                                   local_files_only=True)
    names = sorted(os.listdir(snap))
    assert names == ["config.json", "model-00001-of-00002.safetensors",
                     "model-00002-of-00002.safetensors", "tokenizer.json"]
    want = generated(REPO, FILES)
    assert all(Path(snap, n).read_bytes() == want[n] for n in names)  # noqa: ASYNC240
    inv = Layout(tmp_path / "models").inventory()
    assert [(c.model, c.state, c.size_bytes) for c in inv] == [(REPO, "complete", 5 * MB + 5300)]
    assert TOKEN not in caplog.text
    assert TOKEN not in repr(hub.settings(mirror.url, str(tmp_path / "token")))


async def test_dropped_connection_resumes_with_range(tmp_path: Path, mirror: HubMirror) -> None:
    mirror.drop["model-00001-of-00002.safetensors"] = 1 * MB + 12345
    m = ModelManager(config(tmp_path, mirror))
    try:
        await ready(m, REPO)
    finally:
        await m.close()
    ranges = [r for meth, p, r in mirror.requests
              if p.endswith("model-00001-of-00002.safetensors")]
    assert ranges[0] is None and ranges[1] is not None and ranges[1].startswith("bytes=")
    assert int(ranges[1].removeprefix("bytes=").rstrip("-")) > 0


async def test_corrupt_download_and_corrupt_file_on_disk_fetched_again(
        tmp_path: Path, mirror: HubMirror) -> None:
    mirror.corrupt["model-00002-of-00002.safetensors"] = 1
    m = ModelManager(config(tmp_path, mirror))
    try:
        await ready(m, REPO)
    finally:
        await m.close()
    assert mirror.gets("model-00002-of-00002.safetensors") == 2  # corrupt, then good
    # A file that goes bad on disk (same size) is found by the next process's check.
    layout = Layout(tmp_path / "models")
    marker = layout.marker(REPO)
    assert marker is not None
    f = next(f for f in marker.files if f["path"] == "model-00001-of-00002.safetensors")
    blob = layout.blob(REPO, str(f["etag"]))
    data = bytearray(blob.read_bytes())
    data[1000] ^= 0xFF
    blob.write_bytes(bytes(data))
    m2 = ModelManager(config(tmp_path, mirror))
    try:
        await ready(m2, REPO)
    finally:
        await m2.close()
    assert mirror.gets("model-00001-of-00002.safetensors") == 2
    assert blob.read_bytes() == generated(REPO, FILES)["model-00001-of-00002.safetensors"]


async def test_not_enough_disk_is_refused(tmp_path: Path, mirror: HubMirror) -> None:
    m = ModelManager(config(tmp_path, mirror, download_free_margin=1 << 60))
    try:
        async def failed() -> bool:
            return m.status(REPO).state == "failed"
        await until(failed, 20, "refused")
        error = m.status(REPO).error or ""
    finally:
        await m.close()
    assert error.startswith(f"not enough disk on models_dir for {REPO}"), error
    assert weights_gets(mirror) == 0


async def test_hub_errors_are_retried_and_reported(tmp_path: Path, mirror: HubMirror) -> None:
    mirror.fail_api = 1
    m = ModelManager(config(tmp_path, mirror))
    try:
        seen = await ready(m, REPO)
    finally:
        await m.close()
    assert any(p.state == "downloading" and "retrying in" in (p.error or "") for p in seen)
    missing = ModelManager(config(tmp_path, mirror))
    try:
        async def failed() -> bool:
            return missing.status("acme/nope").state == "failed"
        await until(failed, 20, "no such repository")
        assert "RepositoryNotFound" in (missing.status("acme/nope").error or "")
    finally:
        await missing.close()


async def test_gguf_file_linked_where_llamacpp_reads_it(tmp_path: Path,
                                                        mirror: HubMirror) -> None:
    m = ModelManager(config(tmp_path, mirror))
    try:
        await ready(m, "acme/tiny-gguf/tiny-q4.gguf")
    finally:
        await m.close()
    path = tmp_path / "models/acme/tiny-gguf/tiny-q4.gguf"
    assert path.is_symlink() and not os.readlink(path).startswith("/")
    assert path.read_bytes() == generated("acme/tiny-gguf", {"tiny-q4.gguf": 2 * MB,
                                                             "tiny-q8.gguf": 3 * MB})[
        "tiny-q4.gguf"]
    assert mirror.gets("tiny-q8.gguf") == 0
    assert Layout(tmp_path / "models").remove("acme/tiny-gguf/tiny-q4.gguf") == 2 * MB
    assert not path.exists() and Layout(tmp_path / "models").inventory() == []


async def test_shared_models_dir_downloads_once(tmp_path: Path, mirror: HubMirror,
                                                etcd_server: Any, prefix: str) -> None:
    mirror.rate = MB  # slow enough that both agents ask while it runs (3 s)
    keys = Keys(prefix)
    async with EtcdStore([etcd_server.url]) as store:
        lease = await store.grant_lease(10)
        managers = [ModelManager(config(tmp_path, mirror, node=n), require_lock=True)
                    for n in ("n1", "n2")]
        for mm in managers:
            mm.locks = ModelLocks(store, keys, mm.node, lambda: lease)
        try:
            results = await asyncio.gather(*(ready(mm, REPO, 60) for mm in managers))
        finally:
            for mm in managers:
                await mm.close()
            await store.revoke_lease(lease)
        assert (await store.get_prefix(f"{prefix}/model-locks/")).items == []
    assert weights_gets(mirror) == 2  # two files, each fetched once
    waited = [p for seen in results for p in seen
              if p.state == "downloading" and "being fetched by" in (p.error or "")]
    assert waited, "one agent waited for the other"
    assert any(p.done for p in waited), "the waiter reported the files' growth"


# -- the agent as a process: records, resume after SIGKILL, aivmmctl models ----------------------

@pytest.fixture
def fleet(tmp_path: Path, etcd_server: Any, prefix: str, docker_engine: Any,
          sim_image: str) -> Any:
    from devtools.agentproc import Fleet
    f = Fleet(tmp_path, etcd_server.url, prefix, docker_engine.host)
    yield f
    f.close()


@pytest.mark.docker
async def test_agent_fetches_with_progress_resumes_after_sigkill_and_lists_it(
        fleet: Any, mirror: HubMirror) -> None:
    from devtools.agentproc import kill
    from devtools.services import free_port
    from tests.test_ctl import ctl
    mirror.rate = 512 << 10  # ~6 s for the 3 MB file: time to see it and to kill the agent
    token = fleet.tmp / "token"
    token.write_text(TOKEN)
    config = fleet.config([{"name": "s1", "model": REPO, "engine": "sim", "port": free_port()}],
                          hf_endpoint=mirror.url, hf_token_file=str(token),
                          download_free_margin=0)
    agent = fleet.agent(config)

    async def halfway() -> Any:
        r = await fleet.backend("s1")
        return r if r is not None and r.state == "downloading" and r.bytes_done \
            and r.bytes_done > MB else None
    record = await until(halfway, 30, "progress in the backend record")
    assert record.bytes_total == 5 * MB + 5300 and record.container_id is None
    kill(agent)
    partial = await asyncio.to_thread(lambda: [
        p.stat().st_size for p in (fleet.models / "hub").rglob("*.incomplete")])
    assert partial and max(partial) > 0

    fleet.agent(config)
    mirror.rate = 0

    async def ready_() -> Any:
        r = await fleet.backend("s1")
        return r if r is not None and r.state == "ready" else None
    done = await until(ready_, 60, "backend ready once the model is fetched")
    assert done.bytes_done is None and done.container_id
    resumed = [r for _, p, r in mirror.requests if p.endswith(".safetensors") and r]
    assert resumed, "the restarted agent resumed with a Range request"

    async def listed() -> Any:
        async with EtcdStore([fleet.etcd_url]) as store:
            raw = await store.get(fleet.keys.models_of(fleet.node))
        rec = None if raw is None else parse_models(raw)
        return rec if rec is not None and rec.models and rec.models[0].in_use else None
    rec = await until(listed, 20, "the models record")
    assert [(c.model, c.state, c.in_use) for c in rec.models] == [(REPO, "complete", ["s1"])]
    out = await ctl(fleet.etcd_url, fleet.prefix, "models", "--json")
    assert orjson.loads(out.stdout)["nodes"][0]["models"][0]["model"] == REPO
    refused = await ctl(fleet.etcd_url, fleet.prefix, "models", "rm", fleet.node, REPO)
    assert refused.returncode == 2 and "in use" in refused.stderr
    for a in fleet.agents:
        a.stop()
    assert TOKEN not in "".join(a.output() for a in fleet.agents)


def test_placer_times_a_download_by_its_progress_not_from_the_assignment() -> None:
    from dataclasses import replace

    from scheduler.placer.service import StartFailures
    from tests.test_placer_service import assignment, backend, fleet

    f = StartFailures(replace_after=10, download_limit=1000)
    a = assignment("d", 0, "n1", assigned_at=0)
    down = replace(backend("n1", "d-0"), state="downloading", bytes_done=0, bytes_total=100)

    def at(done: int) -> Any:
        return fleet(a, replace(down, bytes_done=done))
    assert f.observe(at(0), 0) == []
    for t in range(5, 60, 5):  # progress every 5 s: never moved, long past replace_after
        assert f.observe(at(t), t) == []
    assert f.next_deadline(55) == 65
    assert f.observe(at(55), 64) == []
    [line] = f.observe(at(55), 65)  # stalled for replace_after: moved
    assert "d-0" in line and "n1" in line
    # Once fetched, the engine's start is timed from then, not from the assignment.
    g = StartFailures(replace_after=10, download_limit=1000)
    assert g.observe(at(10), 0) == [] and g.observe(at(90), 5) == []
    starting = fleet(a, replace(down, state="starting", bytes_done=None))
    assert g.observe(starting, 50) == [] and g.observe(starting, 59) == []
    assert len(g.observe(starting, 60)) == 1
    # A download that keeps going past the overall bound is moved too.
    h = StartFailures(replace_after=10, download_limit=30)
    assert all(h.observe(at(t), t) == [] for t in range(0, 30, 5))
    assert len(h.observe(at(31), 30)) == 1


def test_a_file_already_under_models_dir_is_local_even_if_it_looks_like_a_repo(
        tmp_path: Path) -> None:
    # An operator copied a GGUF to models_dir/tiny/tiny.gguf: "tiny/tiny.gguf" has the
    # shape of a repository id, but the file is there and must be used, not fetched.
    from agent.models.layout import Layout

    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "tiny.gguf").write_bytes(b"GGUF")
    layout = Layout(tmp_path)
    assert layout.local("tiny/tiny.gguf")
    assert not layout.local("org/not-here")
