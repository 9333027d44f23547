"""Sender-side batching: shards in, one message per destination at a time out.

``write`` queues shards per destination and returns once the shared byte budget has
room again (back-pressure). Sending is event driven rather than polled: whenever a
send finishes or data arrives, idle destinations are served, largest backlog first,
each with a batch of queued shards of up to ``message_bytes``. At most one message is
in flight per destination, so backlogs coalesce into large messages while that
destination is busy, and at most ``concurrency`` messages are in flight overall.

The first failure of ``send`` is terminal, as in ``distributed.shuffle``: queued data
is dropped, other sends are cancelled, and every later ``write``, ``flush`` or
``close`` re-raises it.
"""

from __future__ import annotations

import asyncio
import functools
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from types import TracebackType
from typing import Generic, TypeVar

from shuffle._closable import Closable
from shuffle._exceptions import BufferClosedError, LimiterTimeoutError
from shuffle._limiter import ResourceLimiter
from shuffle.wire._memory import host_nbytes

__all__ = ["ShardsBuffer"]

K = TypeVar("K")  # what names a shard: an output partition, a ShardKey, ...
B = TypeVar("B")  # the shard's payload


class ShardsBuffer(Closable, Generic[K, B]):
    """Batch ``{destination: [(key, payload)]}`` writes into ``send(destination, batch)``.

    ``limiter`` counts bytes from ``write`` until their send completes; it may be shared
    by several buffers. ``timeout`` bounds each wait for budget. ``nbytes`` measures a
    payload (host buffers by default; pass the device hook for device payloads).
    """

    def __init__(
        self,
        *,
        send: Callable[[str, list[tuple[K, B]]], Awaitable[None]],
        limiter: ResourceLimiter,
        message_bytes: int,
        timeout: float | None,
        concurrency: int = 2,
        nbytes: Callable[[B], int] = host_nbytes,
        name: str = "shards-buffer",
    ) -> None:
        if message_bytes < 1 or concurrency < 1:
            raise ValueError(
                f"buffer {name!r}: message_bytes and concurrency must be >= 1, got "
                f"{message_bytes} and {concurrency}"
            )
        self.name = name
        self._send = send
        self._limiter = limiter
        self._message_bytes = message_bytes
        self._timeout = timeout
        self._concurrency = concurrency
        self._nbytes = nbytes
        self._queues: dict[str, deque[tuple[K, B, int]]] = {}
        self._queued_nbytes: dict[str, int] = {}
        self._sending: dict[str, asyncio.Task[None]] = {}
        self._drained = asyncio.Event()  # set when nothing is queued or in flight
        self._drained.set()
        #: Set when no send task is registered, i.e. every send's bookkeeping has run.
        self._idle = asyncio.Event()
        self._idle.set()
        self._exception: Exception | None = None
        self._closed = False
        self.nbytes_buffered = 0  # written and neither sent nor dropped yet
        self.nbytes_sent = 0
        self.messages_sent = 0

    def __repr__(self) -> str:
        return (
            f"<ShardsBuffer {self.name!r} buffered={self.nbytes_buffered} "
            f"sending_to={sorted(self._sending)} closed={self._closed}>"
        )

    @property
    def exception(self) -> Exception | None:
        return self._exception

    async def write(self, shards: Mapping[str, Iterable[tuple[K, B]]]) -> None:
        """Queue shards for sending; block while the byte budget is exhausted.

        A write that times out waiting for budget leaves its shards queued for sending.
        """
        self._raise_if_unusable()
        # Measure everything before touching any state, so a bad payload changes nothing.
        sized = [
            (destination, key, payload, self._nbytes(payload))
            for destination, items in shards.items()
            for key, payload in items
        ]
        if not sized:
            return
        total = 0
        for destination, key, payload, nbytes in sized:
            self._queues.setdefault(destination, deque()).append((key, payload, nbytes))
            self._queued_nbytes[destination] = self._queued_nbytes.get(destination, 0) + nbytes
            total += nbytes
        self._limiter.increase(total)
        self.nbytes_buffered += total
        self._drained.clear()
        self._dispatch()
        try:
            await self._limiter.wait_for_available(self._timeout)
        except LimiterTimeoutError:
            self._raise_if_failed()  # report the root cause if a send failed meanwhile
            raise
        self._raise_if_failed()

    async def flush(self) -> None:
        """Wait until everything written so far has been sent; raise the first failure.

        This waits as long as sends take: bound it with ``asyncio.wait_for`` if needed.
        """
        while (self._queues or self._sending) and self._exception is None:
            await self._drained.wait()
        self._raise_if_failed()

    async def close(self) -> None:
        """Refuse further writes, send what is queued, and wait; idempotent."""
        self._closed = True
        try:
            await self.flush()
        finally:
            await self._reap()

    async def abort(self) -> None:
        """Refuse further writes, drop what is queued, cancel sends; never raises."""
        self._closed = True
        self._drop_queued()
        for task in self._sending.values():
            task.cancel()
        await self._reap()
        self._drained.set()

    async def __aenter__(self) -> ShardsBuffer[K, B]:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            await self.close()
        else:
            await self.abort()

    def _dispatch(self) -> None:
        while len(self._sending) < self._concurrency:
            idle = [d for d in self._queues if d not in self._sending]
            if not idle:
                return
            destination = max(idle, key=self._queued_nbytes.__getitem__)
            batch, nbytes = self._take_batch(destination)
            task = asyncio.create_task(
                self._send_batch(destination, batch, nbytes),
                name=f"{self.name}-send-{destination}",
            )
            self._sending[destination] = task
            self._idle.clear()
            # Bookkeeping runs as a done callback, not in the coroutine's ``finally``: a
            # task cancelled before its first step never runs its body at all, and would
            # keep its bytes in the limiter and its slot in ``_sending`` for ever.
            task.add_done_callback(functools.partial(self._send_done, destination, nbytes))

    def _take_batch(self, destination: str) -> tuple[list[tuple[K, B]], int]:
        queue = self._queues[destination]
        batch: list[tuple[K, B]] = []
        nbytes = 0
        # Always take one shard, even one larger than message_bytes, or it would starve.
        while queue and (not batch or nbytes + queue[0][2] <= self._message_bytes):
            key, payload, size = queue.popleft()
            batch.append((key, payload))
            nbytes += size
        self._queued_nbytes[destination] -= nbytes
        if not queue:
            del self._queues[destination], self._queued_nbytes[destination]
        return batch, nbytes

    async def _send_batch(self, destination: str, batch: list[tuple[K, B]], nbytes: int) -> None:
        try:
            await self._send(destination, batch)
        except Exception as e:  # noqa: BLE001 -- kept as the buffer's failure, raised to its users
            self._fail(e)
        else:
            self.nbytes_sent += nbytes
            self.messages_sent += 1

    def _send_done(self, destination: str, nbytes: int, task: asyncio.Task[None]) -> None:
        self._release(nbytes)
        del self._sending[destination]
        if not self._sending:
            self._idle.set()
        if not self._queues and not self._sending:
            self._drained.set()
        # A cancelled send (abort, failure, loop shutdown) starts no more.
        if self._exception is None and not task.cancelled():
            self._dispatch()

    def _fail(self, exc: Exception) -> None:
        if self._exception is None:
            self._exception = exc
        self._drop_queued()
        current = asyncio.current_task()
        for task in self._sending.values():
            if task is not current:
                task.cancel()
        self._drained.set()  # nothing more will be sent: wake flush()

    def _drop_queued(self) -> None:
        nbytes = sum(self._queued_nbytes.values())
        self._queues.clear()
        self._queued_nbytes.clear()
        self._release(nbytes)

    def _release(self, nbytes: int) -> None:
        self._limiter.decrease(nbytes)
        self.nbytes_buffered -= nbytes

    async def _reap(self) -> None:
        # Sends catch their own errors; gather only collects cancellations.
        if self._sending:
            await asyncio.gather(*self._sending.values(), return_exceptions=True)
        # Since Python 3.12, gather over tasks that are already done returns without
        # yielding, before their done callbacks (``_send_done``: the bytes' release) ran.
        await self._idle.wait()

    def _raise_if_failed(self) -> None:
        if self._exception is not None:
            raise self._exception

    def _raise_if_unusable(self) -> None:
        self._raise_if_failed()
        if self._closed:
            raise BufferClosedError(self.name)
