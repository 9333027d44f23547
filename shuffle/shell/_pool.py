"""``EndpointPool``: a sender's authenticated endpoints, one per actor address.

Each endpoint is used as request/response: a message goes out, the actor's ack or
typed error (``shuffle.wire._reply``) comes back. A request that fails on a pooled
connection is retried once on a fresh one: the actor may have dropped an idle
connection, and a resent shard is dropped by its ``ShardKey`` if it had arrived.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection, Sequence
from typing import Any

from shuffle._transport import ClosedResourceError, Endpoint, Transport, TransportError
from shuffle.wire._reply import decode_reply

__all__ = ["EndpointPool"]

logger = logging.getLogger(__name__)


class EndpointPool:
    """Authenticated endpoints of one transport, one per address, used as request/response.

    Use from one event loop. One request at a time per endpoint (a lock), so replies
    pair with requests by order alone.
    """

    def __init__(self, transport: Transport, *, request_timeout: float) -> None:
        self._transport = transport
        self._request_timeout = request_timeout
        self._endpoints: dict[str, Endpoint] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._closed = False

    def __repr__(self) -> str:
        return f"<EndpointPool {self._transport.scheme} endpoints={sorted(self._endpoints)}>"

    @property
    def addresses(self) -> list[str]:
        """Addresses with an open pooled endpoint."""
        return sorted(self._endpoints)

    def retain(self, addresses: Collection[str]) -> None:
        """Drop the endpoints to every other address (actors that were replaced)."""
        for address in set(self._endpoints) - set(addresses):
            lock = self._locks.get(address)
            if lock is None or not lock.locked():
                self._discard(address, self._endpoints[address])
                self._locks.pop(address, None)

    async def send(self, address: str, frames: Sequence[Any]) -> None:
        """Send one message to ``address`` and wait for its ack; raise the peer's error."""
        if self._closed:
            raise ClosedResourceError(f"{self!r} is closed")
        lock = self._locks.setdefault(address, asyncio.Lock())
        deadline = asyncio.timeout(self._request_timeout)
        try:
            async with deadline, lock:
                reply = await self._exchange(address, frames)
        except TimeoutError:
            if not deadline.expired():
                raise
            raise TimeoutError(
                f"{address} did not acknowledge a shuffle message within "
                f"{self._request_timeout:g} s (ClientConfig.request_timeout)"
            ) from None
        finally:
            # It holds this task, which keeps its cancellation, whose traceback holds
            # this frame (and the message): no cycle.
            del deadline
        error = decode_reply(reply, peer=address)
        if error is not None:
            error.add_note(f"reported by the shuffle actor at {address}")
            try:
                raise error
            finally:
                del error  # its traceback holds this frame (and the message): no cycle

    async def connect(self, address: str) -> None:
        """Open (and authenticate) the pooled endpoint to ``address`` unless it is open."""
        if self._closed:
            raise ClosedResourceError(f"{self!r} is closed")
        lock = self._locks.setdefault(address, asyncio.Lock())
        async with asyncio.timeout(self._request_timeout), lock:
            if address not in self._endpoints:
                self._endpoints[address] = await self._transport.connect(address)

    async def _exchange(self, address: str, frames: Sequence[Any]) -> list[Any]:
        endpoint = self._endpoints.get(address)
        if endpoint is not None:
            try:
                return await self._request(address, endpoint, frames)
            except TransportError as e:
                logger.info("%s: pooled connection failed (%s); reconnecting", address, e)
        endpoint = await self._transport.connect(address)
        self._endpoints[address] = endpoint
        return await self._request(address, endpoint, frames)

    async def _request(self, address: str, endpoint: Endpoint, frames: Sequence[Any]) -> list[Any]:
        try:
            await endpoint.send(frames)
            return await endpoint.recv()
        except BaseException:
            # Cancelled, timed out or broken half-way: a reply may still be in flight,
            # so this connection can no longer pair replies with requests.
            self._discard(address, endpoint)
            raise

    def _discard(self, address: str, endpoint: Endpoint) -> None:
        endpoint.abort()
        if self._endpoints.get(address) is endpoint:
            del self._endpoints[address]

    async def close(self, *, graceful: bool = True) -> None:
        """Close every endpoint (``graceful=False``: abort them) and the transport."""
        self._closed = True
        endpoints = list(self._endpoints.values())
        self._endpoints.clear()
        if graceful:
            await asyncio.gather(*(ep.close() for ep in endpoints), return_exceptions=True)
        else:
            for endpoint in endpoints:
                endpoint.abort()
        await self._transport.close()
