"""What one shuffle message may weigh, enforced by both ends of every connection.

The message codec refuses payloads above ``DEFAULT_MAX_MESSAGE_NBYTES`` (2 GiB);
``MESSAGE_LIMITS`` makes the transport enforce the same bound from the wire header,
before a byte of the frames is allocated: a listener with these limits drops a
connection whose message announces more (``ProtocolError``), so a peer cannot make an
actor allocate more than one message's worth. Senders check first
(``shuffle._send.check_payload``) and raise ``FrameError``, so a shard too large to travel fails
its transfer with a typed error naming the limit instead of a broken connection.
"""

from __future__ import annotations

from shuffle._send import MAX_PAYLOAD_NBYTES
from shuffle._transport import FrameLimits
from shuffle.wire._message import MAX_META_NBYTES

__all__ = ["MESSAGE_LIMITS"]

#: Room for the header frame on top of the payload: entries (21 bytes each, at most
#: one per frame), the metas it may carry, two names.
_HEADER_ALLOWANCE = MAX_META_NBYTES + (16 << 20)

MESSAGE_LIMITS = FrameLimits(
    max_frame_bytes=MAX_PAYLOAD_NBYTES,
    max_message_bytes=MAX_PAYLOAD_NBYTES + _HEADER_ALLOWANCE,
)
