"""``BaseTransport``: what the framed transports (TCP, UCX, local) share.

``connect`` opens a raw endpoint and authenticates it; the transport tracks what it
created, so ``close`` closes listeners (which close the endpoints they accepted) and
endpoints it still owns.
"""

from __future__ import annotations

import abc
import asyncio
import weakref

from shuffle._closable import Closable

from ._endpoint import FramedEndpoint
from ._errors import ClosedResourceError, TransportUsageError
from ._handshake import authenticate_client
from ._listener import ServingListener
from .base import AsyncResource, Endpoint, Handler, Listener, Transport, TransportConfig


class BaseTransport(Closable, Transport):
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
