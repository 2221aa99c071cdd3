"""The files of models_dir: the hub cache engines read, and what the agent knows of it.

Engines run with ``HF_HOME=/models`` and ``HF_HUB_OFFLINE=1``, so a repository must be laid
out as huggingface_hub lays out its cache: ``hub/models--org--name/blobs/<etag>`` (one file
per content, named by its sha256 for LFS files, its git blob sha1 otherwise),
``snapshots/<commit>/<path>`` relative symlinks to the blobs, and ``refs/main`` holding the
commit. A download in progress is ``blobs/<etag>.incomplete`` (huggingface_hub's own name):
it is resumed where it ends. A GGUF file ``org/name/file.gguf`` is also linked at
``models_dir/org/name/file.gguf``, where llama.cpp's ``-m /models/...`` reads it.

The agent's own notes live in ``models_dir/.aivmm/``: ``storage-id`` (random, made once:
agents that share a models_dir read the same id and so share download locks),
``models/<model>.json`` (written when a model is complete and verified) and
``used/<model>`` (touched when an engine starts with the model). Everything here blocks
(file I/O); callers run it in a thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import orjson

from agent.models.hub import REPO_ID, HubFile, Listing, Target, target
from common.keys import escape_model, unescape_model
from common.records import ModelCopy

CHUNK = 1 << 20


@dataclass(slots=True)
class Marker:
    """``.aivmm/models/<model>.json``: a model fetched whole and verified."""

    model: str
    repo: str
    revision: str
    files: list[dict[str, object]] = field(default_factory=list)  # path, size, etag
    size: int = 0
    completed_at: float = 0.0


class Layout:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.hub = self.root / "hub"
        self.state = self.root / ".aivmm"

    # -- paths ---------------------------------------------------------------------------------

    def repo_dir(self, repo: str) -> Path:
        return self.hub / ("models--" + repo.replace("/", "--"))

    def blob(self, repo: str, etag: str) -> Path:
        return self.repo_dir(repo) / "blobs" / etag

    def partial(self, repo: str, etag: str) -> Path:
        return self.repo_dir(repo) / "blobs" / f"{etag}.incomplete"

    def snapshot(self, repo: str, revision: str) -> Path:
        return self.repo_dir(repo) / "snapshots" / revision

    def marker_path(self, model: str) -> Path:
        return self.state / "models" / f"{escape_model(model)}.json"

    def storage_id(self) -> str:
        """This models_dir's id, made on first use (O_EXCL: racing agents agree)."""
        path = self.state / "storage-id"
        self.state.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            with os.fdopen(fd, "w") as f:
                f.write(uuid.uuid4().hex[:16] + "\n")
        for _ in range(50):  # the creator may not have written it yet
            text = path.read_text().strip()
            if text:
                return text
            time.sleep(0.02)
        raise OSError(f"{path} stays empty")

    # -- what is there -------------------------------------------------------------------------

    def local(self, model: str) -> bool:
        """The model is a path that exists (absolute, or under models_dir), nothing to fetch.

        A repository id counts as local only when models_dir has it as a plain directory of
        a model (with config.json), as operators copied weights before fetching existed.
        """
        if model.startswith("/"):
            return Path(model).exists()
        if ".." in model.split("/"):
            return False
        path = self.root / model
        if path.is_file():
            return True  # a file under models_dir (a GGUF copied there) is used as it is
        if REPO_ID.match(model):
            return (path / "config.json").is_file()
        return path.exists()

    def hand_copied(self, repo: str) -> str | None:
        """The revision of a hub-cache copy nobody fetched through the agent (refs/main and
        a non-empty snapshot), or None."""
        ref = self.repo_dir(repo) / "refs" / "main"
        try:
            revision = ref.read_text().strip()
        except OSError:
            return None
        snap = self.snapshot(repo, revision)
        return revision if snap.is_dir() and any(snap.iterdir()) else None

    def marker(self, model: str) -> Marker | None:
        try:
            data = orjson.loads(self.marker_path(model).read_bytes())
            return Marker(**data)
        except (OSError, orjson.JSONDecodeError, TypeError):
            return None

    def problems(self, m: Marker) -> list[str]:
        """Files of a complete model that are missing or of the wrong size (cheap: stat)."""
        out = []
        for f in m.files:
            link = self.snapshot(m.repo, m.revision) / str(f["path"])
            try:
                size = link.stat().st_size
            except OSError:
                out.append(f"{f['path']}: missing")
                continue
            if size != f["size"]:
                out.append(f"{f['path']}: {size} bytes, expected {f['size']}")
        return out

    def bytes_present(self, repo: str, files: list[HubFile]) -> int:
        """Bytes of these files on disk, whole or partial (what a waiting agent reports)."""
        total = 0
        for f in files:
            for path in (self.blob(repo, f.etag), self.partial(repo, f.etag)):
                with contextlib.suppress(OSError):
                    total += min(f.size, path.stat().st_size)
                    break
        return total

    def free_bytes(self) -> int:
        self.root.mkdir(parents=True, exist_ok=True)
        return shutil.disk_usage(self.root).free

    # -- writing -------------------------------------------------------------------------------

    def link(self, repo: str, revision: str, f: HubFile) -> None:
        """``snapshots/<revision>/<path>`` -> ``../../blobs/<etag>`` (relative, as the hub's)."""
        dest = self.snapshot(repo, revision) / f.path
        dest.parent.mkdir(parents=True, exist_ok=True)
        depth = len(Path(f.path).parts) - 1
        rel = os.path.join(*([".."] * (depth + 2)), "blobs", f.etag)
        if dest.is_symlink() and os.readlink(dest) == rel:
            return
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:6]}.tmp")
        os.symlink(rel, tmp)
        os.replace(tmp, dest)

    def set_ref(self, repo: str, ref: str, revision: str) -> None:
        path = self.repo_dir(repo) / "refs" / ref
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(path, revision.encode())

    def link_gguf(self, t: Target, revision: str) -> None:
        """``models_dir/<org>/<name>/<file>.gguf`` -> the snapshot's file, for llama.cpp."""
        assert t.file is not None
        dest = self.root / t.model
        dest.parent.mkdir(parents=True, exist_ok=True)
        src = self.snapshot(t.repo, revision) / t.file
        rel = os.path.relpath(src, dest.parent)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:6]}.tmp")
        os.symlink(rel, tmp)
        os.replace(tmp, dest)

    def complete(self, t: Target, listing: Listing) -> Marker:
        """Snapshot links, refs, the GGUF link and the marker of a model whose blobs are all
        in place."""
        for f in listing.files:
            self.link(t.repo, listing.revision, f)
        if t.revision == "main":
            self.set_ref(t.repo, "main", listing.revision)
        if t.file is not None:
            self.link_gguf(t, listing.revision)
        m = Marker(model=t.model, repo=t.repo, revision=listing.revision,
                   files=[{"path": f.path, "size": f.size, "etag": f.etag}
                          for f in listing.files],
                   size=listing.size, completed_at=time.time())
        path = self.marker_path(t.model)
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(path, orjson.dumps(asdict(m)))
        return m

    def touch_used(self, model: str) -> None:
        path = self.state / "used" / escape_model(model)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        os.utime(path)

    def last_used(self, model: str) -> float | None:
        try:
            return (self.state / "used" / escape_model(model)).stat().st_mtime
        except OSError:
            return None

    def forget(self, m: Marker) -> None:
        """Drop a marker (a file of it went bad: the model is fetched again)."""
        with contextlib.suppress(FileNotFoundError):
            self.marker_path(m.model).unlink()

    # -- inventory and removal -----------------------------------------------------------------

    def markers(self) -> list[Marker]:
        out = []
        with contextlib.suppress(FileNotFoundError):
            for p in sorted((self.state / "models").glob("*.json")):
                m = self.marker(unescape_model(p.name.removesuffix(".json")))
                if m is not None:
                    out.append(m)
        return out

    def inventory(self) -> list[ModelCopy]:
        """Every model here: fetched ones (complete), partial downloads, hand-copied ones."""
        out: dict[str, ModelCopy] = {}
        covered: set[str] = set()
        for m in self.markers():
            out[m.model] = ModelCopy(model=m.model, size_bytes=m.size, state="complete",
                                     revision=m.revision, last_used=self.last_used(m.model))
            if m.model == m.repo:
                covered.add(m.repo)
        with contextlib.suppress(FileNotFoundError):
            for d in sorted(self.hub.iterdir()):
                if not d.name.startswith("models--") or d.name.count("--") != 2:
                    continue
                repo = d.name.removeprefix("models--").replace("--", "/", 1)
                if repo in covered:
                    continue
                blobs = list((d / "blobs").glob("*")) if (d / "blobs").is_dir() else []
                partial = any(b.name.endswith(".incomplete") for b in blobs)
                size = sum(_size(b) for b in blobs)
                others = [m for m in out.values() if _repo_of(m.model) == repo]
                if others and not partial:
                    continue  # only the GGUF files of its markers
                revision = self.hand_copied(repo)
                state = "partial" if partial or revision is None else "local"
                out[repo] = ModelCopy(model=repo, size_bytes=size, state=state,
                                      revision=revision, last_used=self.last_used(repo))
        return sorted(out.values(), key=lambda c: c.model)

    def remove(self, model: str) -> int:
        """Delete a model's files (blobs other models still use stay); bytes freed."""
        m = self.marker(model)
        freed = 0
        if m is None:  # a partial or hand-copied repository: the whole directory
            t = target(model)
            d = self.repo_dir(t.repo if t else model)
            if d.is_dir() and not any(_repo_of(x.model) == (t.repo if t else model)
                                      for x in self.markers()):
                freed = sum(_size(p) for p in d.rglob("*") if p.is_file() and
                            not p.is_symlink())
                shutil.rmtree(d)
            return freed
        keep = {(o.repo, str(f["etag"])) for o in self.markers() if o.model != model
                for f in o.files}
        for f in m.files:
            link = self.snapshot(m.repo, m.revision) / str(f["path"])
            with contextlib.suppress(FileNotFoundError):
                link.unlink()
            if (m.repo, str(f["etag"])) not in keep:
                blob = self.blob(m.repo, str(f["etag"]))
                freed += _size(blob)
                with contextlib.suppress(FileNotFoundError):
                    blob.unlink()
        t = target(model)
        if t is not None and t.file is not None:
            with contextlib.suppress(FileNotFoundError):
                (self.root / model).unlink()
            _prune(self.root / model, self.root)
        self.forget(m)
        if not any(o.repo == m.repo for o in self.markers()):
            shutil.rmtree(self.repo_dir(m.repo), ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            (self.state / "used" / escape_model(model)).unlink()
        return freed


def verify(path: Path, f: HubFile) -> str | None:
    """Why the file is not the hub's (size, then sha256 or git blob sha1), or None."""
    try:
        size = path.stat().st_size
    except OSError as err:
        return f"{f.path}: {err.strerror}"
    if size != f.size:
        return f"{f.path}: {size} bytes, expected {f.size}"
    h = hashlib.sha256() if f.sha256 else hashlib.sha1(f"blob {f.size}\0".encode())
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    if h.hexdigest() != (f.sha256 or f.etag):
        return f"{f.path}: {'sha256' if f.sha256 else 'git sha1'} mismatch (corrupt)"
    return None


def _repo_of(model: str) -> str:
    t = target(model)
    return t.repo if t is not None else model


def _size(p: Path) -> int:
    try:
        return p.stat().st_size
    except OSError:
        return 0


def _prune(path: Path, root: Path) -> None:
    parent = path.parent
    while parent != root and root in parent.parents:
        try:
            parent.rmdir()
        except OSError:
            return
        parent = parent.parent


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:6]}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
