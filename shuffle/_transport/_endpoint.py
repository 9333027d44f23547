"""``FramedEndpoint``: the endpoint state machine shared by the concrete transports.

States closed / peer closed / broken, locking, error translation and the goodbye
message. A transport only implements how one message travels
(``_send_message``/``_recv_message``) and how to tear down.
"""

from __future__ import annotations

import abc
import asyncio
import logging
from collections.abc import Coroutine, Sequence
from typing import Any, ClassVar, TypeVar

from shuffle._closable import Closable

from ._errors import (
    BrokenTransportError,
    ClosedResourceError,
    EndOfStream,
    ProtocolError,
    TransportError,
)
from ._frames import KIND_DATA, KIND_GOODBYE, OutFrame, prepare_frames
from .base import HANDSHAKE_LIMITS, Endpoint, FrameLimits, TransportConfig

logger = logging.getLogger("shuffle.transport")

_T = TypeVar("_T")


class ConnectionLost(Exception):
    """Raised by transport hooks when the connection went away (EOF, peer gone, or our
    own teardown woke a waiter). ``FramedEndpoint`` translates it."""


class FramedEndpoint(Closable, Endpoint):
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
            # A copy, never the raised error: that one gets a traceback (and a cause)
            # whose frames hold the message being received, which a stored error would
            # keep alive, in a cycle through this endpoint, for as long as it exists.
            self._broken = type(error)(str(error))
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
