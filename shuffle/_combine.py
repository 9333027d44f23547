"""Pure logic: which staged input partitions a transfer task sends as one.

A shuffle of N inputs into M outputs cuts N x M pieces, and most of what a piece
costs is per piece, not per byte: the 65,536 pieces of ~4 KB of a 256 x 256 shuffle
of 1 MiB partitions took about half of a run's CPU (measured against 32 inputs of
8 MiB, same bytes: 2.6 against 5.3 CPU seconds). A transfer task that computes
several inputs of one run (``_transfer.InputBatch``) therefore joins them into one
frame, split once, whose pieces are named by its smallest input partition.

What stays true: receivers drop a piece they already hold under the same name (a
retried task resends), and the sets never overlap, so names stay unique; the sets
depend only on what the task staged, never on timing, so a retry cuts the same
ones. What changes: an output partition's rows come ordered by piece name, and a
joined piece keeps its inputs' rows in input order; inputs of different pieces may
interleave. Dask promises no row order across inputs for its p2p methods
(distributed's P2P concatenates shards in arrival order).

Only pandas frames of identical columns and dtypes are joined: ``pd.concat`` of
categoricals with different categories would give an object column, while pieces
of their own keep every category (``_partition.concat_partition``).
"""

from __future__ import annotations

import sys
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["combine", "frame_nbytes", "runs_to_combine"]

#: Evenly spaced values of a Python-object column whose sizes stand for all of them.
_SAMPLE = 32


def frame_nbytes(frame: Any) -> int:
    """About the bytes of ``frame``, the same on every call for the same data.

    Where a task sends staged inputs depends on this, and a retry must cut the same
    sets (module docstring): dask's ``sizeof`` samples object columns at random, so
    it cannot be used. Columns (and an index) of Python objects count the sizes of
    evenly spaced values for all of theirs.
    """
    if type(frame) is not pd.DataFrame:
        return int(frame.memory_usage(deep=True).sum())  # cuDF: exact, and cheap
    dtypes = list(frame.dtypes)
    index = frame.index
    if index.dtype != object and all(isinstance(d, np.dtype) and d != object for d in dtypes):
        # memory_usage costs ~0.25 ms per call; numpy columns are rows x itemsize.
        return len(frame) * sum(d.itemsize for d in dtypes) + int(index.nbytes)
    total = int(frame.memory_usage(index=True, deep=False).sum())
    if len(frame):
        step = max(1, len(frame) // _SAMPLE)
        for position, dtype in enumerate(dtypes):
            if _holds_objects(dtype):
                total += _objects_nbytes(frame.iloc[::step, position].tolist(), len(frame))
        if _holds_objects(index.dtype):
            total += _objects_nbytes(index[::step].tolist(), len(frame))
    return total


def _holds_objects(dtype: Any) -> bool:
    # memory_usage(deep=False) counts these as one pointer per value.
    return dtype == object or (isinstance(dtype, pd.StringDtype) and dtype.storage == "python")


def _objects_nbytes(sample: list[Any], n: int) -> int:
    return n * sum(map(sys.getsizeof, sample)) // len(sample)


def runs_to_combine(staged: Sequence[tuple[int, Any]]) -> list[list[tuple[int, Any]]]:
    """``(input partition, frame)`` items as the runs to send joined, each in input
    order, runs ordered by their smallest input.

    Pandas frames with the same columns and dtypes share a run; any other frame
    (a cuDF one, say) is a run of its own.
    """
    runs: list[list[tuple[int, Any]]] = []
    by_signature: dict[Hashable, list[tuple[int, Any]]] = {}
    for item in sorted(staged, key=lambda item: item[0]):
        signature = _signature(item[1])
        run = by_signature.get(signature) if signature is not None else None
        if run is None:
            run = [item]
            runs.append(run)
            if signature is not None:
                by_signature[signature] = run
        else:
            run.append(item)
    return runs


def combine(run: Sequence[tuple[int, Any]]) -> tuple[int, Any]:
    """One run as ``(its first input partition, one frame)``: rows in input order."""
    first = run[0][0]
    if len(run) == 1:
        return first, run[0][1]
    return first, pd.concat([frame for _, frame in run])


def _signature(frame: Any) -> Hashable | None:
    if type(frame) is not pd.DataFrame:
        return None
    # dtype objects hash by value (a CategoricalDtype by its categories and order).
    signature = (tuple(frame.columns), tuple(frame.dtypes))
    try:
        hash(signature)
    except TypeError:  # an extension dtype that does not hash: never joined
        return None
    return signature
