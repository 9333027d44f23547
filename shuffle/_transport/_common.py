"""Machinery shared by the concrete transports.

* the wire header (``encode_header``/``decode_prefix``/``decode_sizes``), used by TCP and
  UCX alike so that limits are enforced identically;
* ``prepare_frames``: validate outgoing frames once, as flat byte views;
* ``FramedEndpoint``: the endpoint state machine (closed / peer closed / broken),
  locking, error translation and the goodbye message. A transport only implements
  how one message travels (``_send_message``/``_recv_message``) and how to tear down;
* ``ServingListener``: handshake, then handler, per accepted connection;
* ``BaseTransport``: connect-then-authenticate and ownership of what was created.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import logging
import struct
import weakref
from collections.abc import Coroutine, Sequence
from typing import Any, ClassVar, TypeVar

from ._errors import (
    AuthenticationError,
    BrokenTransportError,
    ClosedResourceError,
    EndOfStream,
    ProtocolError,
    TransportError,
    TransportUsageError,
)
from ._handshake import authenticate_client, authenticate_server
from .base import (
    HANDSHAKE_LIMITS,
    AsyncResource,
    Endpoint,
    FrameLimits,
    Handler,
    Listener,
    MemoryType,
    Transport,
    TransportConfig,
)

logger = logging.getLogger("shuffle.transport")

_T = TypeVar("_T")

# --------------------------------------------------------------------------- wire format
#
# header := prefix sizes memtypes
# prefix := magic "RO" | version u8 | kind u8 | nframes u32        (little-endian, 8 bytes)
# sizes  := nframes x u64 frame length;  memtypes := nframes x u8 (0 host, 1 cuda)
# The frames follow, in order, with no padding. GOODBYE has no frames.

PREFIX = struct.Struct("<2sBBI")
MAGIC = b"RO"
VERSION = 1
KIND_DATA = 1
KIND_GOODBYE = 2
_MEMTYPE_CODES: dict[MemoryType, int] = {"host": 0, "cuda": 1}
_MEMTYPE_NAMES: tuple[MemoryType, ...] = ("host", "cuda")


#: Host frames up to this size travel coalesced with their neighbours (see
#: ``coalesce_groups``); UCX costs ~17 us per tag message here, a memcpy of 64 KiB ~5.
COALESCE_FRAME_BYTES = 64 * 2**10
#: At most this many bytes in one coalesced wire buffer.
COALESCE_GROUP_BYTES = 4 * 2**20


def coalesce_groups(
    sizes: Sequence[int],
    memtypes: Sequence[MemoryType],
    *,
    frame_bytes: int = COALESCE_FRAME_BYTES,
    group_bytes: int = COALESCE_GROUP_BYTES,
) -> list[tuple[int, ...]]:
    """Which frames travel together, in order: runs of small host frames become one
    wire buffer, every other non-empty frame travels alone; empty frames not at all.

    Pure and deterministic, so sender and receiver derive the same plan from the
    header alone; the wire format does not change.
    """
    groups: list[tuple[int, ...]] = []
    run: list[int] = []
    total = 0
    for i, (size, memtype) in enumerate(zip(sizes, memtypes, strict=True)):
        if not size:
            continue
        if memtype == "host" and size <= frame_bytes:
            if run and total + size > group_bytes:
                groups.append(tuple(run))
                run, total = [], 0
            run.append(i)
            total += size
            continue
        if run:
            groups.append(tuple(run))
            run, total = [], 0
        groups.append((i,))
    if run:
        groups.append(tuple(run))
    return groups


def header_nbytes(nframes: int) -> int:
    return PREFIX.size + 9 * nframes


def encode_header(kind: int, frames: Sequence[OutFrame]) -> bytes:
    n = len(frames)
    return PREFIX.pack(MAGIC, VERSION, kind, n) + struct.pack(
        f"<{n}Q{n}B",
        *(f.nbytes for f in frames),
        *(_MEMTYPE_CODES[f.memory_type] for f in frames),
    )


def decode_prefix(buf: bytes | bytearray | memoryview, limits: FrameLimits) -> tuple[int, int]:
    """Return ``(kind, nframes)``; raise ``ProtocolError`` before anything is allocated."""
    magic, version, kind, nframes = PREFIX.unpack_from(buf)
    if magic != MAGIC or version != VERSION:
        raise ProtocolError(f"not a message header (magic {magic!r}, version {version})")
    if kind == KIND_GOODBYE:
        if nframes:
            raise ProtocolError(f"goodbye message with {nframes} frames")
    elif kind != KIND_DATA:
        raise ProtocolError(f"unknown message kind {kind}")
    if nframes > limits.max_frames:
        raise ProtocolError(f"{nframes} frames exceed the limit of {limits.max_frames}")
    return kind, nframes


def check_sizes(sizes: Sequence[int], limits: FrameLimits) -> None:
    """Raise ``ProtocolError`` if a received message's frames exceed ``limits``."""
    if len(sizes) > limits.max_frames:
        raise ProtocolError(f"{len(sizes)} frames exceed the limit of {limits.max_frames}")
    if sizes and max(sizes) > limits.max_frame_bytes:
        raise ProtocolError(f"frame of {max(sizes)} bytes exceeds {limits.max_frame_bytes}")
    if sum(sizes) > limits.max_message_bytes:
        raise ProtocolError(f"message of {sum(sizes)} bytes exceeds {limits.max_message_bytes}")


def decode_sizes(
    buf: bytes | bytearray | memoryview, nframes: int, limits: FrameLimits, offset: int = 0
) -> tuple[list[int], list[MemoryType]]:
    """Frame sizes and memory types, checked against ``limits``."""
    values = struct.unpack_from(f"<{nframes}Q{nframes}B", buf, offset)
    sizes = list(values[:nframes])
    check_sizes(sizes, limits)
    try:
        memtypes = [_MEMTYPE_NAMES[code] for code in values[nframes:]]
    except IndexError:
        raise ProtocolError(f"unknown memory type in {values[nframes:]!r}") from None
    return sizes, memtypes


# --------------------------------------------------------------------------- frames


@dataclasses.dataclass(frozen=True)
class OutFrame:
    """A validated outgoing frame: a flat byte view (host) or the device object."""

    data: Any
    nbytes: int
    memory_type: MemoryType


def _device_nbytes(frame: Any) -> int:
    cai = frame.__cuda_array_interface__
    shape: tuple[int, ...] = tuple(cai["shape"])
    itemsize = int(cai["typestr"][2:])
    expected = []
    stride = itemsize
    for extent in reversed(shape):
        expected.append(stride)
        stride *= extent
    strides = cai.get("strides")
    if strides is not None and tuple(strides) != tuple(reversed(expected)) and stride:
        raise TransportUsageError("device frames must be C-contiguous")
    return stride


def prepare_frames(
    frames: Sequence[Any], limits: FrameLimits, *, allow_device: bool, who: str
) -> list[OutFrame]:
    """Validate a message against ``limits`` and return flat views of its frames."""
    if isinstance(frames, (bytes, bytearray, memoryview, str)) or not isinstance(frames, Sequence):
        raise TransportUsageError(f"{who}: a message is a sequence of frames, got {type(frames)}")
    if len(frames) > limits.max_frames:
        raise TransportUsageError(f"{who}: {len(frames)} frames exceed {limits.max_frames}")
    out: list[OutFrame] = []
    total = 0
    for frame in frames:
        if hasattr(frame, "__cuda_array_interface__"):
            if not allow_device:
                raise TransportUsageError(f"{who}: this transport carries host frames only")
            item = OutFrame(frame, _device_nbytes(frame), "cuda")
        else:
            try:
                view = memoryview(frame)
            except TypeError:
                raise TransportUsageError(
                    f"{who}: frame of type {type(frame).__name__} is not a buffer"
                ) from None
            if not view.c_contiguous:
                raise TransportUsageError(f"{who}: frames must be C-contiguous")
            if view.format != "B" or view.ndim != 1:
                view = view.cast("B")
            item = OutFrame(view, view.nbytes, "host")
        if item.nbytes > limits.max_frame_bytes:
            raise TransportUsageError(
                f"{who}: frame of {item.nbytes} bytes exceeds {limits.max_frame_bytes}"
            )
        total += item.nbytes
        out.append(item)
    if total > limits.max_message_bytes:
        raise TransportUsageError(
            f"{who}: message of {total} bytes exceeds {limits.max_message_bytes}"
        )
    return out


# --------------------------------------------------------------------------- addresses


def format_address(scheme: str, host: str, port: int) -> str:
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def parse_address(address: str, scheme: str) -> tuple[str, int]:
    """``"tcp://host:port"`` (or ``"tcp://[v6]:port"``) -> ``(host, port)``."""
    prefix = f"{scheme}://"
    if not isinstance(address, str) or not address.startswith(prefix):
        raise TransportUsageError(f"{address!r} is not a {scheme}:// address")
    rest = address[len(prefix) :]
    if rest.startswith("["):
        host, _, tail = rest[1:].partition("]")
        port_text = tail[1:] if tail.startswith(":") else ""
    else:
        host, _, port_text = rest.rpartition(":")
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise TransportUsageError(f"{address!r} is not of the form {scheme}://host:port")
    return host, int(port_text)


# --------------------------------------------------------------------------- endpoint


class ConnectionLost(Exception):
    """Raised by transport hooks when the connection went away (EOF, peer gone, or our
    own teardown woke a waiter). ``FramedEndpoint`` translates it."""


class FramedEndpoint(Endpoint):
    """The endpoint contract of ``base.py`` on top of two message-level hooks."""

    #: Exceptions of the underlying library that mean "the connection failed".
    io_errors: tuple[type[BaseException], ...] = ()
    #: Whether frames exposing ``__cuda_array_interface__`` may be sent.
    supports_device: ClassVar[bool] = False

    def __init__(self, *, name: str, config: TransportConfig) -> None:
        self._name = name
        self._config = config
        self._limits = HANDSHAKE_LIMITS
        self._send_lock = asyncio.Lock()
        self._recv_lock = asyncio.Lock()
        self._closed = False
        self._peer_closed = False
        self._broken: BrokenTransportError | None = None

    # ---- hooks

    @abc.abstractmethod
    async def _send_message(self, kind: int, frames: list[OutFrame]) -> None:
        """Transmit one message; called with the send lock held."""

    @abc.abstractmethod
    async def _recv_message(self) -> tuple[int, list[Any]]:
        """Receive one message as ``(kind, frames)``, checking ``self._limits``."""

    @abc.abstractmethod
    async def _close_transport(self) -> None:
        """Graceful teardown after the goodbye was sent; must wake blocked operations."""

    @abc.abstractmethod
    def _abort_transport(self) -> None:
        """Immediate teardown; idempotent; must wake blocked operations."""

    @property
    def _failure_types(self) -> tuple[type[BaseException], ...]:
        return (ConnectionLost, *self.io_errors)

    def _limits_changed(self) -> None:
        """Called after ``set_limits``; e.g. to resize a header buffer."""

    # ---- public

    @property
    def name(self) -> str:
        return self._name

    @property
    def closed(self) -> bool:
        return self._closed

    def set_limits(self, limits: FrameLimits) -> None:
        """Switch from handshake limits to the configured ones (between messages)."""
        self._limits = limits
        self._limits_changed()

    async def send(self, frames: Sequence[Any]) -> None:
        self._check_send()
        out = prepare_frames(
            frames, self._limits, allow_device=self.supports_device, who=self._name
        )
        async with self._send_lock:
            self._check_send()
            await self._guarded(self._send_message(KIND_DATA, out), "send")

    async def recv(self) -> list[Any]:
        async with self._recv_lock:
            self._check_recv()
            kind, frames = await self._guarded(self._recv_message(), "recv")
            if kind == KIND_GOODBYE:
                self._peer_closed = True
                raise EndOfStream(f"{self._name}: the peer closed the connection")
            return frames

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._broken is not None or self._peer_closed:
            self._abort_transport()
            return
        failures: tuple[type[BaseException], ...] = (
            asyncio.TimeoutError,
            TransportError,
            *self._failure_types,
        )
        try:
            await asyncio.wait_for(self._say_goodbye(), self._config.close_timeout)
            await asyncio.wait_for(self._close_transport(), self._config.close_timeout)
        except asyncio.CancelledError:
            self._abort_transport()
            raise
        except failures as e:
            logger.debug("%s: graceful close failed (%r); aborting", self._name, e)
            self._abort_transport()

    def abort(self) -> None:
        self._closed = True
        self._abort_transport()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "broken" if self._broken else "open"
        return f"<{type(self).__name__} {self._name} {state}>"

    # ---- internals

    async def _say_goodbye(self) -> None:
        async with self._send_lock:
            await self._send_message(KIND_GOODBYE, [])

    def _check_send(self) -> None:
        if self._closed:
            raise ClosedResourceError(f"{self._name} is closed")
        if self._broken is not None:
            raise BrokenTransportError(f"{self._name} is broken: {self._broken}")
        if self._peer_closed:
            raise BrokenTransportError(f"{self._name}: the peer closed the connection")

    def _check_recv(self) -> None:
        if self._closed:
            raise ClosedResourceError(f"{self._name} is closed")
        if self._peer_closed:
            raise EndOfStream(f"{self._name}: the peer closed the connection")
        if self._broken is not None:
            raise BrokenTransportError(f"{self._name} is broken: {self._broken}")

    def _fail(self, error: BrokenTransportError) -> BrokenTransportError:
        if self._broken is None:
            self._broken = error
        self._abort_transport()
        return error

    async def _guarded(self, operation: Coroutine[Any, Any, _T], what: str) -> _T:
        try:
            return await operation
        except asyncio.CancelledError:
            if not self._closed:
                self._fail(BrokenTransportError(f"{self._name}: {what} was cancelled"))
            raise
        except ProtocolError as e:
            raise self._fail(ProtocolError(f"{self._name}: {e}")) from e
        except self._failure_types as e:
            if self._closed:
                raise ClosedResourceError(f"{self._name} was closed during {what}") from e
            raise self._fail(BrokenTransportError(f"{self._name}: {what} failed: {e}")) from e


# --------------------------------------------------------------------------- listener


class ServingListener(Listener):
    """Runs ``handshake -> handler -> close`` for every accepted connection."""

    def __init__(self, *, config: TransportConfig, handler: Handler, address: str) -> None:
        self._config = config
        self._handler = handler
        self._address = address
        self._closed = False
        self._connections: dict[asyncio.Task[None], FramedEndpoint] = {}

    @abc.abstractmethod
    async def _stop_accepting(self) -> None:
        """Stop accepting new connections and release the listening resource."""

    @property
    def address(self) -> str:
        return self._address

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def connection_count(self) -> int:
        """Accepted connections still being served (handshake or handler running)."""
        return len(self._connections)

    def _accept(self, endpoint: FramedEndpoint) -> None:
        """Take ownership of a freshly accepted, unauthenticated endpoint."""
        if self._closed:
            endpoint.abort()
            return
        task = asyncio.get_running_loop().create_task(
            self._serve(endpoint), name=f"serve {endpoint.name}"
        )
        self._connections[task] = endpoint
        task.add_done_callback(self._connections.pop)

    async def _serve(self, endpoint: FramedEndpoint) -> None:
        try:
            await authenticate_server(endpoint, self._config)
        except AuthenticationError as e:
            logger.warning("%s: dropped a connection: %s", self._address, e)
            endpoint.abort()
            return
        except ClosedResourceError:
            return
        endpoint.set_limits(self._config.limits)
        try:
            await self._handler(endpoint)
        except (ClosedResourceError, EndOfStream) as e:
            logger.debug("%s: handler for %s ended: %r", self._address, endpoint.name, e)
        except BrokenTransportError as e:
            logger.warning("%s: connection %s failed: %s", self._address, endpoint.name, e)
        except Exception:
            logger.exception("%s: handler for %s raised", self._address, endpoint.name)
        finally:
            await endpoint.close()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._stop_accepting()
        endpoints = list(self._connections.values())
        tasks = list(self._connections)
        await asyncio.gather(*(ep.close() for ep in endpoints), return_exceptions=True)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=self._config.close_timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._connections)} connections"
        return f"<{type(self).__name__} {self._address} {state}>"


# --------------------------------------------------------------------------- transport


class BaseTransport(Transport):
    """``connect`` = open a raw endpoint + authenticate; tracks what it created."""

    def __init__(self, config: TransportConfig) -> None:
        if not isinstance(config, TransportConfig):
            raise TransportUsageError(f"expected a TransportConfig, got {type(config)}")
        self._config = config
        self._closed = False
        # Weak: a resource dropped without close() is the caller's leak, reported by
        # the resource's own finaliser (e.g. the socket's ResourceWarning).
        self._resources: weakref.WeakSet[AsyncResource] = weakref.WeakSet()

    @abc.abstractmethod
    async def _open(self, address: str) -> FramedEndpoint:
        """Connect without authenticating, bounded by ``config.connect_timeout``."""

    @abc.abstractmethod
    async def _listen(self, host: str, port: int, handler: Handler) -> ServingListener:
        """Start a listener."""

    async def _shutdown(self) -> None:
        """Release transport-wide resources after everything was closed."""

    @property
    def config(self) -> TransportConfig:
        return self._config

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedResourceError(f"{self.scheme} transport is closed")

    async def listen(self, host: str, port: int, handler: Handler) -> Listener:
        self._check_open()
        if not callable(handler):
            raise TransportUsageError(f"handler must be an async callable, got {handler!r}")
        listener = await self._listen(host, port, handler)
        self._resources.add(listener)
        return listener

    async def connect(self, address: str) -> Endpoint:
        self._check_open()
        endpoint = await self._open(address)
        try:
            await authenticate_client(endpoint, self._config)
        except BaseException:
            endpoint.abort()
            raise
        endpoint.set_limits(self._config.limits)
        self._resources.add(endpoint)
        return endpoint

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        resources = list(self._resources)
        # Listeners first: they close the endpoints they accepted.
        resources.sort(key=lambda r: not isinstance(r, Listener))
        await asyncio.gather(*(r.close() for r in resources), return_exceptions=True)
        await self._shutdown()
