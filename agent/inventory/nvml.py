"""The one module that talks to NVML (``pynvml`` from nvidia-ml-py).

:class:`NvmlApi` is the small surface the NVIDIA detector needs; :class:`Pynvml` implements
it over the real library and translates NVML's errors into three of ours, so the detector
(and its tests, which pass a double) never see pynvml.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar, cast

import pynvml

T = TypeVar("T")


class NvmlError(Exception):
    """An NVML call failed (the GPU fell off the bus, a driver/library mismatch, …)."""


class NvmlNotSupported(NvmlError):
    """This GPU or driver does not expose the value: the field is null."""


class NvmlUnavailable(NvmlError):
    """No NVIDIA driver or NVML library on this machine: zero NVIDIA GPUs, not a failure."""


@dataclass(frozen=True, slots=True)
class MemoryInfo:
    """Device memory in bytes."""

    total: int
    used: int


class NvmlApi(Protocol):
    """What the NVIDIA detector asks of NVML; devices are addressed by NVML index."""

    def init(self) -> None:
        """Initialise NVML; raises NvmlUnavailable where there is no driver."""
        ...

    def shutdown(self) -> None: ...
    def driver_version(self) -> str: ...
    def device_count(self) -> int: ...
    def name(self, index: int) -> str: ...
    def uuid(self, index: int) -> str: ...
    def pci_bus_id(self, index: int) -> str: ...

    def memory(self, index: int) -> MemoryInfo:
        """nvmlDeviceGetMemoryInfo (v1): its "used" includes driver-reserved memory."""
        ...

    def memory_v2(self, index: int) -> MemoryInfo:
        """nvmlDeviceGetMemoryInfo_v2: "used" without reserved memory, as nvidia-smi shows."""
        ...

    def utilization_percent(self, index: int) -> int: ...
    def temperature_c(self, index: int) -> int: ...
    def power_mw(self, index: int) -> int: ...

    def mig_mode(self, index: int) -> int:
        """Current MIG mode: 1 enabled, 0 disabled; NvmlNotSupported on GPUs without MIG."""
        ...


_UNAVAILABLE = (pynvml.NVMLError_LibraryNotFound, pynvml.NVMLError_DriverNotLoaded,
                pynvml.NVMLError_NoPermission)
_NOT_SUPPORTED = (pynvml.NVMLError_NotSupported, pynvml.NVMLError_FunctionNotFound,
                  pynvml.NVMLError_NotFound)


def _call(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except _NOT_SUPPORTED as err:
        raise NvmlNotSupported(str(err)) from None
    except pynvml.NVMLError as err:
        raise NvmlError(str(err)) from None


class Pynvml:
    """:class:`NvmlApi` over the real NVML library."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._initialised = False
        self._handles: dict[int, object] = {}

    def init(self) -> None:
        with self._lock:
            if self._initialised:
                return
            try:
                pynvml.nvmlInit()
            except _UNAVAILABLE as err:
                raise NvmlUnavailable(str(err)) from None
            except pynvml.NVMLError as err:
                raise NvmlError(str(err)) from None
            self._initialised = True
            self._handles.clear()

    def shutdown(self) -> None:
        with self._lock:
            if self._initialised:
                self._initialised = False
                self._handles.clear()
                # Nothing is left to release if the driver went away meanwhile.
                with contextlib.suppress(pynvml.NVMLError):
                    pynvml.nvmlShutdown()

    def _handle(self, index: int) -> object:
        handle = self._handles.get(index)
        if handle is None:
            handle = _call(lambda: pynvml.nvmlDeviceGetHandleByIndex(index))
            self._handles[index] = handle
        return handle

    def driver_version(self) -> str:
        return cast(str, _call(pynvml.nvmlSystemGetDriverVersion))

    def device_count(self) -> int:
        self._handles.clear()  # indexes may now name other GPUs (hot-plug, reset)
        return cast(int, _call(pynvml.nvmlDeviceGetCount))

    def name(self, index: int) -> str:
        return cast(str, _call(lambda: pynvml.nvmlDeviceGetName(self._handle(index))))

    def uuid(self, index: int) -> str:
        return cast(str, _call(lambda: pynvml.nvmlDeviceGetUUID(self._handle(index))))

    def pci_bus_id(self, index: int) -> str:
        info = _call(lambda: pynvml.nvmlDeviceGetPciInfo(self._handle(index)))
        bus_id = info.busId
        return bus_id.decode() if isinstance(bus_id, bytes) else str(bus_id)

    def memory(self, index: int) -> MemoryInfo:
        info = _call(lambda: pynvml.nvmlDeviceGetMemoryInfo(self._handle(index)))
        return MemoryInfo(total=int(info.total), used=int(info.used))

    def memory_v2(self, index: int) -> MemoryInfo:
        info = _call(lambda: pynvml.nvmlDeviceGetMemoryInfo(
            self._handle(index), version=pynvml.nvmlMemory_v2))
        return MemoryInfo(total=int(info.total), used=int(info.used))

    def utilization_percent(self, index: int) -> int:
        return int(_call(lambda: pynvml.nvmlDeviceGetUtilizationRates(self._handle(index))).gpu)

    def temperature_c(self, index: int) -> int:
        return int(_call(lambda: pynvml.nvmlDeviceGetTemperature(
            self._handle(index), pynvml.NVML_TEMPERATURE_GPU)))

    def power_mw(self, index: int) -> int:
        return int(_call(lambda: pynvml.nvmlDeviceGetPowerUsage(self._handle(index))))

    def mig_mode(self, index: int) -> int:
        return int(_call(lambda: pynvml.nvmlDeviceGetMigMode(self._handle(index)))[0])
