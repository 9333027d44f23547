"""What a participant's runs hold and did, as plain values for monitoring.

Pure: the Ray shell reads these (``ShuffleActor.usage``, its metrics loop) and turns
them into Ray metrics and status answers; nothing here touches the hot path. A run
keeps its counters in ``RunStats`` and its store (``DiskShardStore``); ``run_usage``
reads them into one frozen ``RunUsage``. A participant's cumulative counters
(``ParticipantCounters``) add the runs it closed to the runs still open, so they only
ever grow, which is what a metrics counter needs.

Refusals are counted by a bounded set of reasons (``refusal_reason``), never by
anything unbounded such as shuffle ids.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from shuffle._exceptions import (
    FrameError,
    ShuffleClosedError,
    StaleRunError,
    UnknownRunError,
)

__all__ = [
    "REFUSAL_REASONS",
    "ParticipantCounters",
    "RefusalReason",
    "RunUsage",
    "refusal_reason",
]

RefusalReason = Literal[
    "handshake", "protocol", "frame", "stale_run", "unknown_run", "closed_run", "other"
]
#: Every value the ``reason`` tag of the refusal counter takes.
REFUSAL_REASONS: tuple[RefusalReason, ...] = (
    "handshake",  # a connection that failed authentication (wrong secret, timeout)
    "protocol",  # bytes that are no valid transport message, or exceed the frame limits
    "frame",  # a message the run refused: malformed header, foreign partitions, ...
    "stale_run",  # a message of a superseded run (expected around restarts)
    "unknown_run",  # a run not started here (yet)
    "closed_run",  # a run already closed here
    "other",  # anything else, e.g. a device frame this actor cannot hold
)


def refusal_reason(exc: BaseException) -> RefusalReason:
    """The reason tag of a message refused with ``exc``."""
    if isinstance(exc, StaleRunError):
        return "stale_run"
    if isinstance(exc, UnknownRunError):
        return "unknown_run"
    if isinstance(exc, ShuffleClosedError):
        return "closed_run"
    if isinstance(exc, FrameError):
        return "frame"
    return "other"


@dataclass(frozen=True, kw_only=True)
class RunUsage:
    """One run on one participant: what it received and where its bytes are now."""

    shuffle_id: str
    run_id: int
    kind: str  # "shuffle" or "rechunk"
    participant: str
    messages_received: int
    pieces_received: int  # new pieces stored (duplicates not counted)
    bytes_received: int  # their payload bytes; message headers not counted
    memory_bytes: int  # held in host memory now
    disk_bytes: int  # spilled to disk now
    device_bytes: int  # held in device memory now
    bytes_spilled: int  # written to disk so far
    bytes_read_back: int  # read back from disk so far (by unpacks)
    seconds: float  # since the run was created here
    spill_seconds: float = 0.0  # writing spills so far
    read_back_seconds: float = 0.0  # reading spills back so far
    #: from the run's creation here to the last message it stored (the receive phase)
    receive_seconds: float = 0.0
    #: building outputs so far, summed over the threads that build them in parallel
    unpack_seconds: float = 0.0


@dataclass(frozen=True, kw_only=True)
class ParticipantCounters:
    """Cumulative counters of one participant over every run it held."""

    runs_opened: int = 0
    messages_received: int = 0
    pieces_received: int = 0
    bytes_received: int = 0
    bytes_spilled: int = 0
    bytes_read_back: int = 0

    def __add__(self, other: ParticipantCounters) -> ParticipantCounters:
        return ParticipantCounters(
            **{
                f.name: getattr(self, f.name) + getattr(other, f.name)
                for f in dataclasses.fields(self)
            }
        )

    @classmethod
    def of_runs(cls, runs: Iterable[RunUsage]) -> ParticipantCounters:
        """The counters ``runs`` contribute (``runs_opened`` stays 0)."""
        total = cls()
        for u in runs:
            total += cls(
                messages_received=u.messages_received,
                pieces_received=u.pieces_received,
                bytes_received=u.bytes_received,
                bytes_spilled=u.bytes_spilled,
                bytes_read_back=u.bytes_read_back,
            )
        return total

    def deltas(self, since: ParticipantCounters) -> Mapping[str, int]:
        """How much each counter grew since ``since`` (non-zero ones only)."""
        out = {}
        for f in dataclasses.fields(self):
            grown = getattr(self, f.name) - getattr(since, f.name)
            if grown:
                out[f.name] = grown
        return out
