"""Bad input at every door, while steady load runs: each gets its clear error, nothing breaks."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import aiohttp
import openai
import orjson
import pytest

from common.keys import Keys
from common.store import EtcdStore
from devtools.agentproc import ROOT
from tests.faults.cluster import MODEL, Load
from tests.faults.conftest import Cluster

pytestmark = pytest.mark.docker

KEY = "good-key"
BIG = 1 << 20


async def _post(url: str, body: bytes, key: str | None = KEY) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    async with aiohttp.ClientSession() as s, s.post(url, data=body, headers=headers) as r:
        return r.status, orjson.loads(await r.read())


def _agent_with(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent.main", "--config", str(config)],
                          cwd=ROOT, capture_output=True, text=True, timeout=30)


async def test_bad_input_at_every_door_is_refused_clearly_and_disturbs_nothing(
        cluster: Cluster, tmp_path: Path, figures: Callable[..., None]) -> None:
    sched = cluster.scheduler(api_keys=[KEY], max_body_bytes=BIG)
    url = sched.url + "/v1/chat/completions"
    started = time.monotonic()
    async with Load(sched.url, api_key=KEY) as load:
        await load.wait_requests(10)

        # The scheduler's door: each mistake gets its status and an OpenAI-shaped error.
        good = {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
        cases = [
            ("malformed JSON", b'{"model": ', KEY, 400),
            ("not an object", b"[1, 2]", KEY, 400),
            ("model of the wrong type", orjson.dumps({**good, "model": 7}), KEY, 400),
            ("messages of the wrong type", orjson.dumps({**good, "messages": "hi"}), KEY, 400),
            ("huge body", orjson.dumps({**good, "pad": "x" * (2 * BIG)}), KEY, 413),
            ("unknown model", orjson.dumps({**good, "model": "no-such-model"}), KEY, 404),
            ("wrong key", orjson.dumps(good), "bad-key", 401),
            ("no key", orjson.dumps(good), None, 401),
        ]
        for what, body, key, status in cases:
            got, doc = await _post(url, body, key)
            assert got == status, (what, got, doc)
            assert set(doc["error"]) >= {"message", "type", "param", "code"}, (what, doc)
            assert doc["error"]["message"], what
        # The same through the official client, as a user meets them.
        async with openai.AsyncOpenAI(base_url=sched.url + "/v1", api_key="bad-key",
                                      max_retries=0) as client:
            with pytest.raises(openai.AuthenticationError):
                await client.models.list()
        async with openai.AsyncOpenAI(base_url=sched.url + "/v1", api_key=KEY,
                                      max_retries=0) as client:
            with pytest.raises(openai.NotFoundError):
                await client.chat.completions.create(model="no-such-model", messages=[])

        # etcd's door: records written by hand that no reader can use are skipped, counted.
        keys = Keys(cluster.prefix)
        async with EtcdStore([cluster.etcd_url]) as store:
            await store.put(keys.backend("ghost", "sim"), b"\xff not json")
            await store.put(keys.backend("ghost", "half"), b'{"schema": 1, "node": 3}')
            await store.put(keys.node("ghost"), b'{"schema": 1, "gpus": "many"}')

        def counted() -> bool:
            return "aivmm_scheduler_bad_records_total 2.0" in sched.metrics()
        await asyncio.to_thread(_wait, counted, "the scheduler to count the bad records")
        status = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "ctl.main", "--etcd", cluster.etcd_url,
                             "--prefix", cluster.prefix, "status"],
            cwd=ROOT, capture_output=True, text=True, timeout=30)
        assert status.returncode == 0, status.stderr
        assert "3 record(s) could not be parsed" in status.stdout
        for node in cluster.nodes.values():
            assert node.name in status.stdout

        # The agent's doors: a broken config exits 2 in one line; its HTTP refuses nonsense.
        broken = {
            "lease_ttl": 'lease_ttl = "soon"\n',
            "backend[0].port": '[[backend]]\nname = "x"\nmodel = "m"\nengine = "sim"\n'
                               'port = "eighty"\n',
            "no_such_key": "no_such_key = 1\n",
        }
        for key, text in broken.items():
            config = tmp_path / "broken.toml"
            config.write_text(text)
            proc = await asyncio.to_thread(_agent_with, config)
            lines = proc.stderr.strip().splitlines()
            assert proc.returncode == 2, proc.stderr
            assert len(lines) == 1 and key in lines[0] and str(config) in lines[0], lines
        agent_url = "http://" + _listen_of(cluster.nodes["a"].config)
        for method, path, status in [("POST", "/v1/state", 405), ("GET", "/v1/nope", 404)]:
            request = urllib.request.Request(agent_url + path, method=method, data=None)
            with pytest.raises(urllib.error.HTTPError) as refused:
                await asyncio.to_thread(urllib.request.urlopen, request, None, 5)
            assert refused.value.code == status

        await load.wait_requests(20, since=time.monotonic())
    # Nothing already running was disturbed.
    assert not load.failures, load.summary()
    assert sched.running and cluster.schedulers[0].running
    for node in cluster.nodes.values():
        assert node.agent is not None and node.agent.proc is not None
        assert node.agent.proc.poll() is None
        record = await node.record()
        assert record is not None and record.state == "ready" and record.restarts == 0
        assert node.served_as in load.served(started)
    figures("9 bad input at every door", requests=len(load.outcomes),
            failed=len(load.failures), refused_inputs=len(cases) + 2 + 3 + len(broken) + 2)


def _wait(predicate: Callable[[], bool], what: str) -> None:
    from devtools.services import wait_until

    wait_until(predicate, 10, what)


def _listen_of(config: Path) -> str:
    import tomllib

    return tomllib.loads(config.read_text())["listen"]
