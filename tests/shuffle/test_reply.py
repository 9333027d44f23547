"""The reply codec: what a shuffle actor answers to each message, and what the sender
makes of it. Pure: no Ray, no network."""

from __future__ import annotations

import pytest

import shuffle._exceptions as errors
from shuffle.wire._reply import ACK, decode_reply, encode_error


@pytest.mark.parametrize(
    "error",
    [
        errors.StaleRunError("s", 1, 2),
        errors.UnknownRunError("s", 3, "actor-0"),
        errors.ShuffleClosedError("s", 1, "already closed on 'a'"),
        errors.FrameError("bad magic"),
        errors.InconsistentInputsError("output partition 3: a piece covering [0, 1] overlaps"),
        errors.BufferClosedError("store"),
        errors.LimiterTimeoutError("send", 1.5, 10, 5),
    ],
)
def test_typed_errors_travel_as_themselves(error: Exception) -> None:
    got = decode_reply(encode_error(error), peer="tcp://h:1")
    assert type(got) is type(error) and str(got) == str(error)


def test_other_errors_arrive_untyped_and_bad_replies_are_refused() -> None:
    got = decode_reply(encode_error(OSError(28, "No space left on device")), peer="tcp://h:1")
    assert isinstance(got, errors.RemoteShuffleError)
    assert str(got) == "tcp://h:1 refused a message: OSError: [Errno 28] No space left on device"
    assert decode_reply(ACK, peer="p") is None
    for frames in ([], [b"ok", b"x"], [b"what"], [b"error"], [b"error", b"{not json"]):
        with pytest.raises(errors.FrameError):
            decode_reply(frames, peer="p")
