"""Out-of-band transports for the shuffle service.

``get_transport(name, config=TransportConfig(secret=...))`` returns a
:class:`~.base.Transport`; the contract (messages of frames, close versus abort, the
error types, authentication) is documented in ``base.py``. Transports: ``"ucx"``
(ucxx, the production path), ``"tcp"`` (asyncio sockets), ``"local"`` (in-memory twin
for tests) and ``"auto"`` (UCX when ucxx is importable, else TCP with a
``TransportFallbackWarning``).
"""

from __future__ import annotations

import warnings
from typing import Literal

from ._errors import (
    AuthenticationError,
    BrokenTransportError,
    ClosedResourceError,
    EndOfStream,
    PeerClosedError,
    ProtocolError,
    TransportError,
    TransportFallbackWarning,
    TransportUsageError,
)
from ._ports import PortRangeExhaustedError, listen_in_range
from .base import (
    Allocator,
    Endpoint,
    Frame,
    FrameLimits,
    Handler,
    Listener,
    ListenerStats,
    MemoryType,
    Transport,
    TransportConfig,
    host_allocator,
)

__all__ = [
    "Allocator",
    "AuthenticationError",
    "BrokenTransportError",
    "ClosedResourceError",
    "EndOfStream",
    "Endpoint",
    "Frame",
    "FrameLimits",
    "Handler",
    "Listener",
    "ListenerStats",
    "MemoryType",
    "PeerClosedError",
    "PortRangeExhaustedError",
    "ProtocolError",
    "Transport",
    "TransportConfig",
    "TransportError",
    "TransportFallbackWarning",
    "TransportName",
    "TransportUsageError",
    "get_transport",
    "host_allocator",
    "listen_in_range",
]

TransportName = Literal["ucx", "tcp", "local", "auto"]


def get_transport(name: TransportName, *, config: TransportConfig) -> Transport:
    """Create a transport by name. ``"auto"`` prefers UCX and warns when it falls back."""
    if name == "local":
        from .local import LocalTransport

        return LocalTransport(config)
    if name == "tcp":
        from .tcp import TcpTransport

        return TcpTransport(config)
    if name in ("ucx", "auto"):
        from . import ucx

        if ucx.is_available():
            return ucx.UcxTransport(config)
        if name == "ucx":
            raise TransportUsageError("the ucx transport needs ucxx, which cannot be imported")
        warnings.warn(
            "ucxx cannot be imported; the shuffle transport falls back to TCP",
            TransportFallbackWarning,
            stacklevel=2,
        )
        from .tcp import TcpTransport

        return TcpTransport(config)
    raise TransportUsageError(f"unknown transport {name!r}; expected ucx, tcp, local or auto")
