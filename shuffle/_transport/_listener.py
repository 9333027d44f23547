"""``ServingListener``: handshake, then the handler, for every accepted connection."""

from __future__ import annotations

import abc
import asyncio
import logging

from ._endpoint import FramedEndpoint
from ._errors import (
    AuthenticationError,
    BrokenTransportError,
    ClosedResourceError,
    EndOfStream,
    ProtocolError,
)
from ._handshake import authenticate_server
from .base import Handler, Listener, ListenerStats, TransportConfig

logger = logging.getLogger("shuffle.transport")


class ServingListener(Listener):
    """Runs ``handshake -> handler -> close`` for every accepted connection."""

    def __init__(self, *, config: TransportConfig, handler: Handler, address: str) -> None:
        self._config = config
        self._handler = handler
        self._address = address
        self._closed = False
        self._connections: dict[asyncio.Task[None], FramedEndpoint] = {}
        self._stats = ListenerStats()

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
    def stats(self) -> ListenerStats:
        return self._stats

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
            self._stats.handshakes_failed += 1
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
            if isinstance(e, ProtocolError):
                self._stats.protocol_errors += 1
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
