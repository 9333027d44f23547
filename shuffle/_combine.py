"""Pure logic: which staged input partitions a transfer task sends as one.

A shuffle of N inputs into M outputs cuts N x M pieces, and most of what a piece
costs is per piece, not per byte: the 65,536 pieces of ~4 KB of a 256 x 256 shuffle
of 1 MiB partitions took about half of a run's CPU (measured against 32 inputs of
8 MiB, same bytes: 2.6 against 5.3 CPU seconds). A transfer task that computes
several inputs of one run (``_transfer.InputBatch``) therefore joins them into one
frame, split once, whose pieces are named by its smallest input partition.

What stays true: receivers drop a piece they already hold under the same name (a
retried task resends), and the sets never overlap, so names stay unique; the sets
depend only on what the task staged, never on timing, so a retry of deterministic
inputs cuts the same ones. A retry whose inputs came out different (a random
source, data that changed) could cut other sets, which name-based dedupe would
turn into lost or doubled rows; so a joined piece's meta lists the inputs it
covers (``joined_meta``), and ``Coverage`` refuses a piece whose set overlaps
another one (``InconsistentInputsError``): the compute fails, loudly, instead.

What changes: an output partition's rows come ordered by piece name, and a
joined piece keeps its inputs' rows in input order; inputs of different pieces may
interleave. Dask promises no row order across inputs for its p2p methods
(distributed's P2P concatenates shards in arrival order).

Only pandas frames of identical columns and dtypes are joined: ``pd.concat`` of
categoricals with different categories would give an object column, while pieces
of their own keep every category (``_partition.concat_partition``).
"""

from __future__ import annotations

import functools
import struct
import sys
from collections.abc import Hashable, Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from shuffle._exceptions import FrameError, InconsistentInputsError

_OBJECT = np.dtype(object)

__all__ = [
    "JOINED_TAG",
    "Coverage",
    "combine",
    "frame_nbytes",
    "joined_meta",
    "runs_to_combine",
    "split_joined",
]

#: Leads the meta of a piece cut from joined inputs: u32 count, the inputs as u32,
#: then the piece's own meta (``shuffle.wire._arrow``'s, or empty for an IPC stream).
JOINED_TAG = b"joined\0"
_U32 = struct.Struct("<I")

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
    if index.dtype != _OBJECT and all(isinstance(d, np.dtype) and d != _OBJECT for d in dtypes):
        # memory_usage costs ~0.25 ms per call; numpy columns are rows x itemsize.
        row_bytes: int = sum(d.itemsize for d in dtypes)
        return len(frame) * row_bytes + int(index.nbytes)
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
    return dtype == _OBJECT or (isinstance(dtype, pd.StringDtype) and dtype.storage == "python")


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


def combine(run: Sequence[tuple[int, Any]]) -> tuple[int, Any, tuple[int, ...]]:
    """One run as ``(its first input partition, one frame, the inputs it covers)``:
    rows in input order."""
    inputs = tuple(i for i, _ in run)
    if len(run) == 1:
        return inputs[0], run[0][1], inputs
    return inputs[0], pd.concat([frame for _, frame in run]), inputs


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


def joined_meta(inputs: Sequence[int], meta: bytes) -> bytes:
    """The meta of a piece covering ``inputs`` (sorted, the first names the piece)."""
    count = len(inputs)
    return b"".join([JOINED_TAG, _U32.pack(count), struct.pack(f"<{count}I", *inputs), meta])


@functools.lru_cache(maxsize=4096)
def split_joined(meta: bytes) -> tuple[tuple[int, ...] | None, bytes]:
    """``(inputs covered, own meta)`` of a piece; ``(None, meta)`` if not joined.

    Cached: every piece of one joined frame carries the same meta.
    """
    if not meta.startswith(JOINED_TAG):
        return None, meta
    start = len(JOINED_TAG)
    if len(meta) < start + 4:
        raise FrameError("a joined piece's meta is truncated")
    (count,) = _U32.unpack_from(meta, start)
    end = start + 4 + 4 * count
    if count < 2 or len(meta) < end:
        raise FrameError(f"a joined piece's meta is malformed (count {count}, {len(meta)} bytes)")
    inputs = struct.unpack_from(f"<{count}I", meta, start + 4)
    if list(inputs) != sorted(set(inputs)):
        raise FrameError(f"a joined piece's inputs {inputs[:8]} are not sorted and distinct")
    return inputs, meta[end:]


class Coverage:
    """Which inputs the stored pieces of each output partition cover (module doc)."""

    def __init__(self, *, npartitions_in: int | None = None) -> None:
        self._by_partition: dict[int, dict[int, tuple[int, ...]]] = {}  # input -> its set
        #: Joined pieces covering inputs beyond it are refused (``None``: unchecked).
        self._npartitions_in = npartitions_in

    def admit(self, pieces: Iterable[tuple[int, int, bytes]]) -> None:
        """Check ``(output, input, meta)`` of one message's pieces and record them.

        A piece whose set equals the stored one of its name is a duplicate (fine);
        one overlapping another set raises ``InconsistentInputsError`` and records
        nothing; a malformed one ``FrameError``.
        """
        new: dict[int, dict[int, tuple[int, ...]]] = {}
        for output, name, meta in pieces:
            joined, _ = split_joined(meta)
            inputs = (name,) if joined is None else joined
            if inputs[0] != name:
                raise FrameError(
                    f"a joined piece of output {output} is named {name}, not by its first "
                    f"input {inputs[0]}"
                )
            if self._npartitions_in is not None and inputs[-1] >= self._npartitions_in:
                raise FrameError(
                    f"a joined piece of output {output} covers input partition {inputs[-1]}, "
                    f"but the run has {self._npartitions_in} inputs"
                )
            stored = self._by_partition.get(output, {})
            fresh = new.setdefault(output, {})
            known = stored.get(name) or fresh.get(name)
            if known == inputs:
                continue  # a resent piece
            for i in inputs:
                if i in stored or i in fresh:
                    other = stored.get(i) or fresh[i]
                    raise InconsistentInputsError(
                        f"output partition {output}: a piece covering input partitions "
                        f"{_show(inputs)} overlaps one covering {_show(other)}. A retried "
                        "transfer task computed different inputs than its first attempt "
                        "(a nondeterministic source?); make the inputs deterministic, or "
                        "set ray-oob-sched.shuffle.combine-bytes to 0"
                    )
            for i in inputs:
                fresh[i] = inputs
        for output, covered in new.items():
            self._by_partition.setdefault(output, {}).update(covered)


def _show(inputs: Sequence[int]) -> str:
    return str(list(inputs[:6]))[:-1] + (", ...]" if len(inputs) > 6 else "]")
