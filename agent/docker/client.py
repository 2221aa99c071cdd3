"""The one module that imports the Docker SDK: an asyncio adapter over a thread executor.

Every SDK call blocks, so each runs in the loop's executor. Docker's event stream is read on
a dedicated thread and handed to the loop with ``call_soon_threadsafe``; when the engine goes
away the thread reconnects with backoff and says so, so the supervisor re-lists containers
and misses no change that happened while it was blind.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import docker
import docker.errors
import requests.exceptions
from docker.types import DeviceRequest, LogConfig

from agent.docker.observed import ObservedContainer, observe
from agent.docker.spec import LABEL_MANAGED, LABEL_NODE, ContainerSpec
from common.backoff import Backoff

log = logging.getLogger(__name__)
T = TypeVar("T")


class DockerUnavailable(Exception):
    """The engine did not answer; the caller retries later."""


class DockerFailed(Exception):
    """The engine refused a request; the message is for the backend record."""


class ImageMissing(DockerFailed):
    """The backend's image is not on this node (no registry pulls are attempted)."""


@dataclass(frozen=True, slots=True)
class ContainerEvent:
    """A container event from the engine: die, oom, start, health_status: healthy, ..."""

    action: str
    container_id: str
    node: str
    backend: str


@dataclass(frozen=True, slots=True)
class Reconnected:
    """The event stream was broken and is back: anything may have changed meanwhile."""


Event = ContainerEvent | Reconnected


def device_requests(spec: ContainerSpec) -> list[DeviceRequest] | None:
    """The NVIDIA device request for the spec's GPU uuids (what the container toolkit maps)."""
    if not spec.nvidia_device_ids:
        return None
    return [DeviceRequest(driver="nvidia", device_ids=list(spec.nvidia_device_ids),
                          capabilities=[["gpu"]])]


def _translate(err: Exception) -> Exception:
    if isinstance(err, docker.errors.ImageNotFound):
        return ImageMissing(f"image not found: {err.explanation or err}")
    if isinstance(err, docker.errors.APIError):
        return DockerFailed(str(err.explanation or err))
    if isinstance(err, requests.exceptions.ConnectionError | requests.exceptions.Timeout
                  | docker.errors.DockerException | OSError):
        return DockerUnavailable(f"docker engine unreachable: {err}")
    return err


class DockerAdapter:
    """Async access to one Docker engine, restricted to aivmm-managed containers."""

    def __init__(self, base_url: str | None, *, timeout: int = 30) -> None:
        self._base_url = base_url or "unix:///var/run/docker.sock"
        self._timeout = timeout
        self._client: docker.DockerClient | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._stream: Any = None

    def _docker(self) -> docker.DockerClient:
        # "auto" asks the engine for its API version, so a 1.41 engine is spoken to in 1.41.
        with self._lock:
            if self._client is None:
                self._client = docker.DockerClient(base_url=self._base_url, version="auto",
                                                   timeout=self._timeout)
            return self._client

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(None, functools.partial(fn, *args, **kwargs))
        except Exception as err:
            raise _translate(err) from err

    def _list(self, node: str) -> list[ObservedContainer]:
        api = self._docker().api
        filters = {"label": [f"{LABEL_MANAGED}=true", f"{LABEL_NODE}={node}"]}
        found = []
        for summary in api.containers(all=True, filters=filters):
            try:
                seen = observe(api.inspect_container(summary["Id"]))
            except docker.errors.NotFound:
                continue  # removed between the listing and the inspect
            if seen is not None:
                found.append(seen)
        return found

    async def list_managed(self, node: str) -> list[ObservedContainer]:
        """This node's aivmm containers, running or not."""
        return await self._call(self._list, node)

    def _create(self, spec: ContainerSpec) -> str:
        client = self._docker()
        container = client.containers.create(
            spec.image, spec.command or None, entrypoint=spec.entrypoint, name=spec.name,
            environment=spec.env, labels=spec.labels, network_mode=spec.network,
            ports=spec.ports or None, devices=spec.devices or None,
            group_add=spec.group_add or None, volumes=spec.volumes, mem_limit=spec.mem_limit,
            nano_cpus=spec.nano_cpus, cpuset_cpus=spec.cpuset_cpus,
            security_opt=spec.security_opt, privileged=False, device_requests=device_requests(spec),
            cap_drop=spec.cap_drop, cap_add=spec.cap_add or None, pids_limit=spec.pids_limit,
            log_config=LogConfig(type=str(spec.log_config["type"]),
                                 config=spec.log_config["config"]),  # type: ignore[arg-type]
            detach=True)
        return container.id  # type: ignore[return-value]  # stubs: None only before create

    async def create(self, spec: ContainerSpec) -> str:
        """Create (not start) the container; returns its id."""
        return await self._call(self._create, spec)

    async def start(self, container_id: str) -> None:
        await self._call(lambda: self._docker().api.start(container_id))

    def _remove(self, container_id: str, stop_timeout: int) -> None:
        api = self._docker().api
        with contextlib.suppress(docker.errors.NotFound):
            api.stop(container_id, timeout=stop_timeout)
            api.remove_container(container_id, force=True)

    async def remove(self, container_id: str, *, stop_timeout: int = 10) -> None:
        """Stop the engine cleanly (SIGTERM, then SIGKILL after the timeout) and remove it."""
        await self._call(self._remove, container_id, stop_timeout)

    async def close(self) -> None:
        self._stop.set()
        stream = self._stream
        if stream is not None:
            with contextlib.suppress(Exception):
                await asyncio.get_running_loop().run_in_executor(None, stream.close)
        if self._client is not None:
            await self._call(self._client.close)

    async def events(self) -> AsyncIterator[Event]:
        """Managed containers' events, forever; a ``Reconnected`` after every gap."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()
        stop = threading.Event()

        def deliver(item: Event) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed while we were reading
                loop.call_soon_threadsafe(queue.put_nowait, item)

        thread = threading.Thread(target=self._read_events, args=(deliver, stop),
                                  name="docker-events", daemon=True)
        thread.start()
        try:
            while True:
                yield await queue.get()
        finally:
            stop.set()
            stream = self._stream
            if stream is not None:
                with contextlib.suppress(Exception):
                    stream.close()

    def _read_events(self, deliver: Callable[[Event], None], stop: threading.Event) -> None:
        retry = Backoff(initial=0.2, cap=2.0)
        first = True
        while not stop.is_set() and not self._stop.is_set():
            try:
                stream = self._docker().events(
                    decode=True,
                    filters={"type": "container", "label": [f"{LABEL_MANAGED}=true"]})
                self._stream = stream
                if not first:
                    log.info("docker event stream reconnected")
                    deliver(Reconnected())
                first = False
                retry.reset()
                for raw in stream:
                    if stop.is_set():
                        return
                    attrs = (raw.get("Actor") or {}).get("Attributes") or {}
                    deliver(ContainerEvent(raw.get("Action", ""), raw.get("id", ""),
                                           attrs.get(LABEL_NODE, ""),
                                           attrs.get("aivmm.backend", "")))
            except Exception as err:  # the engine went away: retry, whatever the error
                if stop.is_set() or self._stop.is_set():
                    return
                log.warning("docker event stream broken: %s", err)
            first = False
            # A stream that ended is a restarting engine too; wait before asking again.
            with self._lock:
                if self._client is not None:
                    with contextlib.suppress(Exception):
                        self._client.close()
                    self._client = None
            if stop.wait(retry.next()):
                return
