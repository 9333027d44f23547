"""What a shuffle run is: its ids, its participants, and who owns which output partition.

Ownership is range sharding, as in ``distributed.shuffle``: participant ``i`` of ``w``
owns the contiguous block of output partitions ``p`` with ``w * p // n == i``. Blocks
differ in size by at most one, every participant computes the same answer without
talking to anyone, and the inverse is a ``range``, so nothing is materialised per
partition.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from shuffle._exceptions import StaleRunError
from shuffle._ids import RunId, ShuffleId

__all__ = ["ShuffleRunSpec", "owner_of", "partitions_of"]

DEFAULT_PARTITION_COLUMN = "_partitions"  # the column dask's P2P graphs assign


def owner_of(partition: int, *, npartitions: int, participants: Sequence[str]) -> str:
    """The participant that owns output ``partition`` of ``npartitions``."""
    if not 0 <= partition < npartitions:
        raise ValueError(
            f"output partition {partition} is out of range for {npartitions} partitions"
        )
    return participants[len(participants) * partition // npartitions]


def partitions_of(owner: str, *, npartitions: int, participants: Sequence[str]) -> range:
    """The output partitions ``owner`` owns: the inverse of ``owner_of``."""
    try:
        i = participants.index(owner)
    except ValueError:
        raise ValueError(
            f"{owner!r} is not a participant; participants are {list(participants)}"
        ) from None
    w = len(participants)
    # owner_of(p) == i  <=>  i * n <= w * p < (i + 1) * n, hence ceil bounds.
    return range(-(-i * npartitions // w), -(-(i + 1) * npartitions // w))


@dataclass(frozen=True, kw_only=True)
class ShuffleRunSpec:
    """Everything a participant needs to take part in one run of one shuffle.

    Immutable and small, so the driver can ship it to every actor and compare it.
    ``participants`` are actor names or addresses; their order defines ownership.
    """

    shuffle_id: ShuffleId
    run_id: RunId
    npartitions_out: int
    participants: tuple[str, ...]
    column: str = DEFAULT_PARTITION_COLUMN
    drop_column: bool = True
    #: The output partitions the compute asks for (ascending); senders drop the rows of
    #: the others, so selecting a few outputs moves only their rows. ``None``: all.
    needed: tuple[int, ...] | None = None
    #: How many input partitions the run has; shards named by an input outside
    #: ``[0, npartitions_in)`` are refused. ``None``: not known, not checked.
    npartitions_in: int | None = None

    def __post_init__(self) -> None:
        # Accept any sequence but store a tuple, so the spec stays hashable.
        object.__setattr__(self, "participants", tuple(self.participants))
        if not isinstance(self.shuffle_id, str) or not self.shuffle_id:
            raise ValueError(f"shuffle_id must be a non-empty str, got {self.shuffle_id!r}")
        if isinstance(self.run_id, bool) or not isinstance(self.run_id, int) or self.run_id < 1:
            raise ValueError(f"run_id must be an int >= 1, got {self.run_id!r}")
        if self.npartitions_out < 1:
            raise ValueError(f"npartitions_out must be >= 1, got {self.npartitions_out}")
        if self.npartitions_in is not None and (
            isinstance(self.npartitions_in, bool)
            or not isinstance(self.npartitions_in, int)
            or self.npartitions_in < 1
        ):
            raise ValueError(f"npartitions_in must be an int >= 1, got {self.npartitions_in!r}")
        if not self.participants:
            raise ValueError(f"shuffle {self.shuffle_id!r} needs at least one participant")
        if len(set(self.participants)) != len(self.participants):
            raise ValueError(f"participants must be unique, got {self.participants}")
        if self.needed is not None:
            needed = tuple(sorted(set(self.needed)))
            if needed and not (needed[0] >= 0 and needed[-1] < self.npartitions_out):
                raise ValueError(
                    f"shuffle {self.shuffle_id!r}: needed output partitions {needed} must "
                    f"lie in [0, {self.npartitions_out})"
                )
            object.__setattr__(self, "needed", needed)

    def owner_of(self, partition: int) -> str:
        return owner_of(partition, npartitions=self.npartitions_out, participants=self.participants)

    def partitions_of(self, participant: str) -> range:
        return partitions_of(
            participant, npartitions=self.npartitions_out, participants=self.participants
        )

    def inputs_out_of_range(self, inputs: Iterable[int]) -> list[int]:
        """The input partitions of ``inputs`` this run does not have, sorted."""
        if self.npartitions_in is None:
            return []
        return sorted({i for i in inputs if not 0 <= i < self.npartitions_in})

    def check_run_id(self, run_id: int) -> None:
        """Raise ``StaleRunError`` unless ``run_id`` is this run's id.

        Whichever side holds the older id is the stale one: an old message is dropped,
        an old local spec must be replaced before it handles newer messages.
        """
        if run_id != self.run_id:
            old, new = sorted((run_id, self.run_id))
            raise StaleRunError(self.shuffle_id, old, new)

    def next_run(
        self, *, run_id: RunId, participants: Sequence[str] | None = None
    ) -> ShuffleRunSpec:
        """The spec of a restart of this shuffle, possibly on other participants."""
        if run_id <= self.run_id:
            raise ValueError(
                f"shuffle {self.shuffle_id!r}: a restart needs a run id above "
                f"{self.run_id}, got {run_id}"
            )
        return dataclasses.replace(
            self,
            run_id=run_id,
            participants=self.participants if participants is None else tuple(participants),
        )
