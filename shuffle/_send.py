"""The sender's half of a run: pieces batched into messages per owner, with a budget.

``send_shards`` takes the pieces of one or more inputs (``shuffle._split``), batches
them per owning participant through a ``ShardsBuffer`` (messages of about
``RunOptions.message_bytes``, at most ``RunOptions.concurrency`` in flight, at most
``RunOptions.send_buffer_bytes`` queued), encodes each batch as one message
(``shuffle.wire._message``) and hands it to ``deliver``, which returns once the owner
accepted it. It returns once every message was accepted and raises the first failure.

``deliver`` is injected: transfer tasks' clients pass a request over an endpoint pool
(``shuffle.shell._client``), tests a call into in-memory runs.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from shuffle._buffer import ShardsBuffer
from shuffle._exceptions import FrameError
from shuffle._ids import ShardKey
from shuffle._limiter import ResourceLimiter
from shuffle._options import RunOptions
from shuffle._spec import ShuffleRunSpec
from shuffle._split import Shards
from shuffle.wire._memory import HOST_REGISTRY, MemoryRegistry
from shuffle.wire._message import DEFAULT_MAX_MESSAGE_NBYTES, encode_message, payload_nbytes

__all__ = ["MAX_PAYLOAD_NBYTES", "Deliver", "Sent", "check_payload", "send_shards"]

logger = logging.getLogger(__name__)

#: Delivers one encoded message (``[header, *buffers]``) to the named owner and returns
#: once that owner has accepted it; raises if it did not.
Deliver = Callable[[str, list[Any]], Awaitable[None]]


#: The payload one message may carry; transports enforce it from the wire header too
#: (``shuffle.shell._limits``).
MAX_PAYLOAD_NBYTES = DEFAULT_MAX_MESSAGE_NBYTES


def check_payload(nbytes: int, *, what: str) -> None:
    """Raise ``FrameError`` if a message of ``nbytes`` of payload cannot travel."""
    if nbytes > MAX_PAYLOAD_NBYTES:
        raise FrameError(
            f"{what}: a message of {nbytes} bytes exceeds the limit of {MAX_PAYLOAD_NBYTES} "
            "bytes per message (one shard must fit; use more, smaller partitions)"
        )


@dataclass(frozen=True)
class Sent:
    """What one ``send_shards`` call sent, all of it accepted."""

    messages: int
    nbytes: int


async def send_shards(
    shards: Shards,
    *,
    spec: ShuffleRunSpec,
    options: RunOptions,
    sender: str,
    deliver: Deliver,
    registry: MemoryRegistry = HOST_REGISTRY,
    name: str,
) -> Sent:
    """Send ``shards`` (``{owner: [(ShardKey, payload)]}``) of ``spec``'s run as
    ``sender``; ``name`` names the send budget in errors and logs."""

    async def send_batch(owner: str, batch: list[tuple[ShardKey, Any]]) -> None:
        message = encode_message(
            shuffle_id=spec.shuffle_id,
            run_id=spec.run_id,
            sender=sender,
            shards=batch,
            registry=registry,
        )
        check_payload(message.header.nbytes, what=f"{name} to {owner}")
        await deliver(owner, message.frames())

    buffer: ShardsBuffer[ShardKey, Any] = ShardsBuffer(
        send=send_batch,
        limiter=ResourceLimiter(options.send_buffer_bytes, name=f"{name}-send"),
        message_bytes=options.message_bytes,
        timeout=options.limiter_timeout,
        concurrency=options.concurrency,
        nbytes=payload_nbytes,  # Pieces carry their size, device data included
        name=name,
    )
    try:
        await buffer.write(shards)
        await buffer.close()  # returns once every message was accepted
    except BaseException:
        await buffer.abort()
        raise
    return Sent(messages=buffer.messages_sent, nbytes=buffer.nbytes_sent)
