"""``RunHandle``: what a transfer task needs to send one run's shards, and nothing more.

The driver's ``ShuffleService`` mints one per run and passes it to every transfer task
as an ordinary task argument, so the shared secret travels over Ray's own channel.
Transfer tasks never call actors, so the pickled handle leaves the actor handles out:
every task that deserialised an ``ActorHandle`` would become a borrower of every
shuffle actor, reference-counting traffic per task for nothing. The driver's copy
keeps them, for ``actor_for`` (unpack calls); any pickled copy (``copy.copy`` too)
has ``actors=None``. No Ray import here: the client side
stays testable without Ray.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from shuffle._options import DEFAULT_OPTIONS, RunOptions
from shuffle._rechunk import RechunkLayout
from shuffle._spec import ShuffleRunSpec
from shuffle.device._options import DEFAULT_DEVICE_OPTIONS, DeviceOptions

__all__ = ["RunHandle"]


# eq=False: identity equality, since a DataFrame field has no truth value to compare.
@dataclass(frozen=True, kw_only=True, eq=False)
class RunHandle:
    """One run of one shuffle, as the driver started it on every participant.

    ``meta`` is the empty input frame of a dataframe shuffle, or the ``RechunkLayout`` of
    an array rechunk (its partitions are flat chunk numbers). ``addresses`` maps each
    participant name of ``spec`` to its listener address;
    ``transport`` is the transport those addresses belong to (``"tcp"`` or ``"ucx"``,
    never ``"auto"``); ``options`` carries the senders' knobs (message size, send budget,
    concurrency), ``device`` whether device payloads travel (senders pick their memory
    registry from its mode). ``actors`` (participant name -> ActorHandle) exists on the
    driver only.
    """

    spec: ShuffleRunSpec
    meta: pd.DataFrame | RechunkLayout
    addresses: Mapping[str, str]
    secret: bytes = field(repr=False)
    transport: str
    options: RunOptions = DEFAULT_OPTIONS
    device: DeviceOptions = DEFAULT_DEVICE_OPTIONS
    actors: Mapping[str, Any] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        missing = set(self.spec.participants) - set(self.addresses)
        if missing:
            raise ValueError(
                f"shuffle {self.spec.shuffle_id!r} run {self.spec.run_id}: no address for "
                f"participants {sorted(missing)}"
            )
        object.__setattr__(self, "addresses", dict(self.addresses))

    def __reduce__(self) -> tuple[Any, ...]:
        state = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        state["actors"] = None  # driver only, see the module docstring
        return (_rebuild, (state,))

    def actor_for(self, partition: int) -> Any:
        """The ActorHandle of the actor owning output ``partition`` (driver side only)."""
        if self.actors is None:
            raise RuntimeError(
                f"shuffle {self.spec.shuffle_id!r} run {self.spec.run_id}: this RunHandle "
                "was unpickled and holds no actor handles; only the driver's copy has them"
            )
        return self.actors[self.spec.owner_of(partition)]


def _rebuild(state: dict[str, Any]) -> RunHandle:
    return RunHandle(**state)
