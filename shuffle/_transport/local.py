"""In-memory transport: the test twin of TCP and UCX.

Same contract, same handshake, same error types; messages travel through bounded
in-memory pipes (back-pressure: ``send`` waits while the peer's inbox is full).
Frames are copied on ``send``, as a network would, so the sender may reuse buffers.
Addresses are ``local://host:port`` within a :class:`LocalNetwork` (by default one per
process, the in-memory analogue of the loopback interface). All endpoints of one
connection must live on the same event loop.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from typing import Any

from ._address import format_address, parse_address
from ._endpoint import ConnectionLost, FramedEndpoint
from ._errors import BrokenTransportError, TransportUsageError
from ._framed import BaseTransport
from ._frames import KIND_GOODBYE, OutFrame, check_sizes
from ._listener import ServingListener
from .base import Handler, MemoryType, TransportConfig, host_allocator

__all__ = ["LocalNetwork", "LocalTransport"]

logger = logging.getLogger("shuffle.transport.local")

_Message = tuple[int, list[bytearray], list[MemoryType]]


class _Pipe:
    """One direction of a connection: a bounded FIFO of messages with two ends."""

    def __init__(self, capacity: int) -> None:
        self._items: deque[_Message] = deque()
        self._capacity = capacity
        self._waiters: list[asyncio.Future[None]] = []
        self.writer_closed = False
        self.reader_closed = False

    def _notify(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()

    async def _wait(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        await waiter

    async def put(self, message: _Message) -> None:
        while True:
            if self.writer_closed:
                raise ConnectionLost("closed locally")
            if self.reader_closed:
                raise ConnectionLost("the peer is gone")
            if len(self._items) < self._capacity:
                self._items.append(message)
                self._notify()
                return
            await self._wait()

    async def get(self) -> _Message:
        while True:
            if self.reader_closed:
                raise ConnectionLost("closed locally")
            if self._items:
                message = self._items.popleft()
                self._notify()
                return message
            if self.writer_closed:
                raise ConnectionLost("the peer went away without closing")
            await self._wait()

    def close_writer(self) -> None:
        self.writer_closed = True
        self._notify()

    def close_reader(self) -> None:
        self.reader_closed = True
        self._items.clear()
        self._notify()


class _LocalEndpoint(FramedEndpoint):
    def __init__(self, *, name: str, config: TransportConfig, inbox: _Pipe, outbox: _Pipe) -> None:
        super().__init__(name=name, config=config)
        self._inbox = inbox
        self._outbox = outbox

    async def _send_message(self, kind: int, frames: list[OutFrame]) -> None:
        # Copy now: the caller may reuse its buffers once send() returns.
        payload = [bytearray(f.data) for f in frames]
        await self._outbox.put((kind, payload, [f.memory_type for f in frames]))

    async def _recv_message(self) -> tuple[int, list[Any]]:
        kind, payload, memtypes = await self._inbox.get()
        check_sizes([len(p) for p in payload], self._limits)
        allocator = self._config.allocator
        if kind == KIND_GOODBYE or allocator is host_allocator:
            return kind, list(payload)
        frames = []
        for data, memtype in zip(payload, memtypes, strict=True):
            frame = allocator(len(data), memtype)
            memoryview(frame).cast("B")[: len(data)] = data
            frames.append(frame)
        return kind, frames

    async def _close_transport(self) -> None:
        self._abort_transport()

    def _abort_transport(self) -> None:
        self._outbox.close_writer()
        self._inbox.close_reader()


class LocalNetwork:
    """A namespace of ``local://`` addresses (the in-memory "loopback interface")."""

    def __init__(self) -> None:
        self._listeners: dict[str, _LocalListener] = {}
        self._ports = itertools.count(1024)
        self._connection_ids = itertools.count(1)

    def _bind(self, host: str, port: int, listener_factory: Any) -> _LocalListener:
        if port == 0:
            port = next(
                p for p in self._ports if format_address("local", host, p) not in self._listeners
            )
        address = format_address("local", host, port)
        if address in self._listeners:
            raise BrokenTransportError(f"cannot listen on {address}: address in use")
        listener: _LocalListener = listener_factory(address)
        self._listeners[address] = listener
        return listener

    def _unbind(self, address: str) -> None:
        self._listeners.pop(address, None)

    def _lookup(self, address: str) -> _LocalListener:
        parse_address(address, "local")
        try:
            return self._listeners[address]
        except KeyError:
            raise BrokenTransportError(f"cannot connect to {address}: connection refused") from None

    def _next_connection_id(self) -> int:
        return next(self._connection_ids)


class _LocalListener(ServingListener):
    def __init__(
        self, *, config: TransportConfig, handler: Handler, address: str, network: LocalNetwork
    ) -> None:
        super().__init__(config=config, handler=handler, address=address)
        self._network = network

    async def _stop_accepting(self) -> None:
        self._network._unbind(self._address)


_DEFAULT_NETWORK = LocalNetwork()


class LocalTransport(BaseTransport):
    """In-memory transport; ``capacity`` is the number of messages a pipe buffers."""

    scheme = "local"

    def __init__(
        self, config: TransportConfig, *, network: LocalNetwork | None = None, capacity: int = 64
    ) -> None:
        super().__init__(config)
        if capacity < 1:
            raise TransportUsageError(f"capacity must be >= 1, got {capacity}")
        self._network = network if network is not None else _DEFAULT_NETWORK
        self._capacity = capacity

    async def _listen(self, host: str, port: int, handler: Handler) -> _LocalListener:
        if not host or not 0 <= port < 65536:
            raise TransportUsageError(f"invalid host/port {host!r}:{port!r}")
        return self._network._bind(
            host,
            port,
            lambda address: _LocalListener(
                config=self._config, handler=handler, address=address, network=self._network
            ),
        )

    async def _open(self, address: str) -> _LocalEndpoint:
        listener = self._network._lookup(address)
        if listener.closed:
            raise BrokenTransportError(f"cannot connect to {address}: connection refused")
        to_server, to_client = _Pipe(self._capacity), _Pipe(self._capacity)
        conn = self._network._next_connection_id()
        server = _LocalEndpoint(
            name=f"{address}<-#{conn}", config=self._config, inbox=to_server, outbox=to_client
        )
        client = _LocalEndpoint(
            name=f"{address}->#{conn}", config=self._config, inbox=to_client, outbox=to_server
        )
        listener._accept(server)
        return client
