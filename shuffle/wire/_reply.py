"""The shuffle actor's answer to each message: an ack, or the typed error that refused it.

Senders wait for this answer before they count a message as delivered, so a reply
means "stored" (or "refused, and why"). Replies come from the network, so nothing here
unpickles: an error travels as JSON ``{"type", "args", "message"}``, and the receiver
rebuilds it only for an allow-list of shuffle error types whose constructor arguments
are plain values (every class in ``_exceptions`` keeps them as ``args``). Any other
error arrives as ``RemoteShuffleError`` naming the original type and message.

Frames: ``[b"ok"]``, or ``[b"error", json]``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from shuffle._exceptions import (
    BufferClosedError,
    FrameError,
    InconsistentInputsError,
    LimiterTimeoutError,
    RemoteShuffleError,
    ShuffleClosedError,
    ShuffleError,
    StaleRunError,
    UnknownRunError,
)

__all__ = ["ACK", "decode_reply", "encode_error"]

_OK = b"ok"
_ERROR = b"error"
ACK: list[bytes] = [_OK]

#: Errors rebuilt as themselves on the sender's side, by class name.
_TYPED: dict[str, type[ShuffleError]] = {
    cls.__name__: cls
    for cls in (
        StaleRunError,
        UnknownRunError,
        ShuffleClosedError,
        FrameError,
        InconsistentInputsError,
        BufferClosedError,
        LimiterTimeoutError,
    )
}
_MAX_MESSAGE_CHARS = 4000  # an error string, not a traceback dump
_PLAIN = (str, int, float, bool, type(None))


def _constructor_args(exc: BaseException) -> list[Any] | None:
    # LimiterTimeoutError passes one arg to OSError and keeps the rest for __reduce__.
    reduced = exc.__reduce__()
    args = reduced[1] if isinstance(reduced, tuple) and len(reduced) > 1 else exc.args
    if isinstance(args, tuple) and all(isinstance(a, _PLAIN) for a in args):
        return list(args)
    return None


def encode_error(exc: BaseException) -> list[bytes]:
    """The reply frames that report ``exc`` to the sender."""
    name = type(exc).__name__
    body = {
        "type": name,
        "args": _constructor_args(exc) if name in _TYPED else None,
        "message": str(exc)[:_MAX_MESSAGE_CHARS],
    }
    return [_ERROR, json.dumps(body).encode()]


def decode_reply(frames: Sequence[Any], *, peer: str) -> Exception | None:
    """``None`` for an ack, else the exception the peer reported (to be raised).

    A reply that is neither raises ``FrameError``: the connection is out of step and
    must not be reused.
    """
    kinds = [bytes(f) for f in frames[:1]]
    if kinds == [_OK] and len(frames) == 1:
        return None
    if kinds != [_ERROR] or len(frames) != 2:
        raise FrameError(f"{peer} sent a reply that is neither an ack nor an error")
    try:
        body = json.loads(bytes(frames[1]))
        name, args, message = body["type"], body["args"], body["message"]
    except (ValueError, KeyError, TypeError) as e:
        raise FrameError(f"{peer} sent an unreadable error reply ({e})") from None
    if not isinstance(name, str) or not isinstance(message, str):
        raise FrameError(f"{peer} sent an error reply with a malformed type or message")
    cls = _TYPED.get(name)
    if cls is not None and isinstance(args, list):
        try:
            return cls(*args)
        except TypeError:
            pass  # arguments of another protocol version: report it untyped
    return RemoteShuffleError(peer, name, message)
