"""Transport errors: one type per failure kind.

Modelled on anyio's stream exceptions. Callers branch on *what happened*, never on
which transport raised it:

==========================  ==============================================================
``ClosedResourceError``     this side closed (or aborted) the endpoint/listener/transport
``EndOfStream``             the peer closed gracefully; every message it sent was received
``BrokenTransportError``    the connection failed: reset, peer crashed or aborted, could not
                            connect or bind, an operation was cancelled mid-message
``ProtocolError``           (a ``BrokenTransportError``) the peer sent bytes that are not a
                            valid message or exceed the configured limits
``AuthenticationError``     a connection was made but the handshake did not complete
``TransportUsageError``     the caller misused the API (bad address, frame type, config)
==========================  ==============================================================
"""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "BrokenTransportError",
    "ClosedResourceError",
    "EndOfStream",
    "PeerClosedError",
    "ProtocolError",
    "TransportError",
    "TransportFallbackWarning",
    "TransportUsageError",
]


class TransportError(Exception):
    """Base class of every error raised by ``shuffle._transport``."""


class ClosedResourceError(TransportError):
    """The resource was closed or aborted by this side; it cannot be used any more."""


class EndOfStream(TransportError):
    """The peer closed the endpoint gracefully; no further messages will arrive.

    Only ``recv`` raises it, after every message the peer sent before closing was
    delivered. It is sticky: later ``recv`` calls raise it again.
    """


#: Alias: the same type under the name used by some callers.
PeerClosedError = EndOfStream


class BrokenTransportError(TransportError):
    """The connection failed and is unusable (reset, peer died or aborted, I/O error).

    Messages that had already arrived before the failure may still have been
    delivered; anything later is lost. The endpoint has released its resources, but
    ``close()`` may still be called (and is cheap).
    """


class ProtocolError(BrokenTransportError):
    """The peer sent something that is not a valid message, or exceeds our limits.

    Raised before any buffer for the offending message is allocated. The connection
    cannot be resynchronised, so it is aborted.
    """


class AuthenticationError(TransportError):
    """The connection handshake failed: wrong secret, not our protocol, the peer hung
    up during the handshake, or the handshake deadline passed."""


class TransportUsageError(TransportError):
    """The API was used incorrectly (bad address or frame, invalid configuration)."""


class TransportFallbackWarning(UserWarning):
    """``get_transport("auto")`` could not use UCX and fell back to TCP."""
