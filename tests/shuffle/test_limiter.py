from __future__ import annotations

import asyncio

import pytest

from shuffle._exceptions import LimiterTimeoutError
from shuffle._limiter import ResourceLimiter


class ObservedLimiter(ResourceLimiter):
    """Sets ``waiting`` when a caller has to wait for budget, so tests need no sleeps."""

    def __init__(self, limit: int | None, *, name: str = "test") -> None:
        super().__init__(limit, name=name)
        self.waiting = asyncio.Event()

    async def wait_for_available(self, timeout: float | None) -> None:
        if self.full:
            self.waiting.set()
        await super().wait_for_available(timeout)


@pytest.mark.parametrize(
    ("limit", "acquired", "available", "full"),
    [
        (100, 0, 100, False),
        (100, 99, 1, False),
        (100, 100, 0, True),
        (100, 250, 0, True),
        (None, 0, None, False),
        (None, 10**12, None, False),
    ],
)
def test_accounting(limit: int | None, acquired: int, available: int | None, full: bool) -> None:
    limiter = ResourceLimiter(limit, name="comms")
    limiter.increase(acquired)
    assert (limiter.acquired, limiter.available, limiter.full) == (acquired, available, full)
    assert limiter.empty is (acquired == 0)
    limiter.decrease(acquired)
    assert limiter.empty and not limiter.full
    assert "'comms'" in repr(limiter)


@pytest.mark.parametrize("limit", [0, -5])
def test_rejects_non_positive_limits(limit: int) -> None:
    with pytest.raises(
        ValueError, match=f"limiter 'x': limit must be positive or None, got {limit}"
    ):
        ResourceLimiter(limit, name="x")


def test_rejects_negative_increase_and_over_release() -> None:
    limiter = ResourceLimiter(10, name="x")
    limiter.increase(3)
    with pytest.raises(ValueError, match="cannot increase by -1 bytes"):
        limiter.increase(-1)
    with pytest.raises(ValueError, match="cannot release 4 bytes, 3 are held"):
        limiter.decrease(4)
    with pytest.raises(ValueError, match="cannot release -1 bytes"):
        limiter.decrease(-1)
    assert limiter.acquired == 3


@pytest.mark.parametrize("limit", [10, None])
async def test_wait_returns_at_once_when_not_full(limit: int | None) -> None:
    limiter = ResourceLimiter(limit, name="x")
    limiter.increase(9)
    await limiter.wait_for_available(timeout=0)


async def test_every_waiter_resumes_once_the_limiter_drains() -> None:
    limiter = ObservedLimiter(10)
    limiter.increase(15)
    waiters = [asyncio.create_task(limiter.wait_for_available(None)) for _ in range(3)]
    await limiter.waiting.wait()
    assert not any(w.done() for w in waiters)
    limiter.decrease(10)  # 5 held: below the limit again
    await asyncio.gather(*waiters)


async def test_waiter_keeps_waiting_if_the_budget_refills_before_it_resumes() -> None:
    limiter = ObservedLimiter(10)
    limiter.increase(10)
    waiter = asyncio.create_task(limiter.wait_for_available(timeout=0.05))
    await limiter.waiting.wait()
    limiter.decrease(1)  # wakes the waiter ...
    limiter.increase(1)  # ... but it is full again by the time the waiter runs
    with pytest.raises(LimiterTimeoutError):
        await waiter


@pytest.mark.parametrize("timeout", [0, 0.01])
async def test_wait_times_out_with_a_named_error(timeout: float) -> None:
    limiter = ResourceLimiter(8, name="comms-memory")
    limiter.increase(12)
    with pytest.raises(LimiterTimeoutError) as info:
        await limiter.wait_for_available(timeout)
    error = info.value
    assert (error.name, error.timeout, error.acquired, error.limit) == (
        "comms-memory",
        timeout,
        12,
        8,
    )
    assert "'comms-memory' stayed full" in str(error)
    assert isinstance(error, TimeoutError)
