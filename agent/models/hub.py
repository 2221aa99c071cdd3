"""The hub's API, through huggingface_hub: which files a model revision has, their sizes and
hashes. huggingface_hub's calls block, so they run in a thread; nothing else imports it.

The files themselves are fetched by :mod:`agent.models.download` (aiohttp, against the same
``/{repo}/resolve/{revision}/{path}`` URLs huggingface_hub uses), because huggingface_hub has
no bandwidth bound. The token is passed to huggingface_hub and put in request headers only;
it is never logged, and :func:`redact` takes it out of any error text that quotes it.
"""

from __future__ import annotations

import asyncio
import fnmatch
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

DEFAULT_ENDPOINT = "https://huggingface.co"
# org/name: the form of a hub repository id.
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
# When a repository has .safetensors weights, engines load those: the same weights in other
# formats (and Meta's original/ checkpoints) are not fetched.
OTHER_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.onnx",
                 "*.onnx_data", "*.gguf", "*.tflite", "*.ot", "original/*")


class HubError(Exception):
    """The hub could not be asked, or said no; the message is safe to show (no token)."""

    def __init__(self, message: str, *, retry: bool = True) -> None:
        super().__init__(message)
        self.retry = retry  # False: asking again will not help (no such repo or file)


@dataclass(frozen=True, slots=True)
class HubFile:
    """One file of a revision: where it goes in the snapshot and the blob it is."""

    path: str
    size: int
    # The blob name in the hub cache: the sha256 of an LFS file, the git blob sha1 otherwise
    # (what huggingface_hub names its blobs after: the X-Linked-Etag or the ETag).
    etag: str
    sha256: str | None = None  # LFS files: their content's sha256


@dataclass(frozen=True, slots=True)
class Listing:
    repo: str
    revision: str  # the commit the files are from
    files: list[HubFile] = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


@dataclass(frozen=True, slots=True)
class Target:
    """What a deployment's model id asks to fetch: a whole repository, or one GGUF file."""

    model: str
    repo: str
    revision: str = "main"
    file: str | None = None  # a GGUF file of the repository


def target(model: str) -> Target | None:
    """The hub target of a model id, or None for one that is not fetched (a plain name).

    ``org/name`` is a repository; ``org/name/path/file.gguf`` one GGUF file of it.
    """
    if REPO_ID.match(model):
        return Target(model, model)
    parts = model.split("/")
    if len(parts) >= 3 and model.lower().endswith(".gguf") and REPO_ID.match("/".join(parts[:2])) \
            and ".." not in parts and "" not in parts:
        return Target(model, "/".join(parts[:2]), file="/".join(parts[2:]))
    return None


@dataclass(frozen=True, slots=True)
class HubSettings:
    endpoint: str
    token: str | None = None

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def file_url(self, repo: str, revision: str, path: str) -> str:
        return f"{self.endpoint}/{repo}/resolve/{quote(revision, safe='')}/{quote(path)}"

    def redact(self, text: str) -> str:
        return text.replace(self.token, "<token>") if self.token else text

    def __repr__(self) -> str:  # a settings object in a log line never shows the token
        return f"HubSettings(endpoint={self.endpoint!r}, token={'set' if self.token else None})"


def settings(endpoint: str | None, token_file: str | None) -> HubSettings:
    """The hub to ask: the config's endpoint, else HF_ENDPOINT, else huggingface.co; the token
    from ``token_file``, else HF_TOKEN (or the older HUGGING_FACE_HUB_TOKEN)."""
    url = (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    token: str | None = None
    if token_file:
        token = Path(token_file).read_text().strip() or None
    else:
        token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or None
    return HubSettings(url, token)


def choose(files: list[HubFile], t: Target) -> list[HubFile]:
    """The files of a listing the target needs (see OTHER_WEIGHTS)."""
    if t.file is not None:
        return [f for f in files if f.path == t.file]
    if not any(f.path.endswith(".safetensors") for f in files):
        return list(files)
    return [f for f in files if not any(fnmatch.fnmatch(f.path, p) for p in OTHER_WEIGHTS)]


def _list_blocking(hub: HubSettings, t: Target, timeout: float) -> Listing:
    # No version check or telemetry call to huggingface.co (an air-gapped node would wait).
    os.environ.setdefault("HF_HUB_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    api = HfApi(endpoint=hub.endpoint, token=hub.token or False)
    try:
        info = api.model_info(t.repo, revision=t.revision, files_metadata=True, timeout=timeout)
    except (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError) as err:
        raise HubError(hub.redact(f"{t.repo}@{t.revision}: {type(err).__name__}: "
                                  f"{str(err).splitlines()[0]}"), retry=False) from None
    except HfHubHTTPError as err:
        raise HubError(hub.redact(f"hub error for {t.repo}: {str(err).splitlines()[0]}")
                       ) from None
    except Exception as err:  # httpx/OS errors: the hub could not be reached
        raise HubError(hub.redact(f"cannot reach the hub at {hub.endpoint}: "
                                  f"{type(err).__name__}: {err}")) from None
    files = []
    for s in info.siblings or []:
        if s.lfs is not None:
            files.append(HubFile(s.rfilename, s.lfs.size, s.lfs.sha256, s.lfs.sha256))
        elif s.blob_id is not None and s.size is not None:
            files.append(HubFile(s.rfilename, s.size, s.blob_id))
        else:
            raise HubError(f"{t.repo}: the hub listed {s.rfilename!r} without size or hash")
    if not info.sha:
        raise HubError(f"{t.repo}: the hub named no commit for {t.revision}")
    chosen = choose(files, t)
    if t.file is not None and not chosen:
        raise HubError(f"{t.repo}@{info.sha[:12]} has no file {t.file!r}", retry=False)
    return Listing(t.repo, info.sha, chosen)


async def list_files(hub: HubSettings, t: Target, http_timeout: float = 30.0) -> Listing:
    """The files of the target's revision (raises HubError)."""
    return await asyncio.to_thread(_list_blocking, hub, t, http_timeout)
