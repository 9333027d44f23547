"""Shared test wiring: participants' runs fed by client-style senders, in one process.

``Network`` holds one ``ShuffleManager`` per participant. ``send_input`` sends one
input as a transfer task's client does: ``shuffle._split.split_input`` cuts it into
pieces, ``shuffle._send.send_shards`` batches and encodes them, and ``deliver`` (the
injected wire) copies the frames, as a network would, into the owner's manager.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Sequence
from typing import Any, Literal

from shuffle._manager import ShuffleManager
from shuffle._options import RunOptions
from shuffle._send import Sent, send_shards
from shuffle._spec import ShuffleRunSpec
from shuffle._split import split_input
from shuffle.wire._memory import HOST_REGISTRY, MemoryRegistry

Mode = Literal["direct", "delay", "chaos"]


def copy_host_frames(frames: Sequence[Any]) -> list[Any]:
    return [bytearray(frame) for frame in frames]  # the sender may reuse its buffers


class Network:
    """Participants' managers wired together in memory, with a configurable wire.

    ``direct`` delivers at once; ``delay`` yields to the loop a random number of times
    first; ``chaos`` does too (so concurrent messages overtake each other) and delivers
    some messages twice. ``gate`` holds deliveries until it is set, and
    ``waiting`` is set once a delivery waits at the gate. ``copy`` copies a message's
    frames (device frames need a device copy).
    """

    def __init__(
        self,
        names: Sequence[str],
        *,
        options: RunOptions,
        mode: Mode = "direct",
        seed: int = 0,
        registry: MemoryRegistry = HOST_REGISTRY,
        copy: Callable[[Sequence[Any]], list[Any]] = copy_host_frames,
    ) -> None:
        self.options = options
        self.mode = mode
        self.rng = random.Random(seed)
        self.registry = registry
        self.copy = copy
        self.gate: asyncio.Event | None = None
        self.waiting = asyncio.Event()
        self.sends = 0
        self.log: list[tuple[str, list[Any]]] = []  # every delivered message
        self.managers = {
            name: ShuffleManager(local=name, options=options, registry=registry)
            for name in names
        }

    @property
    def names(self) -> list[str]:
        return list(self.managers)

    async def send_input(
        self,
        sender: str,
        data: Any,
        input_partition: int,
        *,
        spec: ShuffleRunSpec,
        meta: Any,
        covers: Sequence[int] = (),
    ) -> Sent:
        """Split and send one input as ``sender``, as a transfer task's client does."""
        shards = split_input(
            data, spec=spec, meta=meta, input_partition=input_partition, covers=covers
        )
        return await send_shards(
            shards,
            spec=spec,
            options=self.options,
            sender=sender,
            deliver=self.deliver,
            registry=self.registry,
            name=sender,
        )

    async def deliver(self, destination: str, frames: list[Any]) -> None:
        wire = self.copy(frames)
        self.sends += 1
        if self.gate is not None and not self.gate.is_set():
            self.waiting.set()
            await self.gate.wait()
        if self.mode in ("delay", "chaos"):
            await self._yield_randomly()
        self.log.append((destination, wire))
        await self.managers[destination].receive(wire)
        if self.mode == "chaos" and self.rng.random() < 0.3:
            await self._yield_randomly()
            await self.managers[destination].receive(self.copy(wire))

    async def replay(self) -> None:
        """Deliver every message again, as retried transfers would."""
        for destination, wire in list(self.log):
            await self.managers[destination].receive(self.copy(wire))

    async def close(self) -> None:
        await asyncio.gather(*(m.close() for m in self.managers.values()))

    def assert_clean(self) -> None:
        for manager in self.managers.values():
            assert manager.closed
            assert dict(manager.runs) == {}

    async def _yield_randomly(self) -> None:
        for _ in range(self.rng.randrange(6)):
            await asyncio.sleep(0)
