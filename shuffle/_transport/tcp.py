"""TCP transport: length-prefixed messages over non-blocking sockets.

Why raw sockets driven by the event loop (``loop.sock_accept``/``sock_connect`` plus
``add_reader``/``add_writer`` readiness) rather than ``asyncio.start_server`` streams:
``StreamReader`` has no ``readinto`` (``readexactly`` copies out of its own buffer),
and on Python 3.11 ``StreamWriter.writelines`` joins its buffers (a full copy) while
``write`` copies whatever the kernel did not take at once. Here

* sending is one ``sendmsg`` (writev) of the header and all frames, resumed after
  partial writes, so large frames are never concatenated or copied;
* receiving reads small pieces (headers, small frames) through one reusable buffer
  to save system calls, and reads large frames straight into their preallocated
  buffers with ``recv_into``;
* ``TCP_NODELAY`` is set on every connection;
* ``abort()`` resets the connection (``SO_LINGER`` 0) and ``close()`` sends the
  goodbye message, then FIN.

Needs an event loop with ``add_reader``/``add_writer`` (asyncio's default selector loop
on POSIX, or uvloop).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
from typing import Any

from ._address import format_address, parse_address
from ._endpoint import ConnectionLost, FramedEndpoint
from ._errors import BrokenTransportError, ProtocolError, TransportUsageError
from ._framed import BaseTransport
from ._frames import FRAME_PREFIX, OutFrame, decode_prefix, decode_sizes, encode_frame_header
from ._listener import ServingListener
from .base import Handler, TransportConfig

__all__ = ["TcpTransport"]

logger = logging.getLogger("shuffle.transport.tcp")

_RECV_BUFFER_BYTES = 256 * 1024
#: Until the handshake admitted the peer, the receive buffer holds handshake messages
#: only (``HANDSHAKE_LIMITS``): an unauthenticated connection costs ~1 KiB, not 256.
_HANDSHAKE_BUFFER_BYTES = 1024
try:
    _IOV_MAX = max(16, os.sysconf("SC_IOV_MAX"))
except (AttributeError, ValueError, OSError):
    _IOV_MAX = 1024
_LINGER_RESET = struct.pack("ii", 1, 0)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _configure(sock: socket.socket) -> None:
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _sockname(sock: socket.socket, peer: bool) -> str:
    try:
        addr = sock.getpeername() if peer else sock.getsockname()
    except OSError:
        return "?"
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _TcpEndpoint(FramedEndpoint):
    io_errors = (OSError,)

    def __init__(self, *, sock: socket.socket, name: str, config: TransportConfig) -> None:
        super().__init__(name=name, config=config)
        self._sock = sock
        self._fd = sock.fileno()
        self._loop = asyncio.get_running_loop()
        self._torn_down = False
        self._waiters: dict[bool, asyncio.Future[None]] = {}  # writing -> while waiting
        self._rbuf = memoryview(bytearray(_HANDSHAKE_BUFFER_BYTES))
        self._rstart = 0
        self._rend = 0
        self._prefix = memoryview(bytearray(FRAME_PREFIX.size))

    def _limits_changed(self) -> None:
        """Authenticated: grow the receive buffer, keeping what it holds already."""
        if len(self._rbuf) >= _RECV_BUFFER_BYTES:
            return
        held = self._rend - self._rstart
        rbuf = memoryview(bytearray(_RECV_BUFFER_BYTES))
        rbuf[:held] = self._rbuf[self._rstart : self._rend]
        self._rbuf, self._rstart, self._rend = rbuf, 0, held

    # ---- readiness

    async def _wait_ready(self, *, writing: bool) -> None:
        """Wait until the loop reports the socket readable (or ``writing``: writable)."""
        if self._torn_down:
            raise ConnectionLost("closed")
        waiter = self._waiters[writing] = self._loop.create_future()
        add = self._loop.add_writer if writing else self._loop.add_reader
        add(self._fd, _wake, waiter)
        try:
            await waiter
        finally:
            del self._waiters[writing]
            # After teardown the fd may already belong to another socket.
            if not self._torn_down:
                self._stop_watching(writing=writing)

    def _stop_watching(self, *, writing: bool) -> None:
        remove = self._loop.remove_writer if writing else self._loop.remove_reader
        remove(self._fd)

    # ---- receiving

    async def _recv_into(self, view: memoryview) -> int:
        while True:
            try:
                n = self._sock.recv_into(view)
            except (BlockingIOError, InterruptedError):
                await self._wait_ready(writing=False)
                continue
            if n == 0:
                raise ConnectionLost("the peer closed the socket without a goodbye")
            return n

    async def _read_exact(self, view: memoryview) -> None:
        """Fill ``view``: buffered bytes first, then small reads through the buffer and
        large ones directly into ``view``."""
        size = len(view)
        pos = min(self._rend - self._rstart, size)
        if pos:
            view[:pos] = self._rbuf[self._rstart : self._rstart + pos]
            self._rstart += pos
        while pos < size:  # the buffer is empty here
            if size - pos >= len(self._rbuf) // 2:
                pos += await self._recv_into(view[pos:])
                continue
            self._rstart, self._rend = 0, await self._recv_into(self._rbuf)
            n = min(self._rend, size - pos)
            view[pos : pos + n] = self._rbuf[:n]
            self._rstart = n
            pos += n

    async def _recv_message(self) -> tuple[int, list[Any]]:
        await self._read_exact(self._prefix)
        kind, nframes = decode_prefix(self._prefix, self._limits)
        if not nframes:
            return kind, []
        sizes_buf = bytearray(9 * nframes)
        await self._read_exact(memoryview(sizes_buf))
        sizes, memtypes = decode_sizes(sizes_buf, nframes, self._limits)
        if "cuda" in memtypes:
            raise ProtocolError("device frame announced on a TCP connection")
        frames = []
        allocate = self._config.allocator
        for size in sizes:
            frame = allocate(size, "host")
            view = memoryview(frame).cast("B")
            if view.nbytes != size:
                raise TransportUsageError(f"allocator returned {view.nbytes} bytes, not {size}")
            if size:
                await self._read_exact(view)
            frames.append(frame)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("%s: received %d frames, %d bytes", self._name, nframes, sum(sizes))
        return kind, frames

    # ---- sending

    async def _send_message(self, kind: int, frames: list[OutFrame]) -> None:
        views = [memoryview(encode_frame_header(kind, frames))]
        views += [f.data for f in frames if f.nbytes]
        i = 0
        while i < len(views):
            try:
                sent = self._sock.sendmsg(views[i : i + _IOV_MAX])
            except (BlockingIOError, InterruptedError):
                await self._wait_ready(writing=True)
                continue
            while sent:  # advance past what the kernel took
                n = views[i].nbytes
                if sent >= n:
                    sent -= n
                    i += 1
                else:
                    views[i] = views[i][sent:]
                    sent = 0
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("%s: sent %d frames", self._name, len(frames))

    # ---- teardown

    def _teardown(self, *, reset: bool) -> None:
        if self._torn_down:
            return
        self._torn_down = True
        for writing, waiter in self._waiters.items():
            self._stop_watching(writing=writing)
            if not waiter.done():
                waiter.set_exception(ConnectionLost("closed"))
        try:
            if reset:
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            else:
                self._sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # already disconnected: nothing left to signal
        self._sock.close()

    async def _close_transport(self) -> None:
        self._teardown(reset=False)

    def _abort_transport(self) -> None:
        self._teardown(reset=True)


class _TcpListener(ServingListener):
    def __init__(
        self, *, sock: socket.socket, config: TransportConfig, handler: Handler, address: str
    ) -> None:
        super().__init__(config=config, handler=handler, address=address)
        self._sock = sock
        self._task = asyncio.get_running_loop().create_task(
            self._accept_loop(), name=f"accept {address}"
        )

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                # No local keeps the accepted socket (or its endpoint) alive while this
                # loop waits for the next one: a dropped connection is freed at once.
                self._take((await loop.sock_accept(self._sock))[0])
            except OSError as e:  # e.g. EMFILE: keep serving, but do not spin
                logger.warning("%s: accept failed: %s", self._address, e)
                await asyncio.sleep(0.1)

    def _take(self, conn: socket.socket) -> None:
        try:
            _configure(conn)
            name = f"tcp://{_sockname(conn, False)}<-{_sockname(conn, True)}"
            endpoint = _TcpEndpoint(sock=conn, name=name, config=self._config)
        except OSError as e:
            self._drops.dropped(e)
            conn.close()
            return
        self._accept(endpoint)

    async def _stop_accepting(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._sock.close()


class TcpTransport(BaseTransport):
    """TCP transport. Addresses are ``tcp://host:port``."""

    scheme = "tcp"

    async def _listen(self, host: str, port: int, handler: Handler) -> _TcpListener:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
            family, _, _, _, sockaddr = infos[0]
            sock = socket.create_server(sockaddr[:2], family=family, backlog=1024)
        except OSError as e:
            raise BrokenTransportError(f"cannot listen on tcp {host}:{port}: {e}") from e
        sock.setblocking(False)
        address = format_address("tcp", host, sock.getsockname()[1])
        return _TcpListener(sock=sock, config=self._config, handler=handler, address=address)

    async def _open(self, address: str) -> _TcpEndpoint:
        host, port = parse_address(address, "tcp")
        try:
            sock = await asyncio.wait_for(
                self._connect_socket(host, port), self._config.connect_timeout
            )
        except (TimeoutError, OSError) as e:
            raise BrokenTransportError(f"cannot connect to {address}: {e!r}") from e
        name = f"tcp://{_sockname(sock, False)}->{_sockname(sock, True)}"
        return _TcpEndpoint(sock=sock, name=name, config=self._config)

    @staticmethod
    async def _connect_socket(host: str, port: int) -> socket.socket:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        error: OSError = OSError(f"no address for {host}")
        for family, type_, proto, _, sockaddr in infos:
            sock = socket.socket(family, type_, proto)
            try:
                _configure(sock)
                await loop.sock_connect(sock, sockaddr)
            except OSError as e:
                sock.close()
                error = e
                continue
            except BaseException:
                sock.close()
                raise
            return sock
        raise error
