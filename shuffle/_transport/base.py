"""The transport contract: a small set of closable async resources.

Modelled on anyio's stream ABCs (``anyio/abc/_streams.py``) and on ucxx's endpoints
(graceful ``close()`` versus immediate ``abort()``).

* A :class:`Transport` is a factory: ``listen(host, port, handler)`` returns a
  :class:`Listener`; ``connect(address)`` returns an :class:`Endpoint`. It owns what it
  created, and ``close()`` closes all of it (for UCX it also stops ucxx's threads).
* An :class:`Endpoint` exchanges *messages*. A message is a list of frames (buffers)
  sent atomically: concurrent ``send`` calls never interleave, and ``recv`` returns
  whole messages in the order they were sent. Frames are length-prefixed on the wire
  and received into freshly allocated buffers (see :data:`Allocator`), so the sender
  may reuse its buffers as soon as ``send`` returns.
* Every connection is authenticated before any data is accepted: both sides prove
  knowledge of :attr:`TransportConfig.secret` (HMAC-SHA256 challenge-response with
  nonces from both sides, see ``_handshake.py``). A listener drops connections that
  fail the handshake and logs them; its handler never sees them.

Endpoint life cycle and the error each side sees (see ``_errors.py``):

=========================  ===============================  ===========================
event                      this side afterwards             the peer afterwards
=========================  ===============================  ===========================
``await ep.close()``       ``ClosedResourceError``          ``recv``: remaining
                                                            messages, then
                                                            ``EndOfStream``; ``send``:
                                                            ``BrokenTransportError``
``ep.abort()``             ``ClosedResourceError``          ``recv``: messages already
                                                            arrived (maybe), then
                                                            ``BrokenTransportError``
peer process dies          ``BrokenTransportError``         --
``send``/``recv``          the endpoint is aborted, as a    ``BrokenTransportError``
cancelled                  message may be half transferred
=========================  ===============================  ===========================

``close()`` is idempotent and bounded by :attr:`TransportConfig.close_timeout` (it
falls back to ``abort()``); ``abort()`` never blocks on the peer. A listener's handler
owns its endpoint for the duration of the call: when the handler returns, the listener
closes the endpoint.
"""

from __future__ import annotations

import abc
import dataclasses
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, TypeAlias, Union

from ._errors import TransportUsageError

if TYPE_CHECKING:
    if sys.version_info >= (3, 12):
        from collections.abc import Buffer
    else:
        from typing_extensions import Buffer
    from typing import Self

__all__ = [
    "HANDSHAKE_LIMITS",
    "Allocator",
    "AsyncResource",
    "CudaArrayLike",
    "Endpoint",
    "Frame",
    "FrameLimits",
    "Handler",
    "Listener",
    "MemoryType",
    "Transport",
    "TransportConfig",
    "host_allocator",
]


class CudaArrayLike(Protocol):
    """A device buffer: anything exposing ``__cuda_array_interface__`` (CuPy, RMM, Numba)."""

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]: ...


#: A frame: a C-contiguous host buffer, or a device buffer (UCX transport only).
Frame: TypeAlias = Union["Buffer", CudaArrayLike]

#: Where a frame lives; carried on the wire so the receiver can allocate accordingly.
MemoryType: TypeAlias = Literal["host", "cuda"]

#: ``alloc(nbytes, memory_type)`` returns a writable, C-contiguous buffer of exactly
#: ``nbytes`` bytes to receive one frame into: a host buffer for ``"host"``, an object exposing
#: ``__cuda_array_interface__`` for ``"cuda"``.
Allocator: TypeAlias = Callable[[int, MemoryType], Any]


def host_allocator(nbytes: int, memory_type: MemoryType) -> bytearray:
    """The default :data:`Allocator`: host frames become ``bytearray``.

    Device frames need a device allocator (e.g. one returning ``cupy.empty(n, "u1")``)
    passed as :attr:`TransportConfig.allocator`; without one they are refused rather
    than silently copied to host.
    """
    if memory_type != "host":
        raise TransportUsageError(
            f"received a {memory_type!r} frame of {nbytes} bytes but no device allocator "
            "is configured (pass TransportConfig(allocator=...))"
        )
    return bytearray(nbytes)


@dataclasses.dataclass(frozen=True)
class FrameLimits:
    """Upper bounds on one message, checked from its header before anything is
    allocated. Both sides enforce them: the sender raises ``TransportUsageError``, the
    receiver treats a violation as a ``ProtocolError`` and drops the connection."""

    max_frames: int = 16_384
    max_frame_bytes: int = 1 << 32
    max_message_bytes: int = 1 << 34

    def __post_init__(self) -> None:
        if not (self.max_frames >= 1 and self.max_frame_bytes >= 0):
            raise TransportUsageError(f"invalid {self!r}")
        if self.max_message_bytes < self.max_frame_bytes:
            raise TransportUsageError(f"max_message_bytes < max_frame_bytes in {self!r}")


#: Limits while the handshake runs: an unauthenticated peer cannot make us allocate
#: more than a few hundred bytes.
HANDSHAKE_LIMITS = FrameLimits(max_frames=4, max_frame_bytes=256, max_message_bytes=1024)


@dataclasses.dataclass(frozen=True)
class TransportConfig:
    """Options shared by every transport. ``secret`` is required and never printed."""

    secret: bytes = dataclasses.field(repr=False)
    limits: FrameLimits = FrameLimits()
    #: Deadline for the whole authentication handshake of one connection.
    handshake_timeout: float = 10.0
    #: Deadline for establishing a connection (TCP connect, UCX wire-up).
    connect_timeout: float = 10.0
    #: Bound on a graceful ``close()`` before it falls back to ``abort()``.
    close_timeout: float = 5.0
    #: Accepted connections a listener lets wait for their handshake at once; one more
    #: drops the oldest of them (``_listener.py``).
    max_pending: int = 256
    allocator: Allocator = dataclasses.field(default=host_allocator, compare=False)

    MIN_SECRET_BYTES: ClassVar[int] = 16

    def __post_init__(self) -> None:
        if not isinstance(self.secret, bytes) or len(self.secret) < self.MIN_SECRET_BYTES:
            raise TransportUsageError(
                f"secret must be bytes of length >= {self.MIN_SECRET_BYTES} "
                "(e.g. secrets.token_bytes(32))"
            )
        for name in ("handshake_timeout", "connect_timeout", "close_timeout"):
            if not getattr(self, name) > 0:
                raise TransportUsageError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not self.max_pending >= 1:
            raise TransportUsageError(f"max_pending must be >= 1, got {self.max_pending!r}")


class AsyncResource(abc.ABC):
    """Something that must be closed; usable as ``async with``."""

    @property
    @abc.abstractmethod
    def closed(self) -> bool:
        """True once ``close()`` or ``abort()`` was called on this side."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release the resource gracefully. Idempotent, bounded in time."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class Endpoint(AsyncResource):
    """One authenticated, message-oriented, bidirectional connection."""

    @property
    @abc.abstractmethod
    def name(self) -> str:
        """A human-readable description (transport and addresses) for logs and errors."""

    @abc.abstractmethod
    async def send(self, frames: Sequence[Frame]) -> None:
        """Send one message atomically. Buffers must not change until this returns.

        Raises ``ClosedResourceError``, ``BrokenTransportError`` (includes a peer that
        has closed), or ``TransportUsageError`` for frames outside the limits or of an
        unsupported kind.
        """

    @abc.abstractmethod
    async def recv(self) -> list[Any]:
        """Receive the next whole message as a list of freshly allocated frames.

        Frames are writable: device frames come from ``TransportConfig.allocator``,
        host frames from it too or from the transport's own receive buffers (UCX
        receives all-host messages of several frames into ucxx's numpy arrays).

        Raises ``EndOfStream`` after the peer closed gracefully, ``ClosedResourceError``
        if this side closed, ``BrokenTransportError`` (or ``ProtocolError``) otherwise.
        """

    @abc.abstractmethod
    def abort(self) -> None:
        """Close immediately without telling the peer; in-flight messages may be lost."""


#: The listener calls ``await handler(endpoint)`` once per authenticated connection.
Handler: TypeAlias = Callable[[Endpoint], Awaitable[None]]


@dataclasses.dataclass
class ListenerStats:
    """Connections a listener refused, counted for monitoring (only ever grows)."""

    handshakes_failed: int = 0  # failed authentication: wrong secret, not our protocol, timeout
    protocol_errors: int = 0  # authenticated peers that sent invalid or oversized messages


class Listener(AsyncResource):
    """Accepts connections; runs the handler for each authenticated one."""

    @property
    def stats(self) -> ListenerStats:
        """What this listener refused so far; a listener that counts nothing says 0."""
        return ListenerStats()

    @property
    @abc.abstractmethod
    def address(self) -> str:
        """The address peers pass to ``Transport.connect``, e.g. ``tcp://10.0.0.1:5000``."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop accepting, close every accepted endpoint and wait (bounded) for handlers."""


class Transport(AsyncResource):
    """Factory for listeners and endpoints of one kind; owns what it creates."""

    #: The scheme of this transport's addresses (``"tcp"``, ``"ucx"``, ``"local"``).
    scheme: ClassVar[str]

    @property
    @abc.abstractmethod
    def config(self) -> TransportConfig:
        """The configuration this transport was created with."""

    @abc.abstractmethod
    async def listen(self, host: str, port: int, handler: Handler) -> Listener:
        """Start accepting connections on ``host:port`` (``port=0``: any free port)."""

    @abc.abstractmethod
    async def connect(self, address: str) -> Endpoint:
        """Connect to a listener's ``address`` and authenticate.

        Raises ``BrokenTransportError`` when no connection could be made and
        ``AuthenticationError`` when the handshake failed.
        """

    @abc.abstractmethod
    async def close(self) -> None:
        """Close every listener and endpoint this transport created, then itself."""
