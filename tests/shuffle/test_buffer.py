from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shuffle._buffer import ShardsBuffer
from shuffle._exceptions import BufferClosedError, LimiterTimeoutError
from shuffle._limiter import ResourceLimiter


class FakeSend:
    """An injected send: records batches, holds them until ``gate`` opens, fails on demand."""

    def __init__(self, *, gate_open: bool = True) -> None:
        self.batches: list[tuple[str, list[tuple[int, bytes]]]] = []
        self.gate = asyncio.Event()
        if gate_open:
            self.gate.set()
        self.started = asyncio.Event()
        self._changed = asyncio.Event()
        self.failures: dict[str, Exception] = {}
        self.cancelled: list[str] = []
        self.in_flight: set[str] = set()
        self.max_in_flight = 0

    async def __call__(self, destination: str, batch: list[tuple[int, Any]]) -> None:
        self.batches.append((destination, [(key, bytes(payload)) for key, payload in batch]))
        self.in_flight.add(destination)
        self.max_in_flight = max(self.max_in_flight, len(self.in_flight))
        self.started.set()
        self._changed.set()
        try:
            if destination in self.failures:
                raise self.failures[destination]
            await self.gate.wait()
        except asyncio.CancelledError:
            self.cancelled.append(destination)
            raise
        finally:
            self.in_flight.discard(destination)

    async def until_in_flight(self, n: int) -> None:
        while len(self.in_flight) < n:
            self._changed.clear()
            await self._changed.wait()

    def sizes(self, destination: str) -> list[list[int]]:
        return [[len(p) for _, p in batch] for d, batch in self.batches if d == destination]

    def delivered(self, destination: str) -> list[tuple[int, bytes]]:
        return [shard for d, batch in self.batches if d == destination for shard in batch]


class ObservedLimiter(ResourceLimiter):
    """Sets ``waiting`` when a writer starts waiting for budget, so tests need no sleeps."""

    def __init__(self, limit: int | None) -> None:
        super().__init__(limit, name="comms")
        self.waiting = asyncio.Event()

    async def wait_for_available(self, timeout: float | None) -> None:
        if self.full:
            self.waiting.set()
        await super().wait_for_available(timeout)


def make_buffer(
    send: FakeSend,
    *,
    limiter: ResourceLimiter | None = None,
    message_bytes: int = 1000,
    concurrency: int = 2,
    timeout: float | None = 5,
    **kwargs: Any,
) -> ShardsBuffer[int, Any]:
    return ShardsBuffer(
        send=send,
        limiter=limiter or ResourceLimiter(10_000, name="comms"),
        message_bytes=message_bytes,
        concurrency=concurrency,
        timeout=timeout,
        name="test-buffer",
        **kwargs,
    )


def shards(*sizes: int, start: int = 0) -> list[tuple[int, bytes]]:
    return [(start + i, bytes([start + i]) * n) for i, n in enumerate(sizes)]


async def test_write_and_flush_deliver_every_shard_in_order() -> None:
    send = FakeSend()
    limiter = ResourceLimiter(10_000, name="comms")
    buffer = make_buffer(send, limiter=limiter)
    await buffer.write({"a": shards(10, 10), "b": shards(5, start=2)})
    await buffer.write({"a": shards(3, start=3)})
    await buffer.flush()
    assert send.delivered("a") == shards(10, 10) + shards(3, start=3)
    assert send.delivered("b") == shards(5, start=2)
    assert (buffer.nbytes_sent, buffer.nbytes_buffered, limiter.acquired) == (28, 0, 0)
    await buffer.close()


@pytest.mark.parametrize(
    ("message_bytes", "queued", "expected"),
    [
        (35, [10] * 10, [[10, 10, 10], [10, 10, 10], [10, 10, 10], [10]]),
        (10, [4, 25, 4, 4], [[4], [25], [4, 4]]),  # an oversized shard travels alone
        (1, [3, 3], [[3], [3]]),
        (1000, [1] * 5, [[1] * 5]),
    ],
)
async def test_backlog_coalesces_into_messages_of_bounded_size(
    message_bytes: int, queued: list[int], expected: list[list[int]]
) -> None:
    send = FakeSend(gate_open=False)
    buffer = make_buffer(send, message_bytes=message_bytes)
    await buffer.write({"a": shards(1)})
    await send.started.wait()  # in flight, holding the destination busy
    await buffer.write({"a": shards(*queued, start=1)})
    send.gate.set()
    await buffer.flush()
    assert send.sizes("a") == [[1], *expected]
    assert send.delivered("a") == shards(1) + shards(*queued, start=1)


async def test_at_most_concurrency_sends_and_one_per_destination() -> None:
    send = FakeSend(gate_open=False)
    buffer = make_buffer(send, concurrency=2)
    await buffer.write({d: shards(1, 1) for d in "abc"})
    await send.until_in_flight(2)
    assert len(send.batches) == 2 and len({d for d, _ in send.batches}) == 2
    send.gate.set()
    await buffer.flush()
    assert send.max_in_flight == 2
    assert all(send.delivered(d) == shards(1, 1) for d in "abc")


async def test_largest_backlog_is_served_first() -> None:
    send = FakeSend(gate_open=False)
    buffer = make_buffer(send, concurrency=1)
    await buffer.write({"a": shards(1)})
    await buffer.write({"b": shards(5), "c": shards(50), "d": shards(20)})
    send.gate.set()
    await buffer.flush()
    assert [d for d, _ in send.batches] == ["a", "c", "d", "b"]


async def test_writes_block_while_the_budget_is_exhausted() -> None:
    send = FakeSend(gate_open=False)
    limiter = ObservedLimiter(100)
    buffer = make_buffer(send, limiter=limiter)
    await buffer.write({"a": shards(60)})  # under budget: returns at once
    writer = asyncio.create_task(buffer.write({"b": shards(60)}))
    await limiter.waiting.wait()
    assert limiter.full and not writer.done()
    assert buffer.nbytes_buffered == 120
    send.gate.set()  # sends complete, memory is released, the writer resumes
    await writer
    await buffer.flush()
    assert limiter.empty


async def test_timed_out_write_keeps_its_data_queued() -> None:
    send = FakeSend()
    limiter = ResourceLimiter(100, name="comms")
    limiter.increase(100)  # someone else holds the whole budget
    buffer = make_buffer(send, limiter=limiter, timeout=0)
    with pytest.raises(LimiterTimeoutError, match="'comms' stayed full"):
        await buffer.write({"a": shards(7)})
    await buffer.flush()
    assert send.delivered("a") == shards(7)
    assert limiter.acquired == 100


async def test_root_cause_beats_timeout() -> None:
    send = FakeSend()
    send.failures["a"] = ConnectionResetError("peer a vanished")
    limiter = ResourceLimiter(100, name="comms")
    limiter.increase(100)
    buffer = make_buffer(send, limiter=limiter, timeout=0.05)
    with pytest.raises(ConnectionResetError, match="peer a vanished"):
        await buffer.write({"a": shards(7)})


async def test_first_failure_is_terminal_and_re_raised() -> None:
    send = FakeSend(gate_open=False)
    first = ConnectionResetError("peer b vanished")
    send.failures["b"] = first
    limiter = ResourceLimiter(10_000, name="comms")
    buffer = make_buffer(send, limiter=limiter, concurrency=3)
    await buffer.write({"a": shards(5), "b": shards(5)})
    await buffer.write({"a": shards(9)})  # queued behind the in-flight send to a
    with pytest.raises(ConnectionResetError) as info:
        await buffer.flush()
    assert info.value is first and buffer.exception is first
    for attempt in (buffer.write({"c": shards(1)}), buffer.flush(), buffer.close()):
        with pytest.raises(ConnectionResetError) as info:
            await attempt
        assert info.value is first
    assert send.cancelled == ["a"]  # the other send was cancelled, and close reaped it
    assert send.delivered("a") == shards(5)  # the queued shard was dropped
    assert (limiter.acquired, buffer.nbytes_buffered, buffer.nbytes_sent) == (0, 0, 0)


async def test_failure_releases_the_bytes_of_sends_cancelled_before_they_started() -> None:
    # Regression: "a" (largest backlog, dispatched first) fails before its first await
    # and cancels "b", whose task has not run yet; b's bytes must still be released.
    send = FakeSend()
    send.failures["a"] = ConnectionResetError("peer a vanished")
    limiter = ResourceLimiter(10_000, name="comms")
    buffer = make_buffer(send, limiter=limiter)
    await buffer.write({"a": shards(9), "b": shards(5)})
    with pytest.raises(ConnectionResetError):
        await buffer.close()
    assert [d for d, _ in send.batches] == ["a"]  # b's send never started
    assert (limiter.acquired, buffer.nbytes_buffered) == (0, 0)
    assert "sending_to=[]" in repr(buffer)


async def test_close_sends_what_is_queued_and_is_idempotent() -> None:
    send = FakeSend(gate_open=False)
    buffer = make_buffer(send)
    await buffer.write({"a": shards(1)})
    await buffer.write({"a": shards(2, start=1)})
    closing = asyncio.create_task(buffer.close())
    await send.started.wait()
    send.gate.set()
    await closing
    await buffer.close()
    assert buffer.closed and send.delivered("a") == shards(1) + shards(2, start=1)
    with pytest.raises(BufferClosedError, match="'test-buffer' is closed"):
        await buffer.write({"a": shards(1)})
    await buffer.flush()


async def test_abort_drops_data_cancels_sends_and_never_raises() -> None:
    send = FakeSend(gate_open=False)
    limiter = ResourceLimiter(10_000, name="comms")
    buffer = make_buffer(send, limiter=limiter)
    await buffer.write({"a": shards(5), "b": shards(5)})
    await buffer.write({"a": shards(9)})
    await send.until_in_flight(2)
    await buffer.abort()
    await buffer.abort()
    assert sorted(send.cancelled) == ["a", "b"]
    assert [d for d, _ in send.batches] == ["a", "b"]  # the queued shard never left
    assert limiter.empty and buffer.nbytes_buffered == 0 and buffer.exception is None
    await buffer.flush()
    with pytest.raises(BufferClosedError):
        await buffer.write({"a": shards(1)})


async def test_context_manager_closes_on_success_and_aborts_on_error() -> None:
    send = FakeSend()
    async with make_buffer(send) as buffer:
        await buffer.write({"a": shards(3)})
    assert buffer.closed and send.delivered("a") == shards(3)

    send = FakeSend(gate_open=False)
    with pytest.raises(KeyError):
        async with make_buffer(send) as buffer:
            await buffer.write({"a": shards(3)})
            await send.started.wait()
            raise KeyError("user code failed")
    assert send.cancelled == ["a"] and buffer.closed


async def test_flush_waits_for_sends_in_flight() -> None:
    send = FakeSend(gate_open=False)
    buffer = make_buffer(send)
    events: list[str] = []

    async def release() -> None:
        await send.started.wait()
        events.append("released")
        send.gate.set()

    await buffer.write({"a": shards(4)})
    releaser = asyncio.create_task(release())
    await buffer.flush()
    events.append("flushed")
    await releaser
    assert events == ["released", "flushed"] and buffer.nbytes_sent == 4
    await buffer.flush()  # nothing left: returns at once


async def test_bad_payload_changes_nothing() -> None:
    send = FakeSend()
    limiter = ResourceLimiter(10_000, name="comms")
    buffer = make_buffer(send, limiter=limiter)
    with pytest.raises(TypeError):
        await buffer.write({"a": [(0, b"fine"), (1, "not a buffer")]})
    await buffer.write({})
    await buffer.write({"a": []})
    await buffer.flush()
    assert limiter.empty and send.batches == []


async def test_custom_nbytes_measures_device_payloads() -> None:
    class Device:
        def __init__(self, n: int) -> None:
            self.n = n

        def __bytes__(self) -> bytes:
            return b"\0" * self.n

    send = FakeSend(gate_open=False)
    buffer: ShardsBuffer[int, Device] = ShardsBuffer(
        send=send,
        limiter=ResourceLimiter(None, name="comms"),
        message_bytes=10,
        timeout=None,
        nbytes=lambda d: d.n,
    )
    await buffer.write({"gpu": [(0, Device(1))]})
    await buffer.write({"gpu": [(i, Device(4)) for i in range(1, 4)]})
    send.gate.set()
    await buffer.flush()
    assert send.sizes("gpu") == [[1], [4, 4], [4]]


@pytest.mark.parametrize(("message_bytes", "concurrency"), [(0, 1), (1, 0)])
def test_rejects_invalid_settings(message_bytes: int, concurrency: int) -> None:
    with pytest.raises(ValueError, match="message_bytes and concurrency must be >= 1"):
        make_buffer(FakeSend(), message_bytes=message_bytes, concurrency=concurrency)


@settings(deadline=None, max_examples=60)
@given(
    writes=st.lists(
        st.dictionaries(st.sampled_from("abcd"), st.lists(st.integers(0, 40), max_size=5)),
        max_size=8,
    ),
    message_bytes=st.integers(1, 100),
    concurrency=st.integers(1, 4),
    limit=st.integers(1, 200),
)
def test_every_shard_arrives_once_in_order_within_message_bounds(
    writes: list[dict[str, list[int]]], message_bytes: int, concurrency: int, limit: int
) -> None:
    async def run() -> None:
        send = FakeSend()
        limiter = ResourceLimiter(limit, name="comms")
        buffer = make_buffer(
            send, limiter=limiter, message_bytes=message_bytes, concurrency=concurrency
        )
        expected: dict[str, list[tuple[int, bytes]]] = {}
        key = 0
        for write in writes:
            written = {}
            for destination, sizes in write.items():
                written[destination] = shards(*sizes, start=key)
                expected.setdefault(destination, []).extend(written[destination])
                key += len(sizes)
            await buffer.write(written)
        await buffer.close()
        for destination, sent in expected.items():
            assert send.delivered(destination) == sent
        for _, batch in send.batches:
            assert len(batch) == 1 or sum(len(p) for _, p in batch) <= message_bytes
        assert send.max_in_flight <= concurrency
        assert limiter.empty and buffer.nbytes_buffered == 0

    asyncio.run(run())
