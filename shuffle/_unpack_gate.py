"""Admit output partitions to be built only while what they need fits the memory budget.

Building an output takes about its size again in memory (its shards, then the frame
or chunk built from them), so an actor that built every output asked of it at once
would hold several outputs beyond its budget. ``UnpackGate`` admits an output of
``nbytes`` when the outputs being built, this one included, plus what the receive
stores still hold in memory (``held``) fit in ``limit``, or when fewer than ``floor``
outputs are being built: an output larger than the whole budget still gets built,
and past the budget one output reads its spilled shards back from disk while
another is converted (``floor=2``; an 8 GiB shuffle's outputs took about 12.7 s
so, 15.6 s one at a time).
Outputs are admitted in the order they asked, so a large one is never overtaken
for ever. Use from one event loop; the class is not thread-safe.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Callable

__all__ = ["UnpackGate"]


class UnpackGate:
    """Bytes of outputs being built against ``limit``; ``limit=None`` never waits.

    ``held`` returns the bytes held in memory outside the gate (the receive stores),
    read each time an admission is decided: when an output asks and when one ends.
    """

    def __init__(
        self, limit: int | None, *, held: Callable[[], int], name: str, floor: int = 1
    ) -> None:
        if limit is not None and limit < 0:
            raise ValueError(f"unpack gate {name!r}: limit must be >= 0 or None, got {limit}")
        if floor < 1:
            raise ValueError(f"unpack gate {name!r}: floor must be >= 1, got {floor}")
        self.limit = limit
        self.floor = floor
        self.name = name
        self._held = held
        self._building = 0  # bytes of the outputs admitted and not yet done
        self._count = 0  # how many they are
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()

    def __repr__(self) -> str:
        return (
            f"<UnpackGate {self.name!r} building={self._building} in {self._count} "
            f"waiting={len(self._waiting)} limit={self.limit}>"
        )

    @property
    def building(self) -> int:
        """Bytes of the outputs being built."""
        return self._building

    @property
    def waiting(self) -> int:
        """How many outputs wait to be admitted."""
        return len(self._waiting)

    @contextlib.asynccontextmanager
    async def admit(self, nbytes: int) -> AsyncIterator[None]:
        """Wait until an output of ``nbytes`` may be built, then hold its bytes until
        the block exits. Waits have no deadline: every admitted output ends, and the
        gate then admits the next (at the latest when fewer than ``floor`` are built)."""
        if nbytes < 0:
            raise ValueError(f"unpack gate {self.name!r}: cannot admit {nbytes} bytes")
        if self._waiting or not self._fits(nbytes):
            waiter = asyncio.get_running_loop().create_future()
            entry = (nbytes, waiter)
            self._waiting.append(entry)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._done(nbytes)  # admitted just as it was cancelled
                else:
                    self._waiting.remove(entry)
                    self._admit_waiting()  # it may have blocked those behind it
                raise
        else:
            self._start(nbytes)
        try:
            yield
        finally:
            self._done(nbytes)

    def _fits(self, nbytes: int) -> bool:
        if self.limit is None or self._count < self.floor:
            return True
        return self._held() + self._building + nbytes <= self.limit

    def _start(self, nbytes: int) -> None:
        self._building += nbytes
        self._count += 1

    def _done(self, nbytes: int) -> None:
        self._building -= nbytes
        self._count -= 1
        self._admit_waiting()

    def _admit_waiting(self) -> None:
        while self._waiting and self._fits(self._waiting[0][0]):
            nbytes, waiter = self._waiting.popleft()
            self._start(nbytes)
            waiter.set_result(None)
