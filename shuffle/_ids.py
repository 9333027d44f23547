"""Identifiers that every shuffle message carries.

A shuffle is named by dask (``ShuffleId``, the token of its P2P layer). Each attempt at
running it gets a fresh ``RunId``: when an actor is lost, the shuffle restarts under a
higher run id, and anything stamped with an older one is stale. Inside a run, a piece of
data is named by ``ShardKey``: which output partition it belongs to and which input
partition produced it, so receivers can drop duplicates sent by a retried transfer task
and order rows deterministically.
"""

from __future__ import annotations

import itertools
import threading
from typing import NamedTuple, NewType

__all__ = ["RunId", "RunIdMinter", "ShardKey", "ShuffleId"]

ShuffleId = NewType("ShuffleId", str)
RunId = NewType("RunId", int)


class ShardKey(NamedTuple):
    """Names one piece of a shuffle: rows of ``input_partition`` bound for ``output_partition``."""

    output_partition: int
    input_partition: int


class RunIdMinter:
    """Mints strictly increasing run ids, safely from several threads.

    One minter belongs to one driver-side owner (not a module global), so that two
    schedulers in one process cannot interleave each other's ids into a wrong order.
    """

    def __init__(self, start: int = 1) -> None:
        if start < 1:
            raise ValueError(f"run ids start at 1 or above, got start={start}")
        self._counter = itertools.count(start)
        self._lock = threading.Lock()

    def __call__(self) -> RunId:
        with self._lock:
            return RunId(next(self._counter))
