"""Shared test support: in-memory runs fed by client-style senders, and fake devices.

``Network`` holds one ``ShuffleManager`` per participant. ``send_input`` sends one
input as a transfer task's client does: ``shuffle._split.split_input`` cuts it into
pieces, ``shuffle._send.send_shards`` batches and encodes them, and ``deliver`` (the
injected wire) copies the frames, as a network would, into the owner's manager.

``SlowDisk`` holds spill writes until a test lets them go.

``FakeDeviceArray`` is device memory without a device: host memory exposed through
``__cuda_array_interface__`` only; ``make_fake_cupy`` is enough of CuPy around it.
"""

from __future__ import annotations

import asyncio
import ctypes
import random
import threading
import time
import types
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import pytest

from shuffle._manager import ShuffleManager
from shuffle._options import RunOptions
from shuffle._partition import sort_by_partition
from shuffle._send import Sent, send_shards
from shuffle._spec import ShuffleRunSpec
from shuffle._spill_file import SpillFile
from shuffle._split import split_input
from shuffle._transport import EndOfStream, Endpoint
from shuffle._transport import ucx as ucx_module
from shuffle.device._cai import cai_nbytes
from shuffle.wire._memory import HOST_REGISTRY, MemoryRegistry

Mode = Literal["direct", "delay", "chaos"]
T = TypeVar("T")

WAIT = 20.0  # bound on any single wait of the transport tests
skip_without_ucx = pytest.mark.skipif(
    not ucx_module.is_available(), reason="ucxx cannot be imported"
)
#: A UCX case's marks: the ``ucx`` marker, skipped where ucxx cannot be imported.
UCX = [pytest.mark.ucx, skip_without_ucx]
#: The network transports (UCX as above).
TRANSPORTS = ["tcp", pytest.param("ucx", marks=UCX)]


async def w(awaitable: Awaitable[T], timeout: float = WAIT) -> T:
    return await asyncio.wait_for(awaitable, timeout)


async def echo_messages(ep: Endpoint) -> None:
    """A listener's handler: send every message back until the peer ends the stream."""
    while True:
        try:
            message = await ep.recv()
        except EndOfStream:
            return
        await ep.send(message)


async def eventually(predicate: Callable[[], bool], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached before the deadline"
        await asyncio.sleep(0.01)


def split_by_partition(df: Any, **options: Any) -> dict[int, Any]:
    """``sort_by_partition``'s table cut into ``{output partition: table}``: an oracle."""
    table, bounds = sort_by_partition(df, **options)
    return {p: table.slice(start, stop - start) for p, (start, stop) in bounds.items()}


def copy_host_frames(frames: Sequence[Any]) -> list[Any]:
    return [bytearray(frame) for frame in frames]  # the sender may reuse its buffers


class Network:
    """Participants' managers wired together in memory, with a configurable wire.

    ``direct`` delivers at once; ``delay`` yields to the loop a random number of times
    first; ``chaos`` does too (so concurrent messages overtake each other) and delivers
    some messages twice. ``gate`` holds deliveries until it is set, and
    ``waiting`` is set once a delivery waits at the gate. ``copy`` copies a message's
    frames (device frames need a device copy).
    """

    def __init__(
        self,
        names: Sequence[str],
        *,
        options: RunOptions,
        mode: Mode = "direct",
        seed: int = 0,
        registry: MemoryRegistry = HOST_REGISTRY,
        copy: Callable[[Sequence[Any]], list[Any]] = copy_host_frames,
    ) -> None:
        self.options = options
        self.mode = mode
        self.rng = random.Random(seed)
        self.registry = registry
        self.copy = copy
        self.gate: asyncio.Event | None = None
        self.waiting = asyncio.Event()
        self.sends = 0
        self.log: list[tuple[str, list[Any]]] = []  # every delivered message
        self.managers = {
            name: ShuffleManager(local=name, options=options, registry=registry) for name in names
        }

    @property
    def names(self) -> list[str]:
        return list(self.managers)

    async def send_input(
        self,
        sender: str,
        data: Any,
        input_partition: int,
        *,
        spec: ShuffleRunSpec,
        meta: Any,
        covers: Sequence[int] = (),
    ) -> Sent:
        """Split and send one input as ``sender``, as a transfer task's client does."""
        shards = split_input(
            data, spec=spec, meta=meta, input_partition=input_partition, covers=covers
        )
        return await send_shards(
            shards,
            spec=spec,
            options=self.options,
            sender=sender,
            deliver=self.deliver,
            registry=self.registry,
            name=sender,
        )

    async def deliver(self, destination: str, frames: list[Any]) -> None:
        wire = self.copy(frames)
        self.sends += 1
        if self.gate is not None and not self.gate.is_set():
            self.waiting.set()
            await self.gate.wait()
        if self.mode in ("delay", "chaos"):
            await self._yield_randomly()
        self.log.append((destination, wire))
        await self.managers[destination].receive(wire)
        if self.mode == "chaos" and self.rng.random() < 0.3:
            await self._yield_randomly()
            await self.managers[destination].receive(self.copy(wire))

    async def replay(self) -> None:
        """Deliver every message again, as retried transfers would."""
        for destination, wire in list(self.log):
            await self.managers[destination].receive(self.copy(wire))

    async def close(self) -> None:
        await asyncio.gather(*(m.close() for m in self.managers.values()))

    def assert_clean(self) -> None:
        for manager in self.managers.values():
            assert manager.closed
            assert dict(manager.runs) == {}

    async def _yield_randomly(self) -> None:
        for _ in range(self.rng.randrange(6)):
            await asyncio.sleep(0)


def cai_of(arr: np.ndarray) -> dict[str, Any]:
    return {
        "version": 3,
        "shape": arr.shape,
        "typestr": arr.dtype.str,
        "data": (arr.ctypes.data if arr.size else 0, not arr.flags.writeable),
        "strides": None if arr.flags.c_contiguous else arr.strides,
        "stream": 1,
    }


class FakeDeviceArray:
    """Fake device memory: host memory behind CAI only, deliberately no buffer protocol."""

    def __init__(self, host: np.ndarray) -> None:
        self.host = host

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        return cai_of(self.host)

    @property
    def dtype(self) -> np.dtype:
        return self.host.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self.host.shape

    def view(self, dtype: Any) -> FakeDeviceArray:
        return FakeDeviceArray(self.host.view(dtype))

    def reshape(self, *shape: Any) -> FakeDeviceArray:
        return FakeDeviceArray(self.host.reshape(*shape))

    def __getitem__(self, key: Any) -> FakeDeviceArray:
        return FakeDeviceArray(self.host[key])


def read_device(obj: Any) -> np.ndarray:
    """The bytes behind any CAI object, read through its pointer (as a GPU library would)."""
    cai = obj.__cuda_array_interface__
    nbytes = cai_nbytes(cai)
    if not nbytes:
        return np.empty(0, np.uint8)
    raw = (ctypes.c_uint8 * nbytes).from_address(cai["data"][0])
    out = np.ctypeslib.as_array(raw)
    out.flags.writeable = True
    return out


def fake_allocate(nbytes: int) -> FakeDeviceArray:
    return FakeDeviceArray(np.zeros(nbytes, np.uint8))


def make_fake_cupy() -> types.ModuleType:
    """Enough of CuPy's surface for the codec, on host memory; counts synchronisations."""
    cupy = types.ModuleType("cupy")
    cupy.ndarray = FakeDeviceArray  # type: ignore[attr-defined]
    cupy.uint8 = np.uint8  # type: ignore[attr-defined]
    cupy.syncs = 0  # type: ignore[attr-defined]

    def asarray(obj: Any) -> FakeDeviceArray:
        if isinstance(obj, FakeDeviceArray):
            return obj
        view = read_device(obj)
        keep = FakeDeviceArray(view)
        keep.owner = obj  # type: ignore[attr-defined]  # as CuPy keeps the CAI exporter
        return keep

    def synchronize() -> None:
        cupy.syncs += 1  # type: ignore[attr-defined]

    cupy.asarray = asarray  # type: ignore[attr-defined]

    def ascontiguousarray(a: FakeDeviceArray) -> FakeDeviceArray:
        return FakeDeviceArray(np.ascontiguousarray(a.host))

    def empty(shape: Any, dtype: Any) -> FakeDeviceArray:
        return FakeDeviceArray(np.empty(shape, dtype))

    cupy.ascontiguousarray = ascontiguousarray  # type: ignore[attr-defined]
    cupy.empty = empty  # type: ignore[attr-defined]
    cupy.asnumpy = lambda a: a.host.copy()  # type: ignore[attr-defined]
    stream = types.SimpleNamespace(synchronize=synchronize)
    cupy.cuda = types.SimpleNamespace(  # type: ignore[attr-defined]
        get_current_stream=lambda: stream,
        runtime=types.SimpleNamespace(deviceSynchronize=synchronize),
    )
    return cupy


def gpu_usable() -> bool:
    try:
        import cupy

        return bool(cupy.cuda.runtime.getDeviceCount() > 0)
    except Exception:  # noqa: BLE001 -- not importable, no driver, no device
        return False


F = TypeVar("F", bound=Callable[..., Any])


def needs_gpu(test: F) -> F:
    skip = pytest.mark.skipif(not gpu_usable(), reason="CuPy cannot be imported or sees no GPU")
    return pytest.mark.gpu(skip(test))  # type: ignore[no-any-return]


class SlowDisk:
    """Holds every spill-file append until ``release`` is set; ``writing`` is set once
    one began (it then waits in the store's writing thread)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.release = threading.Event()
        self.writing = threading.Event()
        original = SpillFile.append

        def append(file: SpillFile, path: Path, buffers: Sequence[Any], end: int) -> Any:
            self.writing.set()
            if not self.release.wait(WAIT):
                raise TimeoutError("the test never released the disk")
            return original(file, path, buffers, end)

        monkeypatch.setattr(SpillFile, "append", append)
