"""A byte budget that callers can wait on, the source of the shuffle's back-pressure.

Producers ``increase`` first and wait afterwards, as in ``distributed.shuffle``: a single
item larger than the whole budget still gets through, so nothing deadlocks, but the
next producer waits until consumers ``decrease`` the count below the limit again. Waits
always carry a deadline. Use from one event loop; the class is not thread-safe.
"""

from __future__ import annotations

import asyncio

from shuffle._exceptions import LimiterTimeoutError

__all__ = ["ResourceLimiter"]


class ResourceLimiter:
    """Counts bytes held against ``limit``; ``limit=None`` counts without ever blocking."""

    def __init__(self, limit: int | None, *, name: str) -> None:
        if limit is not None and limit <= 0:
            raise ValueError(f"limiter {name!r}: limit must be positive or None, got {limit}")
        self.limit = limit
        self.name = name
        self._acquired = 0
        self._not_full = asyncio.Event()  # binds to a loop on first wait, not here
        self._not_full.set()

    def __repr__(self) -> str:
        return f"<ResourceLimiter {self.name!r} acquired={self._acquired} limit={self.limit}>"

    @property
    def acquired(self) -> int:
        return self._acquired

    @property
    def available(self) -> int | None:
        """Bytes left before the limiter is full; ``None`` when unlimited."""
        if self.limit is None:
            return None
        return max(0, self.limit - self._acquired)

    @property
    def full(self) -> bool:
        return self.limit is not None and self._acquired >= self.limit

    @property
    def empty(self) -> bool:
        return self._acquired == 0

    def increase(self, nbytes: int) -> None:
        if nbytes < 0:
            raise ValueError(f"limiter {self.name!r}: cannot increase by {nbytes} bytes")
        self._acquired += nbytes
        if self.full:
            self._not_full.clear()

    def decrease(self, nbytes: int) -> None:
        if not 0 <= nbytes <= self._acquired:
            raise ValueError(
                f"limiter {self.name!r}: cannot release {nbytes} bytes, {self._acquired} are held"
            )
        self._acquired -= nbytes
        if not self.full:
            self._not_full.set()

    async def wait_for_available(self, timeout: float | None) -> None:
        """Return once the limiter is not full; raise after ``timeout`` seconds.

        ``timeout=None`` waits indefinitely, and has to be asked for explicitly.
        """
        if not self.full:
            return
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        # Loop because another producer may refill the budget before this one resumes.
        while self.full:
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                raise self._timeout_error(timeout)
            try:
                await asyncio.wait_for(self._not_full.wait(), remaining)
            except TimeoutError:
                raise self._timeout_error(timeout) from None

    def _timeout_error(self, timeout: float | None) -> LimiterTimeoutError:
        assert timeout is not None and self.limit is not None  # else we never time out
        return LimiterTimeoutError(self.name, timeout, self._acquired, self.limit)
