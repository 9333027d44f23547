"""What an unauthenticated or misbehaving peer can make a listener hold, with real sockets.

Loopback only, bounded counts. Each bound is checked against the listener's own
bookkeeping and the sockets' fates (closed by the server or not), never RSS.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import socket
import struct
import time
import weakref
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from shuffle._exceptions import FrameError
from shuffle._send import MAX_PAYLOAD_NBYTES, check_payload
from shuffle._transport import (
    FrameLimits,
    ProtocolError,
    TransportConfig,
    get_transport,
)
from shuffle._transport import ucx as ucx_module
from shuffle._transport._frames import decode_sizes
from shuffle._transport._listener import DropLog, ServingListener
from shuffle._transport._reaper import select_stale
from shuffle.shell._limits import MESSAGE_LIMITS
from tests.shuffle.support import TRANSPORTS, WAIT, echo_messages, eventually, w

SECRET = b"s" * 32
pytestmark = pytest.mark.usefixtures("loopback_only")
MiB = 1 << 20
GiB = 1 << 30


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closed (FIN or RST) this raw client socket."""
    try:
        return sock.recv(64) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


@contextlib.contextmanager
def raw_sockets(port: int, count: int, first: bytes = b"") -> Iterator[list[socket.socket]]:
    """``count`` raw connections to ``port``; every other one sends ``first``, then idles."""
    socks = []
    try:
        for i in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
            if i % 2 and first:
                sock.sendall(first)
            sock.setblocking(False)
            socks.append(sock)
        yield socks
    finally:
        for sock in socks:
            sock.close()


@contextlib.asynccontextmanager
async def serving(kind: str, **options: Any) -> AsyncIterator[tuple[Any, ServingListener]]:
    cfg = TransportConfig(secret=SECRET, **options)
    transport = get_transport(kind, config=cfg)  # type: ignore[arg-type]
    try:
        listener = await w(transport.listen("127.0.0.1", 0, echo_messages))
        assert isinstance(listener, ServingListener)
        yield transport, listener
    finally:
        await w(transport.close())


async def _authenticated_roundtrip(kind: str, address: str) -> None:
    client = get_transport(kind, config=TransportConfig(secret=SECRET))  # type: ignore[arg-type]
    try:
        ep = await w(client.connect(address))
        await w(ep.send([b"real", b"client"]))
        assert [bytes(f) for f in await w(ep.recv())] == [b"real", b"client"]
    finally:
        await w(client.close())


# ----------------------------------------------------------------- pending connections


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_idle_raw_connections_are_closed_at_the_deadline_and_a_client_still_gets_in(
    kind: str,
) -> None:
    """Raw TCP connections that never speak (for UCX: not even UCX's wire-up) are closed
    within the handshake deadline (plus UCX's reaper period), while a real client
    connects and exchanges messages meanwhile."""
    deadline = 2.0

    async def main() -> None:
        async with serving(kind, handshake_timeout=deadline) as (transport, listener):
            ports = {port_of(listener.address)}
            if kind == "ucx":  # UCX's own TCP transport listens too
                ports |= ucx_module._RUNTIME.tcp_ports
            established = await w(transport.connect(listener.address))
            await w(established.send([b"before"]))
            assert [bytes(f) for f in await w(established.recv())] == [b"before"]
            with contextlib.ExitStack() as stack:
                # Half of them send a byte: a partial message or UCX header, never completed.
                socks = [s for p in ports for s in stack.enter_context(raw_sockets(p, 20, b"R"))]
                start = time.monotonic()
                await _authenticated_roundtrip(kind, listener.address)
                await eventually(lambda: all(closed_by_server(s) for s in socks))
                elapsed = time.monotonic() - start
            assert deadline * 0.5 <= elapsed <= deadline + 3.0, elapsed
            # Connections that did authenticate are left alone, and new ones get in.
            await w(established.send([b"after"]))
            assert [bytes(f) for f in await w(established.recv())] == [b"after"]
            await _authenticated_roundtrip(kind, listener.address)
            assert listener.dropped_count >= len(socks)

    asyncio.run(main())


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_pending_connections_beyond_the_cap_drop_the_oldest(kind: str) -> None:
    cap = 8

    async def main() -> None:
        async with serving(kind, handshake_timeout=30.0, max_pending=cap) as (_, listener):
            with raw_sockets(port_of(listener.address), 30) as old:
                await eventually(lambda: sum(map(closed_by_server, old)) >= 30 - cap)
                # A real client gets in although the pending slots are full.
                await _authenticated_roundtrip(kind, listener.address)
                with raw_sockets(port_of(listener.address), cap) as new:
                    # The newcomers push out the oldest: every old socket is closed now.
                    await eventually(lambda: all(closed_by_server(s) for s in old))
                    assert not any(closed_by_server(s) for s in new)

    asyncio.run(main())


def test_reaper_drops_the_stale_then_the_oldest_beyond_the_cap() -> None:
    seen = {1: 0.0, 2: 5.0, 3: 9.5, 4: 9.0, 5: 9.9, 6: 9.8}
    assert select_stale(seen, now=10.0, deadline=10.0, cap=10) == [1]
    assert select_stale(seen, now=15.0, deadline=10.0, cap=10) == [1, 2]
    # Beyond the cap the oldest go first: 2 (5.0) and 4 (9.0) of the five young ones.
    assert select_stale(seen, now=10.0, deadline=10.0, cap=3) == [1, 2, 4]
    assert select_stale({}, now=1.0, deadline=1.0, cap=1) == []


def test_tcp_pending_connection_holds_no_receive_buffer() -> None:
    """Before the handshake a TCP connection holds ~1 KiB, not the 256 KiB receive buffer;
    it gets that buffer once authenticated."""

    async def main() -> None:
        async with serving("tcp", handshake_timeout=30.0) as (transport, listener):
            with raw_sockets(port_of(listener.address), 20):
                await eventually(lambda: listener.pending_count == 20)
                pending = list(listener._pending)
                per_connection = max(len(ep._rbuf) for ep in pending)  # type: ignore[attr-defined]
                assert per_connection <= 2048, per_connection
                del pending
            ep = await w(transport.connect(listener.address))
            await w(ep.send([b"x" * MiB]))
            assert len(bytes((await w(ep.recv()))[0])) == MiB
            served = [
                e
                for e in listener._connections.values()
                if e.name.endswith(ep.name.split("->")[0].removeprefix("tcp://"))
            ]
            assert served and len(served[0]._rbuf) == 256 * 1024  # type: ignore[attr-defined]

    asyncio.run(main())


def test_dropped_connections_are_logged_at_most_once_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="shuffle.transport")

    async def main() -> None:
        async with serving("tcp") as (_, listener):
            with raw_sockets(port_of(listener.address), 50) as socks:
                for sock in socks:
                    sock.send(b"GET / HTTP/1.0\r\n\r\n")  # not a handshake: dropped at once
                await eventually(lambda: listener.dropped_count == 50)

    asyncio.run(main())
    lines = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert len(lines) == 1, lines


def test_drop_log_reports_counts_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="shuffle.transport")
    now = [0.0]
    log = DropLog("tcp://x:1", interval=10.0, clock=lambda: now[0])
    for t in (0.0, 1.0, 2.0, 9.0, 12.0, 13.0, 30.0):
        now[0] = t
        log.dropped(f"at {t}")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 and log.total == 7, lines
    assert "dropped a connection: at 0.0" in lines[0]
    assert "dropped 4 connections in the last 12 s" in lines[1] and "at 12.0" in lines[1]
    assert "dropped 2 connections in the last 18 s" in lines[2]


# ------------------------------------------------------------ broken connections' buffers


class _Buffer(bytearray):
    """A receive buffer that can be watched with a weak reference."""


def _watching_allocator(refs: list[weakref.ref[_Buffer]]) -> Any:
    def allocate(nbytes: int, memory_type: str) -> _Buffer:
        assert memory_type == "host"
        buffer = _Buffer(nbytes)
        if nbytes >= MiB:
            refs.append(weakref.ref(buffer))
        return buffer

    return allocate


def _data_header(*sizes: int) -> bytes:
    """The transports' wire header of a data message with host frames of ``sizes``."""
    n = len(sizes)
    return struct.pack("<2sBBI", b"RO", 1, 1, n) + struct.pack(f"<{n}Q{n}B", *sizes, *[0] * n)


def test_a_broken_connection_frees_its_receive_buffers_without_the_gc() -> None:
    """A peer announces 3 x 1 MiB frames, sends part of the first and hangs up: once the
    listener dropped the connection, nothing keeps the buffer alive, with the cyclic
    garbage collector off (the actor raises its threshold; cycles would stay)."""
    refs: list[weakref.ref[_Buffer]] = []

    async def main() -> None:
        async with serving("tcp", allocator=_watching_allocator(refs)) as (transport, listener):
            ep = await w(transport.connect(listener.address))
            ep._sock.sendall(_data_header(MiB, MiB, MiB) + b"x" * 100_000)  # type: ignore[attr-defined]
            await eventually(lambda: len(refs) == 1)
            ep.abort()
            await eventually(lambda: listener.connection_count == 0)

    gc.collect()
    gc.disable()
    try:
        asyncio.run(main())
        assert refs and all(ref() is None for ref in refs)
    finally:
        gc.enable()


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_an_over_limit_header_is_refused_before_anything_is_allocated(kind: str) -> None:
    refs: list[weakref.ref[_Buffer]] = []
    limits = FrameLimits(max_frame_bytes=2 * MiB, max_message_bytes=4 * MiB)

    async def main() -> None:
        async with serving(kind, allocator=_watching_allocator(refs), limits=limits) as (
            _,
            listener,
        ):
            client = get_transport(kind, config=TransportConfig(secret=SECRET))  # type: ignore[arg-type]
            try:
                ep = await w(client.connect(listener.address))
                # Each frame is within the limit, the message is not.
                with contextlib.suppress(Exception):
                    await w(ep.send([bytes(2 * MiB)] * 3))
                await eventually(lambda: listener.connection_count == 0)
            finally:
                await w(client.close())
            await _authenticated_roundtrip(kind, listener.address)

    asyncio.run(main())
    assert refs == [], "a buffer was allocated for an over-limit message"


def test_shuffle_connections_enforce_the_message_limit_from_the_header() -> None:
    """The actor's transport limit is the codec's 2 GiB (not the transport's 4 GiB frame /
    16 GiB message defaults), refused from the sizes in the header; senders refuse
    first with a typed ``FrameError``."""
    with pytest.raises(ProtocolError, match="exceeds"):
        decode_sizes(struct.pack("<3Q3B", GiB, GiB, GiB, 0, 0, 0), 3, MESSAGE_LIMITS)
    with pytest.raises(ProtocolError, match="exceeds"):
        decode_sizes(struct.pack("<1Q1B", 3 * GiB, 0), 1, MESSAGE_LIMITS)
    decode_sizes(struct.pack("<2Q2B", MiB, MAX_PAYLOAD_NBYTES, 0, 0), 2, MESSAGE_LIMITS)
    with pytest.raises(FrameError, match="exceeds the limit"):
        check_payload(MAX_PAYLOAD_NBYTES + 1, what="shuffle s[1] inputs 0")
    check_payload(MAX_PAYLOAD_NBYTES, what="shuffle s[1] inputs 0")
