"""Fetching one file of a repository into the hub cache: resumable, verified, bounded.

A file is streamed into ``blobs/<etag>.incomplete``; a later attempt (the connection
dropped, the agent or the node restarted) asks for the rest with ``Range: bytes=N-``. The
content is hashed as it arrives (the part already on disk first) and compared with the
hub's sha256 (LFS files) or git blob sha1 (others) before the file is renamed to its blob
name; a mismatch deletes it and raises :class:`Corrupt`, so it is fetched again. All
fetches of an agent share one :class:`RateLimit` (``download_max_bytes_per_s``) and one
semaphore (``download_concurrency``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from agent.models.hub import HubError, HubFile, HubSettings
from agent.models.layout import CHUNK, Layout


class Corrupt(HubError):
    """A fetched file did not match the hub's hash or size; it was deleted."""


class RateLimit:
    """A token bucket over every download of the agent; ``rate`` bytes/s, 0: no bound."""

    def __init__(self, rate: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self._clock = clock
        self._tokens = float(rate)
        self._last = clock()

    async def take(self, n: int) -> None:
        if self.rate <= 0:
            return
        now = self._clock()
        self._tokens = min(float(self.rate), self._tokens + (now - self._last) * self.rate)
        self._last = now
        self._tokens -= n
        if self._tokens < 0:
            await asyncio.sleep(-self._tokens / self.rate)


def _hasher(f: HubFile) -> Any:
    return hashlib.sha256() if f.sha256 else hashlib.sha1(f"blob {f.size}\0".encode())


def _hash_prefix(path: Path, h: Any, length: int) -> None:
    with path.open("rb") as fh:
        left = length
        while left > 0:
            chunk = fh.read(min(CHUNK, left))
            if not chunk:
                raise OSError(f"{path} shrank while being read")
            h.update(chunk)
            left -= len(chunk)


class Fetcher:
    """Fetches files of one hub (endpoint and token) into one models_dir."""

    def __init__(self, hub: HubSettings, layout: Layout, *, concurrency: int, max_rate: int,
                 on_bytes: Callable[[int], None] = lambda n: None) -> None:
        self.hub = hub
        self.layout = layout
        self.limit = RateLimit(max_rate)
        self.slots = asyncio.Semaphore(concurrency)
        self.on_bytes = on_bytes
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=30, sock_read=60))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def fetch(self, repo: str, revision: str, f: HubFile,
                    progress: Callable[[int], None]) -> None:
        """Make ``blobs/<etag>`` the verified file; ``progress(n)`` for each n bytes that
        arrive. Raises HubError (retry it: it resumes), Corrupt (it starts over)."""
        blob = self.layout.blob(repo, f.etag)
        if blob.exists() and blob.stat().st_size == f.size:
            return
        async with self.slots:
            await self._fetch(repo, revision, f, blob, progress)

    async def _fetch(self, repo: str, revision: str, f: HubFile, blob: Path,
                     progress: Callable[[int], None]) -> None:
        part = self.layout.partial(repo, f.etag)
        part.parent.mkdir(parents=True, exist_ok=True)
        offset = part.stat().st_size if part.exists() else 0
        if offset > f.size:
            offset = 0
        h = _hasher(f)
        if offset:
            try:
                await asyncio.to_thread(_hash_prefix, part, h, offset)
            except OSError:
                offset, h = 0, _hasher(f)
        headers = dict(self.hub.headers())
        if offset:
            headers["Range"] = f"bytes={offset}-"
        url = self.hub.file_url(repo, revision, f.path)
        got = offset
        try:
            async with self.session().get(url, headers=headers) as r:
                if r.status == 416 and offset == f.size:
                    pass  # the part on disk is whole already
                elif r.status == 416:
                    # The hub says the range does not exist: the part on disk is not a
                    # prefix of this file. Resuming from it again would loop for ever.
                    await asyncio.to_thread(part.unlink, missing_ok=True)
                    raise HubError(f"{f.path}: the partial download did not match; "
                                   "starting it again")
                elif r.status in (401, 403, 404):
                    raise HubError(f"{f.path}: the hub answered {r.status} {r.reason}",
                                   retry=r.status != 404)
                elif r.status not in (200, 206):
                    raise HubError(f"{f.path}: the hub answered {r.status} {r.reason}")
                else:
                    if r.status == 200 and offset:  # no Range support: from the start
                        offset, got, h = 0, 0, _hasher(f)
                    fd = await asyncio.to_thread(
                        os.open, part, os.O_WRONLY | os.O_CREAT | (
                            os.O_APPEND if offset else os.O_TRUNC), 0o644)
                    try:
                        async for chunk in r.content.iter_chunked(CHUNK):
                            await self.limit.take(len(chunk))
                            await asyncio.to_thread(_write, fd, chunk, h)
                            got += len(chunk)
                            self.on_bytes(len(chunk))
                            progress(len(chunk))
                            if got > f.size:
                                break
                    finally:
                        os.close(fd)
        except (aiohttp.ClientError, TimeoutError) as err:
            raise HubError(f"{f.path}: connection lost at {got} of {f.size} bytes "
                           f"({type(err).__name__}{': ' + str(err) if str(err) else ''})"
                           ) from None
        if got < f.size:
            raise HubError(f"{f.path}: the connection ended at {got} of {f.size} bytes")
        if got > f.size or h.hexdigest() != (f.sha256 or f.etag):
            with contextlib.suppress(FileNotFoundError):
                part.unlink()
            raise Corrupt(f"{f.path}: {'sha256' if f.sha256 else 'git sha1'} mismatch "
                          f"after download (corrupt or truncated); fetching it again")
        os.replace(part, blob)


def _write(fd: int, chunk: bytes, h: Any) -> None:
    view = memoryview(chunk)
    while view:
        n = os.write(fd, view)
        view = view[n:]
    h.update(chunk)
