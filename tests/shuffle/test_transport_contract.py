"""One contract suite for every transport in ``shuffle._transport``.

Each test runs its own event loop (``asyncio.run``) under an overall deadline, and every
individual wait is bounded with ``asyncio.wait_for``. The ``harness`` closes the
transport at the end of each test and asserts that nothing was left open.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shuffle._transport import (
    AuthenticationError,
    BrokenTransportError,
    ClosedResourceError,
    EndOfStream,
    Endpoint,
    FrameLimits,
    Listener,
    ProtocolError,
    Transport,
    TransportConfig,
    TransportFallbackWarning,
    TransportUsageError,
    get_transport,
)
from shuffle._transport import ucx as ucx_module
from shuffle._transport._endpoint import FramedEndpoint
from shuffle._transport._frames import (
    FRAME_MAGIC,
    FRAME_PREFIX,
    FRAME_VERSION,
    KIND_DATA,
    prepare_frames,
)
from shuffle._transport._listener import ServingListener
from shuffle._transport.local import LocalTransport
from shuffle._transport.tcp import TcpTransport
from tests.shuffle.support import TRANSPORTS as NETWORK_TRANSPORTS
from tests.shuffle.support import FakeDeviceArray, echo_messages, eventually, skip_without_ucx, w

SECRET = b"s" * 32
TEST_DEADLINE = 120.0  # bound on a whole test
MiB = 1 << 20

TRANSPORTS = ["local", *NETWORK_TRANSPORTS]
pytestmark = pytest.mark.usefixtures("loopback_only")


@pytest.fixture(params=TRANSPORTS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), TEST_DEADLINE))


def connections(listener: Listener) -> int:
    assert isinstance(listener, ServingListener)
    return listener.connection_count


def holds_lock(endpoint: Endpoint, lock: str) -> bool:
    """Whether ``endpoint``'s send or receive lock is held: an operation is under way."""
    assert isinstance(endpoint, FramedEndpoint)
    held: asyncio.Lock = getattr(endpoint, lock)
    return held.locked()


def config(secret: bytes = SECRET, **overrides: Any) -> TransportConfig:
    options: dict[str, Any] = {
        "handshake_timeout": 5.0,
        "connect_timeout": 5.0,
        "close_timeout": 5.0,
    }
    options.update(overrides)
    return TransportConfig(secret=secret, **options)


class Harness:
    """Creates listeners/endpoints on one transport and checks they all end up closed.

    The default handler hands each accepted endpoint to the test (``accepted()``) and
    keeps it open until the harness ends.
    """

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self.listeners: list[Listener] = []
        self.clients: list[Endpoint] = []
        self.served: list[Endpoint] = []
        self._queue: asyncio.Queue[Endpoint] = asyncio.Queue()
        self._release = asyncio.Event()

    async def _hold(self, ep: Endpoint) -> None:
        self.served.append(ep)
        await self._queue.put(ep)
        await self._release.wait()

    async def echo(self, ep: Endpoint) -> None:
        self.served.append(ep)
        await echo_messages(ep)

    async def listen(
        self, handler: Callable[[Endpoint], Awaitable[None]] | None = None
    ) -> Listener:
        listener = await w(self.transport.listen("127.0.0.1", 0, handler or self._hold))
        self.listeners.append(listener)
        return listener

    async def connect(self, address: str, transport: Transport | None = None) -> Endpoint:
        ep = await w((transport or self.transport).connect(address))
        self.clients.append(ep)
        return ep

    async def accepted(self) -> Endpoint:
        return await w(self._queue.get())

    async def pair(self) -> tuple[Endpoint, Endpoint]:
        listener = await self.listen()
        client = await self.connect(listener.address)
        return client, await self.accepted()

    async def finish(self) -> None:
        self._release.set()
        await w(self.transport.close())
        assert self.transport.closed
        for listener in self.listeners:
            assert listener.closed
            assert isinstance(listener, ServingListener)
            assert listener.connection_count == 0
        open_endpoints = [ep for ep in self.clients + self.served if not ep.closed]
        assert not open_endpoints
        if self.transport.scheme == "ucx":
            assert ucx_module._RUNTIME._users == 0
            assert not ucx_module._RUNTIME._owned


@contextlib.asynccontextmanager
async def harness(kind: str, cfg: TransportConfig | None = None) -> AsyncIterator[Harness]:
    h = Harness(get_transport(kind, config=cfg or config()))  # type: ignore[arg-type]
    try:
        yield h
    except BaseException:
        with contextlib.suppress(Exception):
            await w(h.transport.close())
        raise
    await h.finish()


def as_bytes(frames: list[Any]) -> list[bytes]:
    return [bytes(memoryview(f).cast("B")) for f in frames]


# --------------------------------------------------------------------------- data


def test_roundtrip_multi_frame_messages(kind: str) -> None:
    async def main() -> None:
        async with harness(kind) as h:
            listener = await h.listen(h.echo)
            ep = await h.connect(listener.address)
            floats = np.arange(100, dtype=np.float64)
            messages: list[list[Any]] = [
                [b"header", b"", bytearray(b"x" * 1000), memoryview(b"abc"), floats, b""],
                [],
                [b""],
                [os.urandom(200_000)] * 3,
                # large frames alone, runs of small ones coalesced, empty ones: UCX
                # sends these wire buffers under one multi-buffer request
                [b"head", os.urandom(100_000), b"ab", b"", b"cd" * 1000, os.urandom(70_000), b""],
            ]
            for message in messages:
                await w(ep.send(message))
                echoed = await w(ep.recv())
                assert as_bytes(echoed) == as_bytes(message)
                # freshly allocated, writable host memory: bytearrays, or for UCX's
                # multi-buffer messages the numpy arrays ucxx received them into
                assert all(isinstance(f, (bytearray, np.ndarray)) for f in echoed)
                assert all(not memoryview(f).readonly for f in echoed)
            assert np.array_equal(
                np.frombuffer(echoed[1], dtype=np.uint8), np.frombuffer(messages[-1][1], np.uint8)
            )

    run(main)


def test_64mib_frame(kind: str) -> None:
    async def main() -> None:
        async with harness(kind) as h:

            async def digest(ep: Endpoint) -> None:
                h.served.append(ep)
                (frame,) = await ep.recv()
                await ep.send([hashlib.sha256(frame).digest(), struct.pack("<Q", len(frame))])

            listener = await h.listen(digest)
            ep = await h.connect(listener.address)
            big = np.random.default_rng(0).integers(0, 256, 64 * MiB, dtype=np.uint8).data
            await w(ep.send([big]))
            got_digest, got_size = await w(ep.recv())
            assert bytes(got_digest) == hashlib.sha256(big).digest()
            assert struct.unpack("<Q", got_size)[0] == 64 * MiB
            with pytest.raises(EndOfStream):  # the handler returned: the listener closed it
                await w(ep.recv())

    run(main)


def test_ordering_and_atomicity_with_concurrent_senders(kind: str) -> None:
    async def main() -> None:
        async with harness(kind) as h:
            client, server = await h.pair()
            senders, per_sender = 4, 40

            async def sender(sid: int) -> None:
                for seq in range(per_sender):
                    size = (seq * 7919) % 70_000
                    await client.send([struct.pack("<II", sid, seq), bytes([sid]) * size, b"end"])

            tasks = [asyncio.create_task(sender(i)) for i in range(senders)]
            last = dict.fromkeys(range(senders), -1)
            for _ in range(senders * per_sender):
                head, body, tail = as_bytes(await w(server.recv()))
                sid, seq = struct.unpack("<II", head)
                assert seq == last[sid] + 1, "messages of one sender arrive in order"
                last[sid] = seq
                assert body == bytes([sid]) * ((seq * 7919) % 70_000) and tail == b"end"
            await w(asyncio.gather(*tasks))

    run(main)


def test_many_concurrent_endpoints(kind: str) -> None:
    async def main() -> None:
        async with harness(kind) as h:
            listener = await h.listen(h.echo)

            async def client(i: int) -> None:
                ep = await h.connect(listener.address)
                for j in range(10):
                    payload = [f"{i}:{j}".encode(), bytes(j * 100)]
                    await ep.send(payload)
                    assert as_bytes(await w(ep.recv())) == payload
                await w(ep.close())

            await w(asyncio.gather(*(client(i) for i in range(16))))
            await eventually(lambda: len(h.served) == 16 and all(ep.closed for ep in h.served))

    run(main)


def test_custom_allocator(kind: str) -> None:
    calls: list[tuple[int, str]] = []

    def allocate(nbytes: int, memory_type: str) -> np.ndarray:
        calls.append((nbytes, memory_type))
        return np.empty(nbytes, dtype=np.uint8)

    async def main() -> None:
        async with harness(kind, config(allocator=allocate)) as h:
            client, server = await h.pair()
            calls.clear()
            await w(client.send([b"abc", b"", bytes(range(256)) * 10]))
            frames = await w(server.recv())
            assert all(isinstance(f, np.ndarray) for f in frames)
            assert as_bytes(frames) == [b"abc", b"", bytes(range(256)) * 10]
            assert calls == [(3, "host"), (0, "host"), (2560, "host")]

    run(main)


# --------------------------------------------------------------------------- close/abort


def test_close_delivers_pending_messages_then_end_of_stream(kind: str) -> None:
    async def main() -> None:
        async with harness(kind) as h:
            client, server = await h.pair()
            await w(client.send([b"one"]))
            await w(client.send([b"two", b"frames"]))
            await w(client.close())
            assert client.closed
            await w(client.close())  # idempotent
            client.abort()  # no-op once closed
            for op in (client.send([b"x"]), client.recv()):
                with pytest.raises(ClosedResourceError):
                    await w(op)
            assert as_bytes(await w(server.recv())) == [b"one"]
            assert as_bytes(await w(server.recv())) == [b"two", b"frames"]
            for _ in range(2):  # sticky
                with pytest.raises(EndOfStream):
                    await w(server.recv())
            with pytest.raises(BrokenTransportError):
                await w(server.send([b"too late"]))
            assert not server.closed

    run(main)


def test_close_waits_for_in_flight_send(kind: str) -> None:
    async def main() -> None:
        async with harness(kind) as h:
            client, server = await h.pair()
            big = bytes(16 * MiB)
            sending = asyncio.create_task(client.send([big]))
            # The send started (it holds the send lock), or a local send already ended.
            await eventually(lambda: sending.done() or holds_lock(client, "_send_lock"))
            closing = asyncio.create_task(client.close())
            (frame,) = await w(server.recv())
            assert len(frame) == len(big)
            with pytest.raises(EndOfStream):
                await w(server.recv())
            await w(asyncio.gather(sending, closing))

    run(main)


def test_abort_is_seen_as_broken_by_the_peer(kind: str) -> None:
    async def main() -> None:
        async with harness(kind) as h:
            client, server = await h.pair()
            await w(client.send([b"maybe delivered"]))
            client.abort()
            client.abort()  # idempotent
            assert client.closed
            for op in (client.send([b"x"]), client.recv()):
                with pytest.raises(ClosedResourceError):
                    await w(op)
            await w(client.close())  # no-op once aborted
            received = []
            with pytest.raises(BrokenTransportError) as info:
                while True:
                    received.append(as_bytes(await w(server.recv())))
            assert not isinstance(info.value, ProtocolError)
            assert received in ([], [[b"maybe delivered"]])
            with pytest.raises(BrokenTransportError):
                await w(server.send([b"x"]))
            with pytest.raises(BrokenTransportError):  # sticky
                await w(server.recv())

    run(main)


def test_close_and_abort_wake_pending_operations(kind: str) -> None:
    async def main() -> None:
        async with harness(kind) as h:
            for stop in ("close", "abort"):
                client, server = await h.pair()
                pending = asyncio.create_task(client.recv())
                await eventually(lambda c=client: holds_lock(c, "_recv_lock"))  # recv is waiting
                if stop == "close":
                    await w(client.close())
                else:
                    client.abort()
                with pytest.raises(ClosedResourceError):
                    await w(pending)
                expected = EndOfStream if stop == "close" else BrokenTransportError
                with pytest.raises(expected):
                    await w(server.recv())

    run(main)


def test_close_is_bounded_when_the_peer_stops_reading(kind: str) -> None:
    async def main() -> None:
        async with harness(kind, config(close_timeout=0.5)) as h:
            client, _ = await h.pair()  # the server never reads

            progress = [time.monotonic()]

            async def flood() -> None:
                while True:
                    await client.send([bytes(MiB)])
                    progress.append(time.monotonic())

            flooding = asyncio.create_task(flood())
            # Every buffer on the way is full once a send makes no progress for a while.
            await eventually(lambda: time.monotonic() - progress[-1] > 0.2)
            assert not flooding.done()
            started = time.monotonic()
            await w(client.close())
            assert time.monotonic() - started < 3.0
            with pytest.raises(ClosedResourceError):
                await w(flooding)

    run(main)


def test_cancelled_recv_aborts_the_endpoint(kind: str) -> None:
    async def main() -> None:
        async with harness(kind) as h:
            client, server = await h.pair()
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(client.recv(), 0.05)
            with pytest.raises(BrokenTransportError, match="cancelled"):
                await w(client.send([b"x"]))
            with pytest.raises(BrokenTransportError):
                await w(server.recv())

    run(main)


def test_handler_return_closes_and_listener_close_closes_everything(kind: str) -> None:
    async def main() -> None:
        async with harness(kind, config(connect_timeout=1.0)) as h:
            failures: list[BaseException] = []

            async def reply_once(ep: Endpoint) -> None:
                h.served.append(ep)
                await ep.send(as_bytes(await ep.recv()))

            async def wait_forever(ep: Endpoint) -> None:
                h.served.append(ep)
                try:
                    await ep.recv()
                except ClosedResourceError as e:
                    failures.append(e)
                    raise

            once = await h.listen(reply_once)
            ep = await h.connect(once.address)
            await w(ep.send([b"ping"]))
            assert as_bytes(await w(ep.recv())) == [b"ping"]
            with pytest.raises(EndOfStream):
                await w(ep.recv())

            forever = await h.listen(wait_forever)
            clients = [await h.connect(forever.address) for _ in range(3)]
            assert isinstance(forever, ServingListener)
            await eventually(lambda: forever.connection_count == 3)
            await w(forever.close())
            assert forever.closed
            assert len(failures) == 3
            for client in clients:
                with pytest.raises(EndOfStream):
                    await w(client.recv())
            with pytest.raises(BrokenTransportError):
                await h.connect(forever.address, h.transport)

    run(main)


def test_handler_exception_is_contained(kind: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="shuffle.transport")

    async def main() -> None:
        async with harness(kind) as h:

            async def fail(ep: Endpoint) -> None:
                h.served.append(ep)
                raise RuntimeError("handler bug")

            listener = await h.listen(fail)
            for _ in range(2):  # the listener keeps serving
                ep = await h.connect(listener.address)
                with pytest.raises(EndOfStream):
                    await w(ep.recv())
        assert "handler bug" in caplog.text

    run(main)


def test_transport_close_closes_everything_it_created(kind: str) -> None:
    async def main() -> None:
        async with harness(kind) as h:
            listener = await h.listen(h.echo)
            eps = [await h.connect(listener.address) for _ in range(3)]
            await w(h.transport.close())
            assert listener.closed and all(ep.closed for ep in eps)
            with pytest.raises(ClosedResourceError):
                await h.transport.connect(listener.address)
            with pytest.raises(ClosedResourceError):
                await h.transport.listen("127.0.0.1", 0, h.echo)

    run(main)


def test_async_context_managers(kind: str) -> None:
    async def main() -> None:
        async with get_transport(kind, config=config()) as transport:  # type: ignore[arg-type]
            h = Harness(transport)
            async with await h.listen(h.echo) as listener:
                async with await h.connect(listener.address) as ep:
                    await w(ep.send([b"x"]))
                    assert as_bytes(await w(ep.recv())) == [b"x"]
                assert ep.closed
            assert listener.closed
        assert transport.closed

    run(main)


# --------------------------------------------------------------------------- auth


def test_authentication_success_and_wrong_secret(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="shuffle.transport")

    async def main() -> None:
        async with harness(kind) as h:
            listener = await h.listen()
            intruder = get_transport(kind, config=config(secret=b"x" * 32))  # type: ignore[arg-type]
            try:
                with pytest.raises(AuthenticationError, match="does not know the shared secret"):
                    await w(intruder.connect(listener.address))
                # The other way round: a server with the wrong secret is refused too.
                fake = await w(intruder.listen("127.0.0.1", 0, h.echo))
                with pytest.raises(AuthenticationError):
                    await h.connect(fake.address)
            finally:
                await w(intruder.close())
            await eventually(lambda: connections(listener) == 0)
            assert h.served == []  # the handler never saw the intruder
            client = await h.connect(listener.address)
            server = await h.accepted()
            await w(client.send([b"authenticated"]))
            assert as_bytes(await w(server.recv())) == [b"authenticated"]
        assert "dropped a connection" in caplog.text

    run(main)


def test_silent_client_is_dropped_at_the_handshake_deadline(kind: str) -> None:
    async def main() -> None:
        async with harness(kind, config(handshake_timeout=0.5)) as h:
            listener = await h.listen()
            started = time.monotonic()
            await raw_client(kind, h, listener.address, payload=None)
            assert time.monotonic() - started < 5.0
            assert h.served == []
            await eventually(lambda: connections(listener) == 0)

    run(main)


GARBAGE = b"GET / HTTP/1.1\r\nHost: example\r\n\r\n" * 30
ABSURD_COUNT = FRAME_PREFIX.pack(FRAME_MAGIC, FRAME_VERSION, KIND_DATA, 0x7FFFFFFF)
ABSURD_SIZE = FRAME_PREFIX.pack(FRAME_MAGIC, FRAME_VERSION, KIND_DATA, 1) + struct.pack(
    "<QB", 1 << 60, 0
)


async def raw_client(kind: str, h: Harness, address: str, payload: bytes | None) -> None:
    """Connect without authenticating, send ``payload`` (None: nothing) and wait until the
    listener drops the connection."""
    if kind == "tcp":
        host, port = address.removeprefix("tcp://").rsplit(":", 1)
        reader, writer = await w(asyncio.open_connection(host, int(port)))
        try:
            if payload is not None:
                writer.write(payload)
                await w(writer.drain())
            with contextlib.suppress(ConnectionResetError):
                assert await w(reader.read()) == b""
        finally:
            writer.close()
            with contextlib.suppress(ConnectionResetError):
                await w(writer.wait_closed())
        return
    raw = await w(h.transport._open(address))  # type: ignore[attr-defined]
    try:
        if payload is not None and kind == "ucx":
            await w(raw._ep.send(payload))  # bytes straight onto the UCX tag
        elif payload is not None:
            # The in-memory pipe carries messages, not bytes: send the equivalent message
            # (the sender's own limit check is lifted so that it reaches the listener).
            raw.set_limits(FrameLimits())
            equivalent = {
                GARBAGE: [payload],
                ABSURD_COUNT: [b""] * 1000,
                ABSURD_SIZE: [bytes(MiB)],
            }
            await w(raw.send(equivalent[payload]))
        with pytest.raises(BrokenTransportError):
            await w(raw.recv())
    finally:
        raw.abort()


@pytest.mark.parametrize(
    "payload", [GARBAGE, ABSURD_COUNT, ABSURD_SIZE], ids=["garbage", "count", "size"]
)
def test_raw_client_sending_garbage_is_dropped(
    kind: str, payload: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="shuffle.transport")

    async def main() -> None:
        async with harness(kind) as h:
            listener = await h.listen(h.echo)
            good = await h.connect(listener.address)
            await w(raw_client(kind, h, listener.address, payload))
            await w(good.send([b"still served"]))
            assert as_bytes(await w(good.recv())) == [b"still served"]
            late = await h.connect(listener.address)
            await w(late.send([b"new connections too"]))
            assert as_bytes(await w(late.recv())) == [b"new connections too"]
            assert len(h.served) == 2
        assert "dropped a connection" in caplog.text

    run(main)


def test_receiver_enforces_its_limits_after_the_handshake(kind: str) -> None:
    async def main() -> None:
        tight = config(
            limits=FrameLimits(max_frames=8, max_frame_bytes=1024, max_message_bytes=4096)
        )
        async with harness(kind, tight) as h:
            listener = await h.listen()
            loose = get_transport(kind, config=config())  # type: ignore[arg-type]
            try:
                client = await h.connect(listener.address, loose)
                server = await h.accepted()
                await w(client.send([bytes(1024)] * 4))  # within the limits
                assert len(await w(server.recv())) == 4
                await w(client.send([bytes(2048)]))
                with pytest.raises(ProtocolError, match="exceeds"):
                    await w(server.recv())
                with pytest.raises(BrokenTransportError):
                    await w(client.recv())
            finally:
                await w(loose.close())

    run(main)


# --------------------------------------------------------------------------- misuse


def fake_device_frame() -> FakeDeviceArray:
    """Device memory to be inspected, never read (no transport here reads it)."""
    return FakeDeviceArray(np.zeros((10, 4), np.float32))


def test_usage_errors(kind: str) -> None:
    async def main() -> None:
        limits = FrameLimits(max_frames=4, max_frame_bytes=100, max_message_bytes=200)
        async with harness(kind, config(limits=limits)) as h:
            client, server = await h.pair()
            bad_messages: list[Any] = [
                b"not a list of frames",
                [object()],
                [np.arange(20, dtype=np.uint8)[::2]],  # not contiguous
                [b""] * 5,
                [bytes(101)],
                [bytes(100), bytes(100), bytes(1)],
            ]
            if kind != "ucx":
                bad_messages.append([fake_device_frame()])
            for message in bad_messages:
                with pytest.raises(TransportUsageError):
                    await w(client.send(message))
            await w(client.send([b"the endpoint is still fine"]))
            assert as_bytes(await w(server.recv())) == [b"the endpoint is still fine"]
            for address in (
                "nonsense",
                "http://127.0.0.1:80",
                f"{kind}://127.0.0.1:",
                f"{kind}://:80",
            ):
                with pytest.raises(TransportUsageError):
                    await h.transport.connect(address)

    run(main)


def test_listen_again_on_the_same_port_after_close(kind: str) -> None:
    async def main() -> None:
        async with harness(kind) as h:
            first = await h.listen(h.echo)
            eps = [await h.connect(first.address) for _ in range(3)]
            for ep in eps:
                await w(ep.send([b"x"]))
                await w(ep.recv())
            await w(first.close())  # closes the accepted side first: TIME_WAIT on its port
            port = int(first.address.rsplit(":", 1)[1])
            second = await w(h.transport.listen("127.0.0.1", port, h.echo))
            h.listeners.append(second)
            assert second.address == first.address
            ep = await h.connect(second.address)
            await w(ep.send([b"again"]))
            assert as_bytes(await w(ep.recv())) == [b"again"]

    run(main)


def test_connect_to_nothing_is_a_broken_transport(kind: str) -> None:
    async def main() -> None:
        async with harness(kind, config(connect_timeout=1.0)) as h:
            listener = await h.listen()
            address = listener.address
            await w(listener.close())
            with pytest.raises(BrokenTransportError):
                await h.connect(address)

    run(main)


# --------------------------------------------------------------------------- non-parametrised


def test_config_validation() -> None:
    with pytest.raises(TransportUsageError):
        TransportConfig(secret=b"short")
    with pytest.raises(TransportUsageError):
        TransportConfig(secret="not bytes" * 4)  # type: ignore[arg-type]
    with pytest.raises(TransportUsageError):
        TransportConfig(secret=SECRET, handshake_timeout=0)
    with pytest.raises(TransportUsageError):
        FrameLimits(max_frames=0)
    assert SECRET.decode() not in repr(TransportConfig(secret=SECRET))


def test_device_frames_are_passed_through_for_ucx_only() -> None:
    limits = FrameLimits()
    (frame,) = prepare_frames([fake_device_frame()], limits, allow_device=True, who="test")
    assert frame.memory_type == "cuda" and frame.nbytes == 160
    assert isinstance(frame.data, FakeDeviceArray)  # sent as is, no host copy
    with pytest.raises(TransportUsageError):
        prepare_frames([fake_device_frame()], limits, allow_device=False, who="test")


def test_get_transport(monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(get_transport("local", config=config()), LocalTransport)
    assert isinstance(get_transport("tcp", config=config()), TcpTransport)
    with pytest.raises(TransportUsageError):
        get_transport("carrier-pigeon", config=config())  # type: ignore[arg-type]
    monkeypatch.setattr(ucx_module, "is_available", lambda: False)
    with pytest.warns(TransportFallbackWarning):
        assert isinstance(get_transport("auto", config=config()), TcpTransport)
    with pytest.raises(TransportUsageError):
        get_transport("ucx", config=config())


@pytest.mark.ucx
@skip_without_ucx
def test_ucx_runtime_follows_a_new_event_loop() -> None:
    """ucxx binds its threads to one loop; a new loop (a transport left unclosed on the
    old one) gets a fresh ucxx context instead of a hang."""

    async def use(close: bool) -> int:
        transport = get_transport("ucx", config=config())
        h = Harness(transport)
        listener = await h.listen(h.echo)
        ep = await h.connect(listener.address)
        await w(ep.send([b"x"]))
        assert as_bytes(await w(ep.recv())) == [b"x"]
        await w(ep.close())
        await w(listener.close())
        generation = ucx_module._RUNTIME._generation
        if close:
            await h.finish()
        return generation

    first = asyncio.run(asyncio.wait_for(use(close=False), TEST_DEADLINE))
    second = asyncio.run(asyncio.wait_for(use(close=True), TEST_DEADLINE))
    assert second == first + 1


@pytest.mark.ucx
@skip_without_ucx
def test_ucx_process_exits_without_transport_close(tmp_path: Any) -> None:
    """ucxx's notifier thread is not a daemon: the exit hook must stop it."""
    script = tmp_path / "leave_open.py"
    script.write_text(
        "import asyncio\n"
        "from shuffle._transport import get_transport, TransportConfig\n"
        "async def main():\n"
        "    t = get_transport('ucx', config=TransportConfig(secret=b's' * 32))\n"
        "    async def echo(ep):\n"
        "        await ep.send(await ep.recv())\n"
        "    listener = await t.listen('127.0.0.1', 0, echo)\n"
        "    ep = await t.connect(listener.address)\n"
        "    await ep.send([b'x'])\n"
        "    assert await ep.recv() == [b'x']\n"
        "    print('done', flush=True)\n"
        "asyncio.run(main())\n"
    )
    root = Path(__file__).resolve().parents[2]
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=root,
        # Keep an inherited PYTHONPATH: ucxx may be installed on it (as on a GPU node).
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join(
                [str(root), *filter(None, [os.environ.get("PYTHONPATH")])]
            ),
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "done" in result.stdout
    assert time.monotonic() - started < 30


@pytest.mark.ucx
@skip_without_ucx
def test_auto_prefers_ucx() -> None:
    assert isinstance(get_transport("auto", config=config()), ucx_module.UcxTransport)
    assert os.environ["UCX_MM_ERROR_HANDLING"] == "y"  # set before UCX initialises


def test_coalescing_plan_groups_runs_of_small_host_frames_in_order() -> None:
    from shuffle._transport._frames import coalesce_groups

    k = 2**10
    sizes = [10, 0, 20, 100 * k, 30, 40, 5, 7, 9]
    memtypes = ["host", "host", "host", "host", "cuda", "host", "host", "host", "host"]
    # Small host runs are cut by large frames, device frames and the group budget;
    # empty frames travel not at all.
    assert coalesce_groups(sizes, memtypes, frame_bytes=64 * k, group_bytes=50) == [
        (0, 2),
        (3,),
        (4,),
        (5, 6),
        (7, 8),
    ]
    assert coalesce_groups([], []) == []
    assert coalesce_groups([0, 0], ["host", "host"]) == []


@pytest.mark.ucx
@skip_without_ucx
def test_ucx_sends_an_all_host_message_as_two_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    requests: list[tuple[str, int]] = []
    endpoint = ucx_module._UcxEndpoint
    post_send, post_multi = endpoint._post_send, endpoint._post_send_multi

    async def counting_send(self: Any, buffer: Any) -> None:
        requests.append(("send", memoryview(buffer).nbytes))
        await post_send(self, buffer)

    async def counting_multi(self: Any, buffers: list[Any]) -> None:
        requests.append(("multi", len(buffers)))
        await post_multi(self, buffers)

    monkeypatch.setattr(endpoint, "_post_send", counting_send)
    monkeypatch.setattr(endpoint, "_post_send_multi", counting_multi)
    big = [os.urandom(100_000 + i) for i in range(64)]

    async def main() -> None:
        async with harness("ucx") as h:
            client, server = await h.pair()
            requests.clear()
            # concurrently: UCX completes a large send once the receive is posted
            _, frames = await w(
                asyncio.gather(client.send([b"small", *big, b"", b"tail"]), server.recv())
            )
            assert as_bytes(frames) == [b"small", *big, b"", b"tail"]
            # the header, then 66 wire buffers (64 large frames, two small ones alone
            # between them) in one multi request instead of 66 UCX messages
            assert requests[0][0] == "send" and requests[1:] == [("multi", 66)]
            requests.clear()
            await w(client.send([b"a", b"b"]))  # one coalesced buffer: no multi request
            assert as_bytes(await w(server.recv())) == [b"a", b"b"]
            assert [kind for kind, _ in requests] == ["send", "send"]

    run(main)
