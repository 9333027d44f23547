"""CUDA memory for the shuffle: memory hooks, registries, GPU probing.

Importing this module imports neither CuPy nor RMM; they are imported on first use,
i.e. when a device frame is allocated or a GPU is probed. Everything that only
*inspects* device memory works from ``__cuda_array_interface__`` (CAI) alone, so it is
pure and testable with fake device arrays backed by host memory.

* ``cuda_hooks(allocate=...)``: ``MemoryHooks`` for ``"cuda"`` memory. ``owns``: the
  object exposes CAI; ``wrap``: a flat ``|u1`` CAI view over the same device memory
  (no copy, keeps the owner alive); ``nbytes`` from the CAI; ``allocate``: an
  uninitialised device buffer, ``rmm.DeviceBuffer`` when RMM can allocate in this
  process (so RMM pools are used), else ``cupy.empty(n, "u1")``.
* ``cuda_registry()`` / ``registry_for(mode)``: ``HOST_REGISTRY`` extended with those
  hooks, or (mode ``"host"``, or no usable GPU) with hooks that recognise device
  objects but refuse to send or receive them, naming the setting to change.

Receive allocators are in ``shuffle.device._allocator``, the device settings
(``DeviceOptions``, modes) in ``shuffle.device._options``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from typing import Any, Literal

from shuffle.device._cai import cai_nbytes, is_device_object
from shuffle.device._options import CONFIG_KEY, DEVICE_MODES, DeviceMode, DeviceUnavailableError
from shuffle.wire._memory import HOST_REGISTRY, MemoryHooks, MemoryRegistry, MemoryType

__all__ = [
    "GpuStatus",
    "cuda_hooks",
    "cuda_registry",
    "gpu_status",
    "import_cupy",
    "refusing_cuda_hooks",
    "registry_for",
]

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------- views


class _FlatDeviceView:
    """A 1-D ``|u1`` CAI over another device object's memory; keeps that object alive.

    This is what device payloads travel as: transports need a flat byte buffer, and a
    view avoids copying (and avoids importing the library that made the object).
    """

    __slots__ = ("__cuda_array_interface__", "owner")

    def __init__(self, owner: Any) -> None:
        cai = owner.__cuda_array_interface__
        nbytes = cai_nbytes(cai)
        pointer, read_only = cai["data"]
        self.owner = owner
        self.__cuda_array_interface__ = {
            "version": 3,
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (int(pointer), bool(read_only)),
            "strides": None,
            # The producer's stream: consumers synchronise on it before reading (CAI v3).
            "stream": cai.get("stream"),
        }

    def __repr__(self) -> str:
        return f"<device view of {self.__cuda_array_interface__['shape'][0]} bytes>"


def _wrap(obj: Any) -> Any:
    cai = obj.__cuda_array_interface__
    if cai.get("typestr") == "|u1" and len(cai.get("shape", ())) == 1 and not cai.get("strides"):
        return obj  # already flat bytes
    return _FlatDeviceView(obj)


def _nbytes(obj: Any) -> int:
    return cai_nbytes(obj.__cuda_array_interface__)


# --------------------------------------------------------------------------- GPU probing


@dataclasses.dataclass(frozen=True)
class GpuStatus:
    """Whether this process can allocate device memory, and with what."""

    usable: bool
    backend: Literal["rmm", "cupy", "none"]
    reason: str  # why not, when not usable


def _probe() -> GpuStatus:
    """Allocate one byte of device memory with RMM, else CuPy. Imports them lazily."""
    reasons = []
    try:
        import rmm

        rmm.DeviceBuffer(size=1)
        return GpuStatus(True, "rmm", "")
    except Exception as e:  # noqa: BLE001 -- ImportError, CUDA runtime/driver errors
        reasons.append(f"rmm: {type(e).__name__}: {e}")
    try:
        import cupy

        cupy.empty(1, dtype="u1")
        return GpuStatus(True, "cupy", "")
    except Exception as e:  # noqa: BLE001 -- as above
        reasons.append(f"cupy: {type(e).__name__}: {e}")
    return GpuStatus(False, "none", "; ".join(reasons))


@functools.cache
def gpu_status() -> GpuStatus:
    """This process's GPU status, probed once (importing RMM/CuPy on first call)."""
    return _probe()


def _default_device_allocate(nbytes: int) -> Any:
    status = gpu_status()
    if status.backend == "rmm":
        import rmm

        return rmm.DeviceBuffer(size=nbytes)
    if status.backend == "cupy":
        import cupy

        return cupy.empty(nbytes, dtype="u1")
    raise DeviceUnavailableError(
        f"cannot allocate {nbytes} bytes of device memory: this process has no usable GPU "
        f"({status.reason})"
    )


# --------------------------------------------------------------------------- hooks


def cuda_hooks(*, allocate: Callable[[int], Any] | None = None) -> MemoryHooks:
    """Hooks for ``"cuda"`` memory; ``allocate`` defaults to RMM, else CuPy (lazily)."""
    return MemoryHooks(
        owns=is_device_object,
        wrap=_wrap,
        nbytes=_nbytes,
        allocate=_default_device_allocate if allocate is None else allocate,
    )


def refusing_cuda_hooks(reason: str) -> MemoryHooks:
    """Hooks that recognise device objects but refuse to send or allocate them.

    With them a device payload fails with ``reason`` instead of the generic "neither a
    host buffer nor a registered memory type".
    """

    def refuse(_: Any) -> Any:
        raise DeviceUnavailableError(reason)

    return MemoryHooks(owns=is_device_object, wrap=refuse, nbytes=_nbytes, allocate=refuse)


def cuda_registry(*, allocate: Callable[[int], Any] | None = None) -> MemoryRegistry:
    """``HOST_REGISTRY`` with ``cuda_hooks``: host and device payloads both travel."""
    return HOST_REGISTRY.with_hooks(MemoryType.CUDA, cuda_hooks(allocate=allocate))


def registry_for(
    mode: DeviceMode, *, allocate: Callable[[int], Any] | None = None
) -> MemoryRegistry:
    """The registry a process uses under ``mode``.

    Nothing is probed here: under ``auto`` and ``cuda`` the device hooks only import
    RMM/CuPy when they allocate, so CPU-only processes that never see a device payload
    never pay for (or fail on) a GPU import.
    """
    if mode == "host":
        return HOST_REGISTRY.with_hooks(
            MemoryType.CUDA,
            refusing_cuda_hooks(
                f"device (GPU) payloads are disabled ({CONFIG_KEY}: host); set it to auto or "
                "cuda to move GPU partitions device-to-device, or convert them to host "
                "objects (cupy.asnumpy, cudf.DataFrame.to_pandas) before the shuffle"
            ),
        )
    if mode in ("auto", "cuda"):
        return cuda_registry(allocate=allocate)
    raise ValueError(f"device mode must be one of {DEVICE_MODES}, got {mode!r}")


def import_cupy() -> Any:
    """CuPy, imported now; ``DeviceUnavailableError`` (saying why) where it cannot be."""
    try:
        import cupy
    except Exception as e:  # noqa: BLE001 -- ImportError, or CUDA libraries failing to load
        raise DeviceUnavailableError(
            f"received a CuPy array, but CuPy cannot be imported here ({e!r})"
        ) from None
    return cupy
