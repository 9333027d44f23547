"""Listeners bind within a configured port range (TCP and UCX), and say so when it is full."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
from collections.abc import Iterator

import pytest

from shuffle._transport import (
    Endpoint,
    Listener,
    PortRangeExhaustedError,
    TransportConfig,
    get_transport,
    listen_in_range,
)
from tests.shuffle.support import TRANSPORTS, WAIT

pytestmark = pytest.mark.usefixtures("loopback_only")


@contextlib.contextmanager
def free_block(size: int) -> Iterator[int]:
    """A block of ``size`` ports that were all free a moment ago; its first port stays
    held (bound and listening on every interface) while the block is in use."""
    rng = random.Random()
    for _ in range(50):
        first = rng.randrange(20_000, 32_000)  # below Linux's ephemeral range
        held: list[socket.socket] = []
        try:
            for port in range(first, first + size):
                s = socket.socket()
                held.append(s)
                s.bind(("0.0.0.0", port))
                s.listen()
        except OSError:
            for s in held:
                s.close()
            continue
        for s in held[1:]:
            s.close()
        try:
            yield first
        finally:
            held[0].close()
        return
    raise RuntimeError("no free block of ports found")


async def _ignore(endpoint: Endpoint) -> None:
    return None


def _port(listener: Listener) -> int:
    return int(listener.address.rsplit(":", 1)[1])


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_listeners_take_the_free_ports_of_the_range_in_order_then_fail_naming_it(kind):
    async def main() -> None:
        transport = get_transport(kind, config=TransportConfig(secret=b"s" * 32))
        try:
            with free_block(3) as first:
                ports = (first, first + 2)
                a = await asyncio.wait_for(
                    listen_in_range(transport, host="127.0.0.1", ports=ports, handler=_ignore),
                    WAIT,
                )
                b = await asyncio.wait_for(
                    listen_in_range(transport, host="127.0.0.1", ports=ports, handler=_ignore),
                    WAIT,
                )
                # The first port is held by another socket: skipped.
                assert (_port(a), _port(b)) == (first + 1, first + 2)
                with pytest.raises(PortRangeExhaustedError, match=f"{first}-{first + 2}"):
                    await asyncio.wait_for(
                        listen_in_range(transport, host="127.0.0.1", ports=ports, handler=_ignore),
                        WAIT,
                    )
                # A connection through the advertised address works.
                endpoint = await asyncio.wait_for(transport.connect(a.address), WAIT)
                await endpoint.close()
                await a.close()
                # A freed port is taken again.
                c = await asyncio.wait_for(
                    listen_in_range(transport, host="127.0.0.1", ports=ports, handler=_ignore),
                    WAIT,
                )
                assert _port(c) == first + 1
        finally:
            await asyncio.wait_for(transport.close(), WAIT)

    asyncio.run(main())


def test_no_range_lets_the_system_pick():
    async def main() -> None:
        transport = get_transport("tcp", config=TransportConfig(secret=b"s" * 32))
        try:
            listener = await listen_in_range(
                transport, host="127.0.0.1", ports=None, handler=_ignore
            )
            assert _port(listener) > 0
        finally:
            await transport.close()

    asyncio.run(main())


@pytest.mark.parametrize("ports", [(0, 10), (20, 10), (1, 65536)])
def test_an_invalid_range_is_refused(ports):
    async def main() -> None:
        transport = get_transport("tcp", config=TransportConfig(secret=b"s" * 32))
        try:
            with pytest.raises(ValueError, match="invalid port range"):
                await listen_in_range(transport, host="127.0.0.1", ports=ports, handler=_ignore)
        finally:
            await transport.close()

    asyncio.run(main())
