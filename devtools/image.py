"""Build container images FROM scratch out of the running interpreter (the sim's, and more).

There is no image registry and no base image to pull here, so an image is assembled from
what this machine already has: the python binary with every shared library ``ldd`` names
(and the loader), a pruned standard library, the installed distributions an
:class:`ImageSpec` names with everything they require, and its packages from this source
tree. The tree is hashed; an image carrying the same ``aivmm.content-hash`` label is reused,
so an unchanged tree costs a hash and no build. The ``aivmm-sim`` image is :data:`SIM`;
:mod:`devtools.images` adds the agent's and the scheduler's, :mod:`devtools.llamacpp` a real
llama.cpp engine's (from a ``pip install --target`` tree). The builder is a development tool,
not part of any image it builds: the sim image carries ``sim/`` and what it imports.

    python -m devtools.image [--docker-host unix:///path/docker.sock] [--tag aivmm-sim] [--quiet]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.metadata
import io
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import docker
import docker.errors

PREFIX = PurePosixPath("/opt/python")
PYVER = f"python{sys.version_info.major}.{sys.version_info.minor}"
SITE = PREFIX / "lib" / PYVER / "site-packages"
SIM_UID = 65532
HASH_LABEL = "aivmm.content-hash"
SOURCE_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class ImageSpec:
    """What goes into one image besides the interpreter and its standard library."""

    name: str                          # default repository name
    distributions: tuple[str, ...]     # installed distributions, with what they require
    packages: tuple[str, ...]          # import packages copied from this source tree
    entrypoint: tuple[str, ...]        # arguments after the interpreter
    env: tuple[tuple[str, str], ...] = ()
    user: tuple[str, int] | None = None  # (name, uid); None runs as root
    healthcheck: tuple[str, ...] = ()  # arguments after the interpreter; exit 0 = healthy
    # Directories to take ``distributions`` from instead of this interpreter's own
    # site-packages (a ``pip install --target`` tree: devtools/llamacpp.py).
    site_paths: tuple[str, ...] = ()
    # Literal files for site-packages: (path relative to it, content).
    files: tuple[tuple[str, bytes], ...] = ()
    # Standard-library parts pruned by default that this image needs (e.g. "sqlite3": the
    # package and its _sqlite3 extension).
    stdlib_keep: tuple[str, ...] = ()


SIM = ImageSpec(
    name="aivmm-sim", distributions=("aiohttp", "orjson"), packages=("sim",),
    entrypoint=("-m", "sim.main"), env=(("SIM_HOST", "0.0.0.0"), ("SIM_PORT", "8001")),
    user=("sim", SIM_UID))

# Standard-library parts the sim never imports: tests, GUIs, installers, build configs.
STDLIB_SKIP_DIRS = {
    "site-packages", "test", "tests", "idle_test", "idlelib", "tkinter", "turtledemo",
    "ensurepip", "lib2to3", "distutils", "pydoc_data", "unittest", "sqlite3", "venv",
    "__phello__",
}
STDLIB_SKIP_FILES = {"turtle.py", "pydoc.py", "doctest.py"}
DYNLOAD_SKIP = re.compile(
    r"^(_test|_xx|xx|_ctypes_test|_tkinter|_curses|readline|nis|spwd|ossaudiodev|_dbm|_gdbm"
    r"|_sqlite3|audioop|_crypt)")
LDD_LINE = re.compile(r"^\s*(?:\S+\s+=>\s+)?(/\S+)\s+\(0x[0-9a-f]+\)")


@dataclass(frozen=True)
class Entry:
    """One file of the image's root file system: where it goes and where it comes from."""

    path: PurePosixPath          # absolute path inside the image
    source: Path | None = None   # a host file to copy, or
    data: bytes | None = None    # literal content
    mode: int = 0o644
    is_dir: bool = False
    strip: bool = False          # drop debug sections when writing (the hash uses the source)

    def content(self) -> bytes:
        if self.data is not None:
            return self.data
        assert self.source is not None
        return self.source.read_bytes()

    def final_content(self) -> bytes:
        """The bytes that go into the image: :meth:`content`, debug info stripped if asked."""
        if not self.strip or self.source is None:
            return self.content()
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / self.source.name
            subprocess.run(["strip", "--strip-debug", "-o", str(out), str(self.source)],
                           check=True, capture_output=True)
            return out.read_bytes()


def _pyc_wanted(name: str) -> bool:
    # Only this interpreter's plain bytecode; opt-1/opt-2 and other versions are dead weight.
    tag = sys.implementation.cache_tag
    return name.endswith(f".{tag}.pyc")


def _walk(root: Path, skip_dirs: set[str] | frozenset[str] = frozenset(),
          skip_files: set[str] | frozenset[str] = frozenset()) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs
                             and not (here == root and d.startswith("config-")))
        in_cache = here.name == "__pycache__"
        for name in sorted(filenames):
            if name in skip_files or (in_cache and not _pyc_wanted(name)):
                continue
            if in_cache and name.split(".")[0] + ".py" in skip_files:
                continue
            yield here / name


def _mode(path: Path) -> int:
    return 0o755 if os.access(path, os.X_OK) else 0o644


def stdlib_entries(keep: Iterable[str] = ()) -> list[Entry]:
    """The interpreter's standard library, pruned (but for ``keep``), placed under ``PREFIX``."""
    stdlib = Path(sysconfig.get_paths(vars={"base": sys.base_prefix})["stdlib"])
    dynload = stdlib / "lib-dynload"
    kept = set(keep)
    extensions = tuple(f"_{name}." for name in kept) + tuple(f"{name}." for name in kept)
    entries = []
    for path in _walk(stdlib, (STDLIB_SKIP_DIRS - kept) | {"lib-dynload"},
                      STDLIB_SKIP_FILES):
        entries.append(Entry(PREFIX / "lib" / PYVER / path.relative_to(stdlib).as_posix(),
                             source=path, mode=0o644))
    for path in sorted(dynload.iterdir()):
        if path.suffix == ".so" and (not DYNLOAD_SKIP.match(path.name)
                                     or path.name.startswith(extensions)):
            entries.append(Entry(PREFIX / "lib" / PYVER / "lib-dynload" / path.name,
                                 source=path, mode=0o755))
    return entries


def distribution_closure(roots: Iterable[str], paths: Iterable[str] = ()
                         ) -> list[importlib.metadata.Distribution]:
    """The installed distributions ``roots`` need, following requirements without extras.

    From ``paths`` when given (only there), else from this interpreter's ``sys.path``.
    """
    found: dict[str, importlib.metadata.Distribution] = {}
    todo = list(roots)
    where = list(paths)
    while todo:
        name = todo.pop()
        try:
            if where:
                dist = next(iter(importlib.metadata.distributions(name=name, path=where)))
            else:
                dist = importlib.metadata.distribution(name)
        except (importlib.metadata.PackageNotFoundError, StopIteration):
            # A requirement for another Python version or platform, not installed here.
            continue
        key = dist.metadata["Name"].lower().replace("_", "-")
        if key in found:
            continue
        found[key] = dist
        for requirement in dist.requires or []:
            name_part, _, marker = requirement.partition(";")
            if "extra" in marker:
                continue
            match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", name_part)
            if match:
                todo.append(match.group(1))
    return [found[k] for k in sorted(found)]


def site_entries(spec: ImageSpec) -> list[Entry]:
    """The files of the spec's distribution closure, plus its packages from this tree."""
    entries = []
    for dist in distribution_closure(spec.distributions, spec.site_paths):
        base = Path(str(dist.locate_file("")))
        for rel in dist.files or []:
            parts = PurePosixPath(str(rel)).parts
            if ".." in parts or (parts and parts[-1] == "RECORD"):
                continue
            if "__pycache__" in parts and not _pyc_wanted(parts[-1]):
                continue
            source = base / str(rel)
            if source.is_file():
                entries.append(Entry(SITE / PurePosixPath(str(rel)), source=source,
                                     mode=0o755 if source.suffix == ".so" else 0o644))
    for package in spec.packages:
        for source in sorted((SOURCE_ROOT / package).rglob("*.py")):
            rel = source.relative_to(SOURCE_ROOT).as_posix()
            entries.append(Entry(SITE / rel, source=source))
    for rel, data in spec.files:
        entries.append(Entry(SITE / rel, data=data))
    return entries


def shared_libraries(elf_files: Iterable[Path]) -> dict[PurePosixPath, Path]:
    """Every library ``ldd`` names for ``elf_files``: image path (as named) -> host file."""
    libs: dict[PurePosixPath, Path] = {}
    for elf in elf_files:
        result = subprocess.run(["ldd", str(elf)], capture_output=True, text=True, check=False)
        for line in result.stdout.splitlines():
            match = LDD_LINE.match(line)
            if match:
                libs[PurePosixPath(match.group(1))] = Path(os.path.realpath(match.group(1)))
    return libs


def system_entries(libs: dict[PurePosixPath, Path],
                   user: tuple[str, int] | None = ("sim", SIM_UID)) -> list[Entry]:
    """/etc/passwd and /etc/group (root, and ``user`` if any), and a world-writable /tmp."""
    passwd, group = "root:x:0:0:root:/root:/sbin/nologin\n", "root:x:0:\n"
    if user is not None:
        name, uid = user
        passwd += f"{name}:x:{uid}:{uid}:{name}:/tmp:/sbin/nologin\n"
        group += f"{name}:x:{uid}:\n"
    entries = [
        Entry(PurePosixPath("/etc/passwd"), data=passwd.encode()),
        Entry(PurePosixPath("/etc/group"), data=group.encode()),
        Entry(PurePosixPath("/tmp"), is_dir=True, mode=0o1777),
    ]
    for path, source in sorted(libs.items()):
        entries.append(Entry(path, source=source, mode=0o755))
    return entries


def plan(spec: ImageSpec = SIM) -> tuple[list[Entry], str]:
    """Every entry of the image's root file system, and the Dockerfile that assembles it."""
    python = Path(os.path.realpath(sys.executable))
    entries = [Entry(PREFIX / "bin" / PYVER, source=python, mode=0o755)]
    entries += stdlib_entries(spec.stdlib_keep)
    entries += site_entries(spec)
    elves = [python] + [e.source for e in entries
                        if e.source is not None and e.source.suffix == ".so"]
    libs = shared_libraries(elves)
    # Libraries found next to a site directory's own (RUNPATH $ORIGIN) are already in the
    # image, at their place under SITE.
    roots = [Path(p).resolve() for p in spec.site_paths]
    libs = {path: source for path, source in libs.items()
            if not any(source.is_relative_to(root) for root in roots)}
    # libpython is found through the interpreter's RUNPATH on the host; in the image it sits
    # under PREFIX/lib and LD_LIBRARY_PATH points there.
    moved: dict[PurePosixPath, Path] = {}
    for path, source in libs.items():
        if path.name.startswith("libpython"):
            moved[PREFIX / "lib" / path.name] = source
        else:
            moved[path] = source
    entries += system_entries(moved, spec.user)
    # A source-built interpreter keeps its debug info (libpython alone: ~20 MB of it); the
    # image does not need it.
    # Not the binaries of a site directory's wheels: their builders stripped them, and strip
    # breaks the ones auditwheel patched (numpy's bundled OpenBLAS no longer loads).
    if shutil.which("strip"):
        entries = [dataclasses.replace(e, strip=True)
                   if _is_elf(e) and not (e.source is not None and any(
                       e.source.resolve().is_relative_to(r) for r in roots))
                   else e for e in entries]
    lib_dirs = sorted({str(p.parent) for p in moved})
    entries.sort(key=lambda e: e.path)
    interpreter = f"{PREFIX}/bin/{PYVER}"
    env = [f"PYTHONHOME={PREFIX}", f"PATH={PREFIX}/bin",
           f"LD_LIBRARY_PATH={':'.join(lib_dirs)}", "PYTHONDONTWRITEBYTECODE=1",
           "PYTHONUNBUFFERED=1", *(f"{k}={v}" for k, v in spec.env)]
    lines = ["FROM scratch", "COPY rootfs/ /", "ENV " + " ".join(env)]
    if spec.user is not None:
        lines.append(f"USER {spec.user[1]}:{spec.user[1]}")
    lines.append("WORKDIR /tmp")
    if spec.healthcheck:
        lines.append("HEALTHCHECK --interval=30s --timeout=5s --start-period=30s CMD "
                     + _json_list([interpreter, *spec.healthcheck]))
    lines += [f"ENTRYPOINT {_json_list([interpreter, *spec.entrypoint])}", ""]
    dockerfile = "\n".join(lines)
    return entries, dockerfile


def _json_list(args: list[str]) -> str:
    return "[" + ", ".join(f'"{a}"' for a in args) + "]"


def _is_elf(entry: Entry) -> bool:
    if entry.source is None or entry.is_dir:
        return False
    with entry.source.open("rb") as f:
        return f.read(4) == b"\x7fELF"


def content_hash(entries: list[Entry], dockerfile: str) -> str:
    """A hash of every path, mode and content in the image, and of the Dockerfile."""
    digest = hashlib.sha256(dockerfile.encode())
    for entry in entries:
        digest.update(f"\0{entry.path}\0{entry.mode:o}\0{entry.is_dir}\0{entry.strip}\0"
                      .encode())
        if not entry.is_dir:
            digest.update(hashlib.sha256(entry.content()).digest())
    return digest.hexdigest()[:16]


def write_context(entries: list[Entry], dockerfile: str, fileobj: Any) -> None:
    """The build context: the Dockerfile and the root file system under ``rootfs/``."""
    explicit = {e.path: e for e in entries if e.is_dir}
    parents = {p for e in entries for p in e.path.parents if p != PurePosixPath("/")}
    # Stripping is one process per file: run them side by side.
    to_strip = [e for e in entries if e.strip]
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        stripped = dict(zip([e.path for e in to_strip],
                            pool.map(Entry.final_content, to_strip), strict=True))
    with tarfile.open(fileobj=fileobj, mode="w") as tar:
        _add_bytes(tar, "Dockerfile", dockerfile.encode(), 0o644)
        for directory in sorted(parents | set(explicit)):
            info = tarfile.TarInfo(f"rootfs{directory}")
            info.type = tarfile.DIRTYPE
            info.mode = explicit[directory].mode if directory in explicit else 0o755
            info.mtime = int(time.time())
            tar.addfile(info)
        for entry in entries:
            if entry.is_dir:
                continue
            # Keep the sources' mtimes so the bytecode next to them stays valid.
            mtime = entry.source.stat().st_mtime if entry.source is not None else None
            data = stripped[entry.path] if entry.strip else entry.content()
            _add_bytes(tar, f"rootfs{entry.path}", data, entry.mode, mtime)


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mode: int,
               mtime: float | None = None) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), mode, int(mtime or time.time())
    tar.addfile(info, io.BytesIO(data))


def build_image(docker_host: str | None, *, tag: str = "aivmm-sim", quiet: bool = False) -> str:
    """Build (or reuse) the sim image on the engine at ``docker_host`` (None: DOCKER_HOST).

    Returns the content-addressed reference ``{tag}:{hash}``; ``{tag}:latest`` points at it too.
    """
    return build_spec(docker_host, SIM, tag=tag, quiet=quiet)


def build_spec(docker_host: str | None, spec: ImageSpec, *, tag: str | None = None,
               quiet: bool = False, extra_tags: Iterable[str] = ("latest",)) -> str:
    """Build (or reuse) ``spec``'s image; returns ``{tag}:{hash}``, also tagged ``extra_tags``."""
    tag = tag or spec.name
    extra = tuple(extra_tags)

    def say(message: str) -> None:
        if not quiet:
            print(f"{spec.name}: {message}", flush=True)

    started = time.monotonic()
    # Connect first: no engine should fail before any work is done.
    client = (docker.APIClient(base_url=docker_host, version="auto") if docker_host
              else docker.APIClient(version="auto", **_env_kwargs()))
    try:
        say("collecting the interpreter's closure")
        entries, dockerfile = plan(spec)
        digest = content_hash(entries, dockerfile)
        size = sum(e.source.stat().st_size if e.source else len(e.data or b"")
                   for e in entries)
        say(f"{len(entries)} files, {size / 2**20:.1f} MiB before stripping, "
            f"content hash {digest}")
        reference = f"{tag}:{digest}"
        existing = client.images(filters={"label": f"{HASH_LABEL}={digest}"}, quiet=True)
        if existing:
            client.tag(existing[0], tag, digest)
            for name in extra:
                client.tag(existing[0], tag, name)
            say(f"{reference} is up to date ({existing[0][:19]}): nothing to build")
            return reference
        with tempfile.TemporaryFile() as context:
            write_context(entries, dockerfile, context)
            context.seek(0)
            say(f"building {reference}")
            image_id = None
            for event in client.build(fileobj=context, custom_context=True, tag=reference,
                                      labels={HASH_LABEL: digest}, rm=True, forcerm=True,
                                      decode=True):
                if "error" in event:
                    raise RuntimeError(f"image build failed: {event['error'].strip()}")
                line = event.get("stream", "").strip()
                if line:
                    say(f"  {line}")
                if "aux" in event and "ID" in event["aux"]:
                    image_id = event["aux"]["ID"]
        image_id = image_id or client.inspect_image(reference)["Id"]
        for name in extra:
            client.tag(image_id, tag, name)
        say(f"built {reference} ({image_id[:19]}) in {time.monotonic() - started:.1f}s")
        return reference
    finally:
        client.close()


def _env_kwargs() -> dict[str, Any]:
    host = os.environ.get("DOCKER_HOST")
    return {"base_url": host} if host else {}


def main(argv: list[str] | None = None) -> None:
    """``python -m devtools.image``: build the sim image and print its reference."""
    parser = argparse.ArgumentParser(prog="python -m devtools.image", description=__doc__)
    parser.add_argument("--docker-host", default=os.environ.get("DOCKER_HOST"),
                        help="engine URL, e.g. unix:///run/docker.sock (default DOCKER_HOST)")
    parser.add_argument("--tag", default="aivmm-sim", help="repository name (default aivmm-sim)")
    parser.add_argument("--quiet", action="store_true", help="print only the reference")
    args = parser.parse_args(argv)
    try:
        reference = build_image(args.docker_host, tag=args.tag, quiet=args.quiet)
    except (docker.errors.DockerException, RuntimeError) as err:
        print(f"sim-image: {err}", file=sys.stderr)
        sys.exit(1)
    print(reference)


if __name__ == "__main__":
    main()
