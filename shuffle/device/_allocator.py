"""Receive allocators: every received frame goes into memory of its announced kind.

``transport_allocator(registry, where=...)`` is the ``TransportConfig.allocator`` of a
receiver. A device frame at a process that cannot hold device memory is never used as
data: either the connection fails with a ``ProtocolError`` that says why, or
(``drain_refused=True``, what actors use) it is drained into a ``RefusedFrame`` so that
the receiver can answer the sender with the reason and the connection stays in step
(``refused_reason``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from shuffle._transport import Allocator, ProtocolError
from shuffle.device._cai import cai_nbytes, is_device_object
from shuffle.device._options import DeviceUnavailableError
from shuffle.wire._memory import MemoryRegistry

__all__ = ["RefusedFrame", "device_allocator", "refused_reason", "transport_allocator"]


def device_allocator(allocate: Callable[[int], Any]) -> Callable[[int], Any]:
    """``allocate`` checked: the buffer must be device memory of exactly ``nbytes``."""

    def checked(nbytes: int) -> Any:
        buffer = allocate(nbytes)
        if not is_device_object(buffer):
            raise TypeError(
                f"device allocator {allocate!r} returned a {type(buffer).__name__}, which "
                "does not expose __cuda_array_interface__"
            )
        got = cai_nbytes(buffer.__cuda_array_interface__)
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
