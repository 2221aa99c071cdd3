"""A small local hub: serves model repositories in the Hugging Face hub's HTTP layout.

huggingface_hub (and the agent's fetcher) accept it through ``HF_ENDPOINT`` /
``hf_endpoint``. It answers the two calls a download makes:

- ``GET /api/models/{org}/{name}[/revision/{rev}]`` (``?blobs=true``): the repository's
  commit (``sha``) and files (``siblings``: ``rfilename``, ``size``, ``blobId``, and for LFS
  files ``lfs: {sha256, size, pointerSize}``);
- ``HEAD``/``GET /{org}/{name}/resolve/{rev}/{path}``: the file, with ``X-Repo-Commit``,
  ``ETag`` (the git blob sha1, or for LFS files the sha256, also in ``X-Linked-Etag`` and
  ``X-Linked-Size``), ``Content-Length``, ``Accept-Ranges: bytes`` and ``Range`` answered
  with 206.

For tests it can require a token, throttle (bytes/s), drop a file's connection half-way
(``drop``), serve a file corrupted (``corrupt``) a given number of times, and it counts
requests. ``python -m devtools.hubmirror --port 8990 --repo demo/tiny-model --size 64MiB``
serves a repository of generated files (docs/models.md).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
from collections import Counter
from dataclasses import dataclass, field

from aiohttp import web

LFS_MIN = 1 << 20
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


@dataclass(slots=True)
class MirrorFile:
    path: str
    data: bytes
    lfs: bool
    sha256: str
    git_sha1: str

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.git_sha1


@dataclass(slots=True)
class Repo:
    repo: str
    commit: str
    files: dict[str, MirrorFile] = field(default_factory=dict)


def make_file(path: str, data: bytes) -> MirrorFile:
    lfs = len(data) >= LFS_MIN or path.endswith(WEIGHT_SUFFIXES)
    return MirrorFile(path, data, lfs, hashlib.sha256(data).hexdigest(),
                      hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest())


def generated(repo: str, sizes: dict[str, int], seed: int = 0) -> dict[str, bytes]:
    """Files of the given sizes, made of deterministic pseudo-random bytes."""
    out: dict[str, bytes] = {}
    for i, (path, size) in enumerate(sorted(sizes.items())):
        if path.endswith(".json"):
            out[path] = (b'{"model_type": "llama", "name": "%s"}' % repo.encode()).ljust(
                size, b" ")
            continue
        block = hashlib.sha256(f"{repo}/{path}/{seed}/{i}".encode()).digest() * 2048
        out[path] = (block * (size // len(block) + 1))[:size]
    return out


class HubMirror:
    def __init__(self, *, token: str | None = None, rate: int = 0) -> None:
        self.repos: dict[str, Repo] = {}
        self.token = token
        self.rate = rate  # bytes/s for file bodies, 0: no bound
        self.drop: dict[str, int] = {}  # path -> bytes after which the next GET is cut
        self.corrupt: Counter[str] = Counter()  # path -> GETs still to corrupt
        self.fail_api = 0  # API calls still to answer 503
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range)
        self.seen_auth: set[str] = set()
        self.runner: web.AppRunner | None = None
        self.url = ""

    def add(self, repo: str, files: dict[str, bytes]) -> Repo:
        digest = hashlib.sha1(repo.encode())
        for path, data in sorted(files.items()):
            digest.update(path.encode() + hashlib.sha256(data).digest())
        r = Repo(repo, digest.hexdigest(), {p: make_file(p, d) for p, d in files.items()})
        self.repos[repo] = r
        return r

    def gets(self, path: str) -> int:
        return sum(1 for m, p, _ in self.requests if m == "GET" and p.endswith("/" + path))

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/api/models/{org}/{name}", self.api)
        app.router.add_get("/api/models/{org}/{name}/revision/{rev}", self.api)
        app.router.add_get("/api/models/{org}/{name}/tree/{rev}", self.tree)
        app.router.add_route("*", "/{org}/{name}/resolve/{rev}/{path:.+}", self.resolve)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self.runner = web.AppRunner(self.app(), access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port)
        await site.start()
        bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://{host}:{bound}"
        return self.url

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    def _denied(self, request: web.Request) -> web.Response | None:
        auth = request.headers.get("Authorization")
        if auth:
            self.seen_auth.add(auth)
        if self.token is not None and auth != f"Bearer {self.token}":
            return web.json_response({"error": "Invalid credentials"}, status=401,
                                     headers={"X-Error-Code": "RepoNotFound"})
        return None

    def _repo(self, request: web.Request) -> Repo | None:
        return self.repos.get(f"{request.match_info['org']}/{request.match_info['name']}")

    async def api(self, request: web.Request) -> web.Response:
        self.requests.append(("GET", request.path, None))
        denied = self._denied(request)
        if denied is not None:
            return denied
        if self.fail_api > 0:
            self.fail_api -= 1
            return web.json_response({"error": "overloaded"}, status=503)
        repo = self._repo(request)
        rev = request.match_info.get("rev", "main")
        if repo is None:
            return web.json_response({"error": "Repository not found"}, status=404,
                                     headers={"X-Error-Code": "RepoNotFound"})
        if rev not in ("main", repo.commit):
            return web.json_response({"error": "Invalid rev id"}, status=404,
                                     headers={"X-Error-Code": "RevisionNotFound"})
        siblings = []
        for f in sorted(repo.files.values(), key=lambda f: f.path):
            s: dict[str, object] = {"rfilename": f.path, "size": len(f.data),
                                    "blobId": f.git_sha1}
            if f.lfs:
                s["lfs"] = {"sha256": f.sha256, "size": len(f.data), "pointerSize": 134}
            siblings.append(s)
        return web.json_response({"id": repo.repo, "modelId": repo.repo, "sha": repo.commit,
                                  "private": False, "siblings": siblings, "tags": []})

    async def tree(self, request: web.Request) -> web.Response:
        """``/api/models/{repo}/tree/{rev}?recursive=true`` (huggingface_hub's
        snapshot_download lists the files this way)."""
        self.requests.append(("GET", request.path, None))
        denied = self._denied(request)
        if denied is not None:
            return denied
        repo = self._repo(request)
        if repo is None:
            return web.json_response({"error": "Repository not found"}, status=404,
                                     headers={"X-Error-Code": "RepoNotFound"})
        out = []
        for f in sorted(repo.files.values(), key=lambda f: f.path):
            e: dict[str, object] = {"type": "file", "oid": f.git_sha1, "size": len(f.data),
                                    "path": f.path}
            if f.lfs:
                e["lfs"] = {"oid": f.sha256, "size": len(f.data), "pointerSize": 134}
            out.append(e)
        return web.json_response(out)

    async def resolve(self, request: web.Request) -> web.StreamResponse:
        rng = request.headers.get("Range")
        self.requests.append((request.method, request.path, rng))
        denied = self._denied(request)
        if denied is not None:
            return denied
        repo = self._repo(request)
        path = request.match_info["path"]
        f = None if repo is None else repo.files.get(path)
        if repo is None or f is None or request.match_info["rev"] not in ("main", repo.commit):
            return web.json_response({"error": "Entry not found"}, status=404,
                                     headers={"X-Error-Code": "EntryNotFound"})
        size = len(f.data)
        headers = {"X-Repo-Commit": repo.commit, "ETag": f'"{f.etag}"',
                   "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        if f.lfs:
            headers["X-Linked-Etag"] = f'"{f.sha256}"'
            headers["X-Linked-Size"] = str(size)
        start = 0
        if rng and rng.startswith("bytes="):
            first = rng.removeprefix("bytes=").split("-", 1)[0]
            start = int(first or 0)
            if start >= size:
                return web.Response(status=416, headers={**headers,
                                                         "Content-Range": f"bytes */{size}"})
        status = 206 if rng else 200
        if rng:
            headers["Content-Range"] = f"bytes {start}-{size - 1}/{size}"
        headers["Content-Length"] = str(size - start)
        if request.method == "HEAD":
            return web.Response(status=status, headers=headers)
        resp = web.StreamResponse(status=status, headers=headers)
        await resp.prepare(request)
        body = f.data[start:]
        if self.corrupt[path] > 0:
            self.corrupt[path] -= 1
            body = bytes(b ^ 0xFF for b in body[:16]) + body[16:]
        cut = self.drop.pop(path, None)
        sent = 0
        step = 64 << 10
        while sent < len(body):
            chunk = body[sent:sent + step]
            if cut is not None and start + sent + len(chunk) > cut:
                chunk = chunk[:max(0, cut - start - sent)]
                if chunk:
                    await resp.write(chunk)
                if request.transport is not None:
                    request.transport.close()  # the client sees the body end early
                return resp
            await resp.write(chunk)
            sent += len(chunk)
            if self.rate:
                await asyncio.sleep(len(chunk) / self.rate)
        await resp.write_eof()
        return resp


def _size(text: str) -> int:
    units = {"": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20,
             "g": 1 << 30, "gib": 1 << 30}
    num = text.rstrip("KkMmGgiIbB")
    return int(float(num) * units[text[len(num):].lower()])


async def _serve(args: argparse.Namespace) -> None:
    mirror = HubMirror(token=os.environ.get("HUBMIRROR_TOKEN") or None, rate=_size(args.rate))
    for repo in args.repo or ["demo/tiny-model"]:
        weights = _size(args.size)
        mirror.add(repo, generated(repo, {
            "config.json": 200, "tokenizer.json": 4096,
            "model-00001-of-00002.safetensors": weights // 2,
            "model-00002-of-00002.safetensors": weights - weights // 2}))
    url = await mirror.start(args.host, args.port)
    print(f"hub mirror at {url}: {', '.join(mirror.repos)}", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m devtools.hubmirror",
                                description="a local hub serving generated model repositories")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8990)
    p.add_argument("--repo", action="append", help="org/name to serve (repeatable)")
    p.add_argument("--size", default="64MiB", help="bytes of weights per repository")
    p.add_argument("--rate", default="0", help="bytes/s per connection (0: no bound)")
    asyncio.run(_serve(p.parse_args()))


if __name__ == "__main__":
    main()
