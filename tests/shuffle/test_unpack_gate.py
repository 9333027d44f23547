from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from shuffle._unpack_gate import UnpackGate


@dataclass
class Build:
    """One output being built through the gate: starts once admitted, ends on ``finish``."""

    gate: UnpackGate
    nbytes: int
    started: asyncio.Event = field(default_factory=asyncio.Event)
    finish: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        async with self.gate.admit(self.nbytes):
            self.started.set()
            await self.finish.wait()

    async def ask(self) -> Build:
        """Ask the gate; returns once this build started or waits in the gate's queue."""
        waiting = self.gate.waiting
        self.task = asyncio.create_task(self._run())
        while not self.started.is_set() and self.gate.waiting == waiting:
            await asyncio.sleep(0)  # let the task reach the gate (not a timed wait)
        return self

    async def end(self) -> None:
        self.finish.set()
        assert self.task is not None
        await self.task


async def test_outputs_that_fit_together_are_built_together_and_the_next_waits() -> None:
    gate = UnpackGate(100, held=lambda: 0, name="a")
    first, second = await Build(gate, 40).ask(), await Build(gate, 50).ask()
    third = await Build(gate, 20).ask()  # 110 > 100
    assert first.started.is_set() and second.started.is_set()
    assert not third.started.is_set() and gate.waiting == 1 and gate.building == 90
    await first.end()  # 50 + 20 fit
    await third.started.wait()
    assert gate.building == 70
    await second.end()
    await third.end()
    assert (gate.building, gate.waiting) == (0, 0)


async def test_an_output_larger_than_the_budget_is_built_alone() -> None:
    gate = UnpackGate(100, held=lambda: 0, name="a")
    small = await Build(gate, 10).ask()
    big = await Build(gate, 500).ask()
    assert not big.started.is_set()  # waits for the one being built
    await small.end()
    await big.started.wait()
    after = await Build(gate, 1).ask()  # nothing fits beside it
    assert not after.started.is_set()
    await big.end()
    await after.started.wait()
    await after.end()


async def test_memory_the_stores_hold_counts_against_the_budget() -> None:
    held = 80
    gate = UnpackGate(100, held=lambda: held, name="a")
    first = await Build(gate, 30).ask()  # alone: admitted whatever the stores hold
    second = await Build(gate, 30).ask()  # 80 + 30 + 30 > 100
    assert first.started.is_set() and not second.started.is_set()
    held = 30  # the first output's shards left the store
    await first.end()  # 30 + 30 fit now
    await second.started.wait()
    third = await Build(gate, 50).ask()  # 30 + 30 + 50 > 100
    assert not third.started.is_set()
    await second.end()
    await third.end()


async def test_outputs_are_admitted_in_the_order_they_asked() -> None:
    gate = UnpackGate(100, held=lambda: 0, name="a")
    first = await Build(gate, 60).ask()
    big = await Build(gate, 95).ask()
    small = await Build(gate, 10).ask()  # would fit beside the first, but is behind big
    assert not big.started.is_set() and not small.started.is_set()
    await first.end()
    await big.started.wait()
    assert not small.started.is_set()  # 95 + 10 do not fit
    await big.end()
    await small.started.wait()
    await small.end()


async def test_a_cancelled_waiter_leaves_and_lets_the_next_in() -> None:
    gate = UnpackGate(100, held=lambda: 0, name="a")
    first = await Build(gate, 60).ask()
    big = await Build(gate, 90).ask()
    small = await Build(gate, 30).ask()
    assert big.task is not None
    big.task.cancel()
    await small.started.wait()  # 60 + 30 fit once big no longer blocks the queue
    assert (gate.building, gate.waiting) == (90, 0)
    with pytest.raises(asyncio.CancelledError):
        await big.task
    await first.end()
    await small.end()
    assert (gate.building, gate.waiting) == (0, 0)


async def test_a_failed_build_frees_its_bytes() -> None:
    gate = UnpackGate(100, held=lambda: 0, name="a")
    with pytest.raises(RuntimeError, match="boom"):
        async with gate.admit(70):
            raise RuntimeError("boom")
    assert gate.building == 0
    async with gate.admit(90):
        assert gate.building == 90


async def test_without_a_limit_nothing_waits() -> None:
    gate = UnpackGate(None, held=lambda: 10**12, name="a")
    builds = [await Build(gate, 10**9).ask() for _ in range(5)]
    assert all(b.started.is_set() for b in builds) and gate.building == 5 * 10**9
    for b in builds:
        await b.end()


async def test_a_zero_budget_builds_one_output_at_a_time() -> None:
    gate = UnpackGate(0, held=lambda: 0, name="a")
    first, second = await Build(gate, 1).ask(), await Build(gate, 1).ask()
    assert first.started.is_set() and not second.started.is_set()
    await first.end()
    await second.started.wait()
    await second.end()


async def test_a_floor_builds_that_many_outputs_at_once_past_the_budget() -> None:
    gate = UnpackGate(100, held=lambda: 100, name="a", floor=2)  # the stores fill the budget
    first, second, third = [await Build(gate, 50).ask() for _ in range(3)]
    assert first.started.is_set() and second.started.is_set() and not third.started.is_set()
    assert (gate.building, gate.waiting) == (100, 1)
    await first.end()
    await third.started.wait()  # one of the two ended: the next takes its place
    await second.end()
    await third.end()
    assert (gate.building, gate.waiting) == (0, 0)
    with pytest.raises(ValueError, match="floor must be >= 1, got 0"):
        UnpackGate(100, held=lambda: 0, name="a", floor=0)


async def test_rejects_negative_sizes() -> None:
    with pytest.raises(ValueError, match="unpack gate 'x': limit must be >= 0 or None, got -1"):
        UnpackGate(-1, held=lambda: 0, name="x")
    gate = UnpackGate(10, held=lambda: 0, name="x")
    with pytest.raises(ValueError, match="unpack gate 'x': cannot admit -1 bytes"):
        async with gate.admit(-1):
            pass
    assert "'x'" in repr(gate)
