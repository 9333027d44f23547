"""Device (CUDA) memory for the shuffle: memory hooks, receive allocators, GPU probing.

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
* ``transport_allocator(registry, where=...)``: the ``TransportConfig.allocator`` that
  receives every frame into memory of its announced kind. A device frame at a process
  that cannot hold device memory is never used as data: either the connection fails
  with a ``ProtocolError`` that says why, or (``drain_refused=True``, what actors use)
  it is drained into a ``RefusedFrame`` so that the receiver can answer the sender with
  the reason and the connection stays in step (``refused_reason``).
* ``actor_num_gpus(...)``: how many GPUs a shuffle actor reserves on a node (pure).
* ``DeviceOptions``: the device settings of one shuffle service (mode, GPUs per
  actor, what unpack returns for device partitions).

Device mode, per process (``DeviceOptions.mode``):

``"auto"``  device frames are sent and received where a GPU is usable; the GPU
            libraries are only imported when the first device frame arrives.
``"cuda"``  like auto, but shuffle actors probe their GPU at start and fail loudly
            without one.
``"host"``  device payloads are refused (clear error naming this setting).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any, Literal, TypeAlias

from shuffle._exceptions import ShuffleError
from shuffle._serialize import HOST_REGISTRY, MemoryHooks, MemoryRegistry, MemoryType
from shuffle._transport import Allocator, ProtocolError

__all__ = [
    "CONFIG_KEY",
    "DEFAULT_DEVICE_OPTIONS",
    "DeviceMode",
    "DeviceOptions",
    "DeviceUnavailableError",
    "GpuStatus",
    "RefusedFrame",
    "ResultMemory",
    "actor_num_gpus",
    "cai_nbytes",
    "cuda_hooks",
    "cuda_registry",
    "device_allocator",
    "gpu_status",
    "is_device_object",
    "payload_nbytes",
    "refused_reason",
    "refusing_cuda_hooks",
    "registry_for",
    "transport_allocator",
]

logger = logging.getLogger(__name__)

DeviceMode: TypeAlias = Literal["auto", "host", "cuda"]
#: What ``unpack`` returns for a device partition: the device object itself (Ray then
#: pickles it, which copies it to host memory in the object store and back to a GPU
#: where it is read), or an explicit host copy (numpy / pandas), readable anywhere.
ResultMemory: TypeAlias = Literal["device", "host"]
DEVICE_MODES: tuple[str, ...] = ("auto", "host", "cuda")
RESULT_MEMORIES: tuple[str, ...] = ("device", "host")
#: The dask config key users change; named in every refusal.
CONFIG_KEY = "ray-oob-sched.shuffle.device"


class DeviceUnavailableError(ShuffleError, RuntimeError):
    """Device memory was needed where it cannot be used (no GPU, or mode ``host``)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeviceOptions:
    """Device settings of one shuffle service, shared by its actors and senders."""

    mode: DeviceMode = "auto"
    #: GPUs each shuffle actor reserves on a node that has GPUs (see ``actor_num_gpus``).
    actor_num_gpus: float = 0.01
    #: What ``unpack`` returns for a device partition (see ``ResultMemory``).
    results: ResultMemory = "device"

    def __post_init__(self) -> None:
        if self.mode not in DEVICE_MODES:
            raise ValueError(f"device mode must be one of {DEVICE_MODES}, got {self.mode!r}")
        if self.results not in RESULT_MEMORIES:
            raise ValueError(
                f"device results must be one of {RESULT_MEMORIES}, got {self.results!r}"
            )
        gpus = self.actor_num_gpus
        if isinstance(gpus, bool) or not isinstance(gpus, (int, float)) or not 0 <= gpus <= 1:
            raise ValueError(f"actor_num_gpus must be a number in [0, 1], got {gpus!r}")


DEFAULT_DEVICE_OPTIONS = DeviceOptions()


# --------------------------------------------------------------------------- CAI


def is_device_object(obj: Any) -> bool:
    """Whether ``obj`` exposes device memory (CuPy, RMM, Numba, cuDF buffers)."""
    return hasattr(obj, "__cuda_array_interface__")


def cai_nbytes(cai: Mapping[str, Any]) -> int:
    """Bytes of a C-contiguous CAI buffer; ``ValueError`` for strided or bad ones."""
    try:
        shape = tuple(int(n) for n in cai["shape"])
        typestr = str(cai["typestr"])
        itemsize = int(typestr[2:])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"not a valid __cuda_array_interface__ ({e!r}): {dict(cai)!r}") from None
    nbytes = itemsize * math.prod(shape)
    strides = cai.get("strides")
    if strides is not None and nbytes:
        expected = []
        step = itemsize
        for extent in reversed(shape):
            expected.append(step)
            step *= extent
        # Extents of 1 may carry any stride (NumPy and CuPy both produce such views).
        pairs = zip(strides, reversed(expected), shape, strict=True)
        if any(got != want for got, want, extent in pairs if extent != 1):
            raise ValueError(
                f"device buffer of shape {shape} and strides {tuple(strides)} is not "
                "C-contiguous; make it contiguous first (e.g. cupy.ascontiguousarray)"
            )
    return nbytes


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


def payload_nbytes(registry: MemoryRegistry) -> Callable[[Any], int]:
    """Measures a host or device payload (for send budgets and stores)."""

    def nbytes(payload: Any) -> int:
        return registry.hooks(registry.memory_type_of(payload)).nbytes(payload)

    return nbytes


# --------------------------------------------------------------------------- allocators


def device_allocator(allocate: Callable[[int], Any]) -> Callable[[int], Any]:
    """``allocate`` checked: the buffer must be device memory of exactly ``nbytes``."""

    def checked(nbytes: int) -> Any:
        buffer = allocate(nbytes)
        if not is_device_object(buffer):
            raise TypeError(
                f"device allocator {allocate!r} returned a {type(buffer).__name__}, which "
                "does not expose __cuda_array_interface__"
            )
        got = _nbytes(buffer)
        if got != nbytes:
            raise ValueError(f"device allocator {allocate!r} returned {got} bytes, not {nbytes}")
        return buffer

    return checked


class RefusedFrame(bytearray):
    """Host scratch that a refused device frame was drained into; never data.

    Receiving the bytes keeps the connection in step, so the receiver can answer the
    sender with ``reason`` instead of dropping the connection.
    """

    def __init__(self, nbytes: int, reason: str) -> None:
        super().__init__(nbytes)
        self.reason = reason


def refused_reason(frames: Any) -> str | None:
    """The reason of the first ``RefusedFrame`` among ``frames``, if any."""
    for frame in frames:
        if isinstance(frame, RefusedFrame):
            return frame.reason
    return None


def transport_allocator(
    registry: MemoryRegistry, *, where: str, drain_refused: bool = False
) -> Allocator:
    """A ``TransportConfig.allocator`` receiving each frame into its announced memory.

    Host frames become ``bytearray``s (what the transports use by default). For a
    frame whose memory cannot be allocated here the reason names ``where`` and what to
    change. By default that raises ``ProtocolError``: the transport drops the
    connection and the sender sees only a broken connection. With ``drain_refused``
    the frame is received into a ``RefusedFrame`` (host scratch of its size) instead,
    for the receiver to turn into a reply (see ``refused_reason``).
    """

    def allocate(nbytes: int, memory_type: str) -> Any:
        if memory_type == "host":
            return bytearray(nbytes)
        try:
            hooks = registry.hooks(memory_type)
            buffer = device_allocator(hooks.allocate)(nbytes)
        except (LookupError, ValueError, TypeError, DeviceUnavailableError) as e:
            reason = (
                f"{where} cannot receive a {memory_type!r} frame of {nbytes} bytes: {e}. "
                "Run the shuffle actors on GPU nodes (they reserve ray-oob-sched.shuffle."
                "actor-num-gpus there) or send host partitions"
            )
            if drain_refused:
                return RefusedFrame(nbytes, reason)
            raise ProtocolError(reason) from None
        return buffer

    return allocate


# --------------------------------------------------------------------------- actors


def actor_num_gpus(options: DeviceOptions, *, node_gpus: float, node: str) -> float:
    """GPUs a shuffle actor on a node with ``node_gpus`` GPUs reserves.

    A GPU share makes Ray account for the actor and set ``CUDA_VISIBLE_DEVICES`` to the
    GPU it was given, so the actor receives into that GPU's memory. Nodes without GPUs
    reserve none; mode ``host`` reserves none anywhere; mode ``cuda`` refuses nodes
    without GPUs, since their actor could never receive a device frame.
    """
    if options.mode == "host":
        return 0.0
    if node_gpus <= 0:
        if options.mode == "cuda":
            raise DeviceUnavailableError(
                f"node {node} has no GPUs, but {CONFIG_KEY} is cuda: every shuffle actor "
                "needs a GPU; use auto to let CPU-only nodes take host partitions only"
            )
        return 0.0
    return float(options.actor_num_gpus)
