"""Shuffle progress and status, as typed values: what ``shuffle_status()`` and
``last_stats().shuffle_runs`` return. Pure: no Ray here.

A shuffle's input is "received" when its transfer task finished: a transfer returns
only once every piece it sent was acknowledged, i.e. stored (or spilled) by its owner.
So the driver counts received inputs from the groups it sees finish
(``ShuffleProgress``), while the bytes per actor come from the actors themselves
(``shuffle._usage.RunUsage``, asked by the plugin with a short deadline).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from shuffle._usage import RunUsage

__all__ = [
    "ActorRunStatus",
    "ShuffleProgress",
    "ShuffleRunStatus",
    "ShuffleRunTotals",
    "ShuffleStatus",
    "run_status",
    "run_totals",
]

Key = Hashable


@dataclass(frozen=True, kw_only=True)
class ActorRunStatus:
    """One run on one shuffle actor, now."""

    actor: str
    node_id: str
    pieces_received: int  # pieces stored so far (duplicates from retries not counted)
    bytes_received: int  # their payload bytes
    memory_bytes: int  # of those, held in memory now
    disk_bytes: int  # of those, spilled to disk now
    device_bytes: int  # held in device (GPU) memory now


@dataclass(frozen=True, kw_only=True)
class ShuffleRunStatus:
    """One running shuffle or rechunk: its progress and where its bytes are."""

    shuffle_id: str
    run_id: int
    kind: str  # "shuffle" (dataframes) or "rechunk" (arrays)
    inputs_received: int  # transfer tasks finished: their pieces are at their owners
    inputs_expected: int
    outputs_done: int  # output partitions handed over by the actors
    outputs_expected: int
    elapsed: float  # seconds since this run started (a restart starts a new run)
    restarts: int  # restarts of this shuffle in this compute so far
    actors: tuple[ActorRunStatus, ...]  # the actors that answered, by name

    @property
    def bytes_received(self) -> int:
        return sum(a.bytes_received for a in self.actors)

    @property
    def memory_bytes(self) -> int:
        return sum(a.memory_bytes for a in self.actors)

    @property
    def disk_bytes(self) -> int:
        return sum(a.disk_bytes for a in self.actors)


@dataclass(frozen=True, kw_only=True)
class ShuffleStatus:
    """Every shuffle running now, from every compute of this driver."""

    runs: tuple[ShuffleRunStatus, ...]
    unanswered: tuple[str, ...] = ()  # actors that did not answer within the deadline


@dataclass(frozen=True, kw_only=True)
class ShuffleRunTotals:
    """One finished shuffle of a compute (its last run), summed over its actors."""

    shuffle_id: str
    run_id: int
    kind: str
    inputs: int
    outputs: int
    pieces_received: int
    bytes_received: int
    bytes_spilled: int
    bytes_read_back: int
    seconds: float  # from the run's start to its close
    spill_seconds: float = 0.0  # writing spills, summed over the actors
    read_back_seconds: float = 0.0  # reading spills back, summed over the actors
    receive_seconds: float = 0.0  # to the last message stored, the slowest actor's
    unpack_seconds: float = 0.0  # building outputs, summed over actors and threads

    @property
    def gb_per_s(self) -> float:
        """Payload bytes received per second of the run, in GB/s (10**9 bytes)."""
        return self.bytes_received / self.seconds / 1e9 if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class _Progress:
    inputs_received: int
    inputs_expected: int
    outputs_done: int
    outputs_expected: int
    started: float
    restarts: int


class ShuffleProgress:
    """Inputs received and outputs handed over per shuffle of one compute.

    Fed by the compute's loop (``finished``, ``restarted``) and read from any thread
    (``snapshot``), hence the lock. ``transfers``: each shuffle's transfer keys;
    ``unpacks``: each shuffle's unpack keys.
    """

    def __init__(
        self,
        *,
        transfers: Mapping[str, Sequence[Key]],
        unpacks: Mapping[str, Sequence[Key]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._input_of = {k: sid for sid, keys in transfers.items() for k in keys}
        self._output_of = {k: sid for sid, keys in unpacks.items() for k in keys}
        self._expected = {
            sid: (len(transfers[sid]), len(unpacks.get(sid, ()))) for sid in transfers
        }
        now = clock()
        self._received = dict.fromkeys(transfers, 0)
        self._done = dict.fromkeys(transfers, 0)
        self._started = dict.fromkeys(transfers, now)
        self._restarts = dict.fromkeys(transfers, 0)

    def finished(self, keys: Iterable[Key]) -> None:
        """The tasks ``keys`` finished (one group's)."""
        with self._lock:
            for k in keys:
                sid = self._input_of.get(k)
                if sid is not None:
                    self._received[sid] += 1
                    continue
                sid = self._output_of.get(k)
                if sid is not None:
                    self._done[sid] += 1

    def restarted(self, shuffle_id: str) -> None:
        """A new run of ``shuffle_id`` started: its inputs are sent again (finished
        outputs stay finished)."""
        with self._lock:
            self._received[shuffle_id] = 0
            self._started[shuffle_id] = self._clock()
            self._restarts[shuffle_id] += 1

    def snapshot(self) -> dict[str, _Progress]:
        with self._lock:
            return {
                sid: _Progress(
                    inputs_received=self._received[sid],
                    inputs_expected=inputs,
                    outputs_done=self._done[sid],
                    outputs_expected=outputs,
                    started=self._started[sid],
                    restarts=self._restarts[sid],
                )
                for sid, (inputs, outputs) in self._expected.items()
            }

    @property
    def clock(self) -> Callable[[], float]:
        return self._clock


def run_status(
    progress: _Progress,
    *,
    shuffle_id: str,
    run_id: int,
    kind: str,
    usages: Iterable[RunUsage],
    node_of: Mapping[str, str],
    now: float,
) -> ShuffleRunStatus:
    """The status of run ``run_id`` of ``shuffle_id`` from its progress and the usage
    its actors reported (other runs' usage is ignored)."""
    actors = sorted(
        (u for u in usages if u.shuffle_id == shuffle_id and u.run_id == run_id),
        key=lambda u: u.participant,
    )
    return ShuffleRunStatus(
        shuffle_id=shuffle_id,
        run_id=run_id,
        kind=kind,
        inputs_received=progress.inputs_received,
        inputs_expected=progress.inputs_expected,
        outputs_done=progress.outputs_done,
        outputs_expected=progress.outputs_expected,
        elapsed=now - progress.started,
        restarts=progress.restarts,
        actors=tuple(
            ActorRunStatus(
                actor=u.participant,
                node_id=node_of.get(u.participant, ""),
                pieces_received=u.pieces_received,
                bytes_received=u.bytes_received,
                memory_bytes=u.memory_bytes,
                disk_bytes=u.disk_bytes,
                device_bytes=u.device_bytes,
            )
            for u in actors
        ),
    )


def run_totals(
    progress: _Progress,
    *,
    shuffle_id: str,
    run_id: int,
    kind: str,
    usages: Iterable[RunUsage],
    seconds: float,
) -> ShuffleRunTotals:
    """A finished run's totals over the final usage its actors returned on close."""
    mine = [u for u in usages if u.shuffle_id == shuffle_id and u.run_id == run_id]
    return ShuffleRunTotals(
        shuffle_id=shuffle_id,
        run_id=run_id,
        kind=mine[0].kind if mine else kind,
        inputs=progress.inputs_expected,
        outputs=progress.outputs_expected,
        pieces_received=sum(u.pieces_received for u in mine),
        bytes_received=sum(u.bytes_received for u in mine),
        bytes_spilled=sum(u.bytes_spilled for u in mine),
        bytes_read_back=sum(u.bytes_read_back for u in mine),
        seconds=seconds,
        spill_seconds=sum(u.spill_seconds for u in mine),
        read_back_seconds=sum(u.read_back_seconds for u in mine),
        receive_seconds=max((u.receive_seconds for u in mine), default=0.0),
        unpack_seconds=sum(u.unpack_seconds for u in mine),
    )
