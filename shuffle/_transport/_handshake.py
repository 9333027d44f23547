"""Mutual challenge-response authentication, independent of the transport.

Runs over the message ``send``/``recv`` of a fresh endpoint (still under
``HANDSHAKE_LIMITS``, so an unauthenticated peer cannot make us allocate more than a
few hundred bytes), within ``TransportConfig.handshake_timeout``::

    client -> server   HELLO      [PROTOCOL, client_nonce]
    server -> client   CHALLENGE  [PROTOCOL, server_nonce, mac("server")]
    client -> server   RESPONSE   [mac("client")]
    server -> client   ACCEPT     [b"ok"]

    mac(role) = HMAC-SHA256(secret, role | PROTOCOL | client_nonce | server_nonce)

Each side proves knowledge of the secret over a nonce chosen by the other side, so
neither a recorded exchange (replay) nor the server's own answer (reflection: the
role label differs) can be reused. The client checks the server's MAC before
revealing its own, so a client holding the wrong secret fails locally with
``AuthenticationError`` and the server only sees it hang up. ACCEPT lets ``connect``
return only once the server has admitted the connection. MACs are compared in
constant time.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
from typing import TYPE_CHECKING, Any

from ._errors import AuthenticationError, ClosedResourceError, TransportError

if TYPE_CHECKING:
    from .base import Endpoint, TransportConfig

__all__ = ["PROTOCOL", "authenticate_client", "authenticate_server"]

PROTOCOL = b"ray-oob-shuffle/1"
NONCE_BYTES = 32
_ACCEPT = b"ok"


def _mac(secret: bytes, role: bytes, client_nonce: bytes, server_nonce: bytes) -> bytes:
    return hmac.new(
        secret, b"|".join((role, PROTOCOL, client_nonce, server_nonce)), hashlib.sha256
    ).digest()


def _expect(message: list[Any], nframes: int, step: str) -> list[bytes]:
    frames = [bytes(f) for f in message]
    if len(frames) != nframes:
        raise AuthenticationError(f"{step}: expected {nframes} frames, got {len(frames)}")
    return frames


async def _client(endpoint: Endpoint, secret: bytes) -> None:
    client_nonce = secrets.token_bytes(NONCE_BYTES)
    await endpoint.send([PROTOCOL, client_nonce])
    protocol, server_nonce, server_mac = _expect(await endpoint.recv(), 3, "challenge")
    if protocol != PROTOCOL or len(server_nonce) != NONCE_BYTES:
        raise AuthenticationError(f"peer speaks {protocol[:40]!r}, not {PROTOCOL!r}")
    expected = _mac(secret, b"server", client_nonce, server_nonce)
    if not hmac.compare_digest(server_mac, expected):
        raise AuthenticationError("the server does not know the shared secret")
    await endpoint.send([_mac(secret, b"client", client_nonce, server_nonce)])
    (answer,) = _expect(await endpoint.recv(), 1, "accept")
    if answer != _ACCEPT:
        raise AuthenticationError("the server did not accept the connection")


async def _server(endpoint: Endpoint, secret: bytes) -> None:
    protocol, client_nonce = _expect(await endpoint.recv(), 2, "hello")
    if protocol != PROTOCOL or len(client_nonce) != NONCE_BYTES:
        raise AuthenticationError(f"peer speaks {protocol[:40]!r}, not {PROTOCOL!r}")
    server_nonce = secrets.token_bytes(NONCE_BYTES)
    await endpoint.send(
        [PROTOCOL, server_nonce, _mac(secret, b"server", client_nonce, server_nonce)]
    )
    (client_mac,) = _expect(await endpoint.recv(), 1, "response")
    expected = _mac(secret, b"client", client_nonce, server_nonce)
    if not hmac.compare_digest(client_mac, expected):
        raise AuthenticationError("the client does not know the shared secret")
    await endpoint.send([_ACCEPT])


async def _run(role: str, endpoint: Endpoint, config: TransportConfig) -> None:
    step = _client if role == "client" else _server
    try:
        await asyncio.wait_for(step(endpoint, config.secret), config.handshake_timeout)
    except ClosedResourceError:
        raise
    except AuthenticationError as e:
        raise AuthenticationError(f"{endpoint.name}: {e}") from e
    except TimeoutError as e:
        raise AuthenticationError(
            f"{endpoint.name}: handshake not completed within {config.handshake_timeout}s"
        ) from e
    except TransportError as e:  # its message names the endpoint already
        raise AuthenticationError(f"handshake failed: {e}") from e


async def authenticate_client(endpoint: Endpoint, config: TransportConfig) -> None:
    """Run the client side; raise ``AuthenticationError`` unless both sides proved the secret."""
    await _run("client", endpoint, config)


async def authenticate_server(endpoint: Endpoint, config: TransportConfig) -> None:
    """Run the server side; raise ``AuthenticationError`` unless both sides proved the secret."""
    await _run("server", endpoint, config)
