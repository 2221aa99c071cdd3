"""Is the model ready on this node? Preparing it when not, for the supervisor.

:meth:`ModelManager.status` never blocks: it answers from what is known and starts a job
for a model that is not known to be ready. A job checks the files (a model fetched earlier
is verified once per agent process: sizes, then hashes), asks the hub for the revision's
files, takes the download lock of the models_dir (or waits for the agent that holds it),
checks the free space, fetches what is missing and marks the model complete. Hub errors
are retried with backoff and reported in the backend's error; a missing repository, a
refused token or too little disk fail the job, and the supervisor tries again after its
backoff. ``publish_loop`` keeps ``{prefix}/models/{node}`` (what models_dir holds) and acts
on ``aivmmctl models rm`` requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from agent.config import AgentConfig
from agent.metrics import AgentMetrics
from agent.models import layout as lay
from agent.models.download import Corrupt, Fetcher
from agent.models.hub import HubError, HubFile, HubSettings, Listing, Target, list_files, target
from agent.models.hub import settings as hub_settings
from agent.models.lock import Busy, Held, ModelLocks, NoLease
from common import audit
from common.backoff import Backoff
from common.keys import Keys, unescape_model
from common.records import (
    AuditEntry,
    ModelCopy,
    ModelsRecord,
    RecordError,
    dump,
    parse_model_removal,
)
from common.store import StoreError
from common.store_api import Store

log = logging.getLogger(__name__)

PrepState = Literal["ready", "checking", "downloading", "failed"]
FAILED_RETRY_S = 30.0  # a failed job is not started again sooner than this
NOTIFY_S = 1.0  # progress is published at most this often
RATE_WINDOW_S = 10.0
LOCK_CHECK_S = 5.0  # the holder checks it still holds the lock this often
WAIT_POLL_S = 1.0  # a waiter looks at the lock and the files this often
REMOVALS_POLL_S = 2.0  # removal requests are looked for, and the directory scanned, this often
# Free space that moved by less than this is written at most every FREE_SPACE_S: any write
# to the disk changes it, and a put every poll from every node is etcd load for nothing.
FREE_SPACE_STEP = 256 * 2**20
FREE_SPACE_S = 30.0
GIB = 2**30


@dataclass(slots=True)
class Prep:
    state: PrepState
    done: int | None = None
    total: int | None = None
    rate: float | None = None
    error: str | None = None


READY = Prep("ready")


class DiskFull(Exception):
    pass


@dataclass(slots=True)
class _Job:
    model: str
    prep: Prep = field(default_factory=lambda: Prep("checking"))
    task: asyncio.Task[None] | None = None
    finished_at: float | None = None
    samples: deque[tuple[float, int]] = field(default_factory=deque)


class ModelManager:
    def __init__(self, config: AgentConfig, metrics: AgentMetrics | None = None, *,
                 require_lock: bool = False, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.config = config
        self.node = config.node_name
        self.metrics = metrics
        self.layout = lay.Layout(config.models_dir)
        self.require_lock = require_lock
        self.locks: ModelLocks | None = None
        self.on_change: Callable[[], None] = lambda: None  # progress (throttled)
        self.on_done: Callable[[], None] = lambda: None  # a job ended
        self.on_audit: Callable[[AuditEntry], None] | None = None
        self._clock = clock
        self._hub: HubSettings | None = None
        self._fetcher: Fetcher | None = None
        self._ready: set[str] = set()
        self._jobs: dict[str, _Job] = {}
        self._notified = 0.0
        self._publish = asyncio.Event()
        self._touches: set[asyncio.Task[None]] = set()  # used() notes, referenced till done

    # -- what the supervisor asks --------------------------------------------------------------

    def status(self, model: str) -> Prep:
        """Ready, or how far its preparation is (a job is started when none runs)."""
        if not self.config.fetch_models or model in self._ready or target(model) is None:
            return READY
        job = self._jobs.get(model)
        if job is not None and job.finished_at is not None and (
                job.prep.state != "failed" or
                self._clock() - job.finished_at >= FAILED_RETRY_S):
            del self._jobs[model]
            job = None
        if job is None:
            job = self._jobs[model] = _Job(model)
            job.task = asyncio.create_task(self._run(job), name=f"model-{model}")
            self._publish.set()
        return job.prep

    def progress(self, model: str) -> Prep | None:
        job = self._jobs.get(model)
        return None if job is None else job.prep

    def used(self, model: str) -> None:
        """An engine was started with it: note when (``aivmmctl models`` shows it)."""
        if target(model) is None:
            return

        async def touch() -> None:
            with contextlib.suppress(OSError):
                await asyncio.to_thread(self.layout.touch_used, model)
            self._publish.set()
        task = asyncio.get_running_loop().create_task(touch())
        self._touches.add(task)  # the loop keeps only a weak reference to a task
        task.add_done_callback(self._touches.discard)

    def downloading(self) -> set[str]:
        return {m for m, j in self._jobs.items() if j.finished_at is None}

    async def close(self) -> None:
        tasks = [j.task for j in self._jobs.values() if j.task is not None]
        tasks += self._touches
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._fetcher is not None:
            await self._fetcher.close()

    # -- a job -----------------------------------------------------------------------------------

    def _fetcher_for(self) -> Fetcher:
        if self._fetcher is None:
            self._hub = hub_settings(self.config.hf_endpoint, self.config.hf_token_file)
            self._fetcher = Fetcher(self._hub, self.layout,
                                    concurrency=self.config.download_concurrency,
                                    max_rate=self.config.download_max_bytes_per_s,
                                    on_bytes=self._count_bytes)
        return self._fetcher

    def _count_bytes(self, n: int) -> None:
        if self.metrics is not None:
            self.metrics.model_bytes.labels(self.node).inc(n)

    def _failure(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.model_failures.labels(self.node, reason).inc()

    def _set(self, job: _Job, prep: Prep, *, now: bool = True) -> None:
        job.prep = prep
        if now:
            self._notified = self._clock()
            self.on_change()

    def _advance(self, job: _Job, n: int) -> None:
        p = job.prep
        p.done = (p.done or 0) + n
        t = self._clock()
        job.samples.append((t, p.done))
        while job.samples and t - job.samples[0][0] > RATE_WINDOW_S:
            job.samples.popleft()
        first_t, first_done = job.samples[0]
        if t - first_t >= 0.5:
            p.rate = (p.done - first_done) / (t - first_t)
        if t - self._notified >= NOTIFY_S:
            self._notified = t
            self.on_change()

    async def _run(self, job: _Job) -> None:
        try:
            await self._prepare(job)
        except asyncio.CancelledError:
            raise
        except HubError as err:
            log.warning("model not fetched", extra={"model": job.model, "error": str(err)})
            self._failure("refused")
            self._set(job, Prep("failed", error=str(err)))
        except DiskFull as err:
            log.warning("model not fetched", extra={"model": job.model, "error": str(err)})
            self._failure("disk")
            self._set(job, Prep("failed", error=str(err)))
        except Exception as err:
            log.exception("preparing model %s failed", job.model)
            self._set(job, Prep("failed", error=f"preparing the model failed: {err!r}"))
        job.finished_at = self._clock()
        self._publish.set()
        self.on_done()

    async def _prepare(self, job: _Job) -> None:
        model = job.model
        t = target(model)
        assert t is not None
        if await asyncio.to_thread(self.layout.local, model):
            self._ready_now(job)
            return
        marker = await asyncio.to_thread(self.layout.marker, model)
        if marker is not None:
            self._set(job, Prep("checking", error="verifying the files on disk"))
            bad = await asyncio.to_thread(self._check, marker)
            if not bad:
                self._ready_now(job)
                return
            log.warning("model files bad; fetching them again",
                        extra={"model": model, "error": "; ".join(bad)})
            self._failure("corrupt")
        listing = await self._listing(job, t)
        if listing is None:
            self._ready_now(job)  # hand-copied, hub unreachable: used as it is
            return
        await self._fetch_locked(job, t, listing)
        self._ready_now(job)

    def _ready_now(self, job: _Job) -> None:
        self._ready.add(job.model)
        self._set(job, Prep("ready"))

    def _check(self, m: lay.Marker) -> list[str]:
        """Sizes, then hashes; a bad file's blob is deleted and the marker dropped."""
        bad = self.layout.problems(m)
        if not bad:
            for f in m.files:
                etag = str(f["etag"])
                hf = HubFile(str(f["path"]), int(str(f["size"])), etag,
                             etag if len(etag) == 64 else None)
                why = lay.verify(self.layout.blob(m.repo, etag), hf)
                if why:
                    bad.append(why)
                    with contextlib.suppress(FileNotFoundError):
                        self.layout.blob(m.repo, etag).unlink()
        if bad:
            self.layout.forget(m)
        return bad

    async def _listing(self, job: _Job, t: Target) -> Listing | None:
        backoff = Backoff(initial=1.0, cap=60.0, jitter=0.2)
        self._fetcher_for()
        assert self._hub is not None
        while True:
            try:
                return await list_files(self._hub, t)
            except HubError as err:
                if not err.retry:
                    raise
                hand = await asyncio.to_thread(self.layout.hand_copied, t.repo)
                if t.file is None and hand is not None:
                    log.warning("the hub cannot be asked; using the copy in models_dir as it "
                                "is", extra={"model": t.model, "error": str(err)})
                    return None
                delay = backoff.next()
                self._failure("hub")
                log.warning("asking the hub failed", extra={"model": t.model,
                                                             "error": str(err)})
                self._set(job, Prep("downloading", error=f"{err}; retrying in {delay:.0f}s"))
                await asyncio.sleep(delay)

    async def _fetch_locked(self, job: _Job, t: Target, listing: Listing) -> None:
        storage = await asyncio.to_thread(self.layout.storage_id)
        total = listing.size
        while True:
            held: Held | None = None
            if self.require_lock or self.locks is not None:
                got = await self._acquire(storage, t.model)
                if isinstance(got, Busy):
                    if await self._wait_other(job, t, listing, storage, got.holder):
                        return
                    continue
                held = got
            try:
                if await asyncio.to_thread(self.layout.marker, t.model) is not None:
                    return  # another agent finished it between our checks
                present = await asyncio.to_thread(self.layout.bytes_present, t.repo,
                                                  listing.files)
                need = total - present
                free = await asyncio.to_thread(self.layout.free_bytes)
                margin = self.config.download_free_margin
                if free - need < margin:
                    raise DiskFull(
                        f"not enough disk on models_dir for {t.model}: {_gib(need)} to fetch,"
                        f" {_gib(free)} free, {_gib(margin)} kept free "
                        f"(download_free_margin)")
                log.info("fetching model", extra={"model": t.model, "revision": listing.revision,
                                                  "bytes": total, "missing": need})
                self._set(job, Prep("downloading", done=present, total=total))
                job.samples.clear()
                if await self._fetch_all(job, t, listing, held):
                    await asyncio.to_thread(self.layout.complete, t, listing)
                    if self.metrics is not None:
                        self.metrics.model_downloads.labels(self.node).inc()
                    log.info("model fetched and verified", extra={"model": t.model,
                                                                  "bytes": total})
                    if self.on_audit is not None:
                        self.on_audit(audit.entry(
                            "agent", "model-fetch", f"{self.node}/{t.model}",
                            detail=f"fetched {_gib(total)} of {t.repo}@"
                                   f"{listing.revision[:12]}, verified"))
                    return
                log.warning("lost the download lock; waiting", extra={"model": t.model})
            finally:
                if held is not None and self.locks is not None:
                    with contextlib.suppress(StoreError):
                        await self.locks.release(held)

    async def _acquire(self, storage: str, model: str) -> Held | Busy:
        backoff = Backoff(initial=0.5, cap=10.0, jitter=0.2)
        while True:
            if self.locks is not None:
                try:
                    return await self.locks.acquire(storage, model)
                except (NoLease, StoreError) as err:
                    log.debug("download lock not taken yet: %r", err)
            await asyncio.sleep(backoff.next())

    async def _wait_other(self, job: _Job, t: Target, listing: Listing, storage: str,
                          holder: str) -> bool:
        """Another agent fetches it into this models_dir: report the files' growth until it
        lets go. True when the model is then complete."""
        assert self.locks is not None
        note = f"being fetched by {holder} into the shared models_dir" if holder else None
        while True:
            done = await asyncio.to_thread(self.layout.bytes_present, t.repo, listing.files)
            if job.prep.state != "downloading":
                self._set(job, Prep("downloading", done=done, total=listing.size,
                                    error=note))
                job.samples.clear()
            else:
                job.prep.error = note
            self._advance(job, done - (job.prep.done or 0))
            try:
                busy = await self.locks.busy(storage, t.model)
            except StoreError:
                busy = True
            if not busy:
                return await asyncio.to_thread(self.layout.marker, t.model) is not None
            await asyncio.sleep(WAIT_POLL_S)

    async def _fetch_all(self, job: _Job, t: Target, listing: Listing, held: Held | None
                         ) -> bool:
        fetcher = self._fetcher_for()

        async def one(f: HubFile) -> None:
            backoff = Backoff(initial=1.0, cap=60.0, jitter=0.2)
            while True:
                try:
                    await fetcher.fetch(t.repo, listing.revision, f,
                                        lambda n: self._advance(job, n))
                except Corrupt as err:
                    self._failure("corrupt")
                    log.warning("fetched file corrupt", extra={"model": t.model,
                                                               "error": str(err)})
                    job.prep.done = await asyncio.to_thread(
                        self.layout.bytes_present, t.repo, listing.files)
                    job.samples.clear()
                    job.prep.error = str(err)
                    self.on_change()
                    await asyncio.sleep(backoff.next())
                    continue
                except HubError as err:
                    if not err.retry:
                        raise
                    self._failure("hub")
                    delay = backoff.next()
                    log.warning("fetch interrupted; resuming", extra={
                        "model": t.model, "error": str(err)})
                    job.prep.error = f"{err}; resuming in {delay:.0f}s"
                    self.on_change()
                    await asyncio.sleep(delay)
                    continue
                job.prep.error = None
                return

        work = asyncio.gather(*(one(f) for f in listing.files))
        if held is None or self.locks is None:
            await work
            return True
        watch = asyncio.ensure_future(work)
        try:
            while True:
                done, _ = await asyncio.wait({watch}, timeout=LOCK_CHECK_S)
                if done:
                    watch.result()
                    return True
                with contextlib.suppress(StoreError):
                    if not await self.locks.held(held):
                        watch.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await watch
                        return False
        finally:
            if not watch.done():
                watch.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await watch

    # -- the models record and removals ------------------------------------------------------------

    def record(self, in_use: dict[str, list[str]], downloading: set[str]) -> ModelsRecord:
        """What models_dir holds now (blocking: it scans the directory). ``downloading`` is
        :meth:`downloading`, taken on the event loop: this runs in a worker thread, and the
        loop adds and drops jobs meanwhile."""
        copies = self.layout.inventory()
        have = {c.model for c in copies}
        for c in copies:
            c.in_use = sorted(in_use.get(c.model, []))
            if c.model in downloading:
                c.state = "partial"
        extra = [m for m in downloading if m not in have]
        copies += [ModelCopy(model=m, state="partial", in_use=sorted(in_use.get(m, [])))
                   for m in extra]
        free: int | None
        try:
            free = self.layout.free_bytes()
        except OSError:
            free = None
        return ModelsRecord(node=self.node, storage=self.layout.storage_id(),
                            models_dir=self.config.models_dir, free_bytes=free,
                            models=sorted(copies, key=lambda c: c.model),
                            updated_at=time.time())

    async def publish_loop(self, store: Store, keys: Keys, lease: Callable[[], int | None],
                           in_use: Callable[[], dict[str, list[str]]]) -> None:
        """Keep ``{prefix}/models/{node}`` current (under the heartbeat lease) and act on
        removal requests for this node."""
        last: tuple[bytes, int | None] | None = None
        written_at = 0.0
        free_written: int | None = None
        while True:
            try:
                await self._removals(store, keys, in_use)
                lease_id = lease()
                if lease_id is not None:
                    record = await asyncio.to_thread(self.record, in_use(),
                                                     self.downloading())
                    free, record.updated_at = record.free_bytes, 0.0
                    if free is not None:
                        record.free_bytes = free // FREE_SPACE_STEP
                    body = dump(record)  # what the comparison sees: free space coarse
                    now = time.monotonic()
                    if last != (body, lease_id) or (now - written_at >= FREE_SPACE_S
                                                    and free != free_written):
                        record.free_bytes, record.updated_at = free, time.time()
                        await store.put(keys.models_of(self.node), dump(record),
                                        lease=lease_id)
                        last, written_at, free_written = (body, lease_id), now, free
            except StoreError as err:
                log.debug("models record not written: %s", err)
                last = None
            except OSError as err:
                log.warning("cannot scan models_dir: %s", err)
            except Exception:
                # A record we could not build (a malformed marker on disk) must not end
                # this eternal task: that would take the agent, its lease and every backend.
                log.exception("models record not built; trying again")
            self._publish.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._publish.wait(), REMOVALS_POLL_S)

    async def _removals(self, store: Store, keys: Keys,
                        in_use: Callable[[], dict[str, list[str]]]) -> None:
        snap = await store.get_prefix(keys.node_model_removals(self.node))
        for kv in snap.items:
            model = unescape_model(kv.key.rsplit("/", 1)[-1])
            try:
                req = parse_model_removal(kv.value)
                model = req.model
            except RecordError:
                pass
            users = in_use().get(model, [])
            if users or model in self.downloading():
                why = (f"in use by {', '.join(sorted(users))}" if users
                       else "being downloaded")
                detail = f"not removed: {why}"
            else:
                try:
                    freed = await asyncio.to_thread(self.layout.remove, model)
                    self._ready.discard(model)
                    detail = f"removed from {self.config.models_dir}: {_gib(freed)} freed"
                except OSError as err:
                    detail = f"not removed: {err}"
            log.info("model removal", extra={"model": model, "detail": detail})
            if self.on_audit is not None:
                self.on_audit(audit.entry("agent", "model-rm", f"{self.node}/{model}",
                                          detail=detail))
            await store.delete(kv.key)
            self._publish.set()


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"

