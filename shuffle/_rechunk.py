"""Array rechunk geometry: which piece of which input chunk lands where in which output.

A p2p rechunk moves every input chunk of an array, cut by the output chunks it
overlaps, to the owners of those output chunks. Everything here is arithmetic on the
two chunkings (dask's ``chunks`` tuples): no arrays are materialised per chunk, no Ray,
no I/O. Chunks are numbered by their flat, row-major index in the chunk grid, which is
what the wire header carries (``ShardKey`` holds two u32s); ``RechunkLayout`` converts
between flat numbers and dask's N-d block indices.

Per axis, an input chunk ``[a0, a1)`` contributes ``[max(a0, b0), min(a1, b1))`` to an
output chunk ``[b0, b1)`` when that overlap is non-empty. An output chunk of length 0
along an axis has no overlap; it is given exactly one (empty) contributor, the input
chunk at its position, so that every output chunk receives at least one piece and the
receiver learns the dtype from data rather than from a guess.

An axis with unknown chunk lengths (NaN in dask's ``chunks``, e.g. after boolean
indexing) cannot be cut, and dask only plans rechunks that leave such an axis as it
is: there, input chunk ``i`` is output chunk ``i``, whole (``slice(None)``), and its
length is learnt from the data. The layout writes unknown lengths as ``None``.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import math
import operator
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeGuard, cast

__all__ = ["AxisPiece", "RechunkLayout", "is_rechunk"]

Chunks = tuple[tuple[int | None, ...], ...]  # None: unknown length (dask's NaN)
NDIndex = tuple[int, ...]


@dataclass(frozen=True, slots=True)
class AxisPiece:
    """Along one axis: ``source[in_slice]`` of an input chunk goes to ``out_slice`` of an
    output chunk."""

    input_chunk: int
    output_chunk: int
    in_slice: slice
    out_slice: slice


def _bounds(chunks: Sequence[int]) -> list[int]:
    return [0, *itertools.accumulate(chunks)]


def _axis_pieces(old: Sequence[int | None], new: Sequence[int | None]) -> list[AxisPiece]:
    if None in old:  # unknown lengths: unchanged (checked), every chunk goes whole
        return [AxisPiece(i, i, slice(None), slice(None)) for i in range(len(old))]
    a, b = _bounds(cast("Sequence[int]", old)), _bounds(cast("Sequence[int]", new))
    pieces = []
    for j in range(len(new)):
        b0, b1 = b[j], b[j + 1]
        if b1 == b0:  # empty output chunk: one empty piece from the input chunk at b0
            i = min(bisect.bisect_right(a, b0) - 1, len(old) - 1)
            offset = b0 - a[i]
            pieces.append(AxisPiece(i, j, slice(offset, offset), slice(0, 0)))
            continue
        # Input chunks overlapping [b0, b1): from the one holding b0 to the one holding b1-1.
        first = bisect.bisect_right(a, b0) - 1
        last = bisect.bisect_left(a, b1) - 1
        for i in range(first, last + 1):
            lo, hi = max(a[i], b0), min(a[i + 1], b1)
            if hi > lo:
                pieces.append(AxisPiece(i, j, slice(lo - a[i], hi - a[i]), slice(lo - b0, hi - b0)))
    return pieces


@dataclass(frozen=True)
class RechunkLayout:
    """The old and new chunking of one array, and the pieces that turn one into the other.

    ``old`` and ``new`` are dask ``chunks`` (one tuple of chunk lengths per axis) of the
    same shape; an axis with unknown (NaN) lengths must be the same in both.
    Immutable and small: the driver ships it to every actor and transfer.
    """

    old: Chunks
    new: Chunks
    _by_input: tuple[tuple[tuple[AxisPiece, ...], ...], ...] = field(
        init=False, repr=False, compare=False
    )
    _by_output: tuple[tuple[tuple[AxisPiece, ...], ...], ...] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        old, new = _chunk_lengths(self.old, "old"), _chunk_lengths(self.new, "new")
        object.__setattr__(self, "old", old)
        object.__setattr__(self, "new", new)
        if len(old) != len(new):
            raise ValueError(f"rechunk from {len(old)}-d chunks {old} to {len(new)}-d chunks {new}")
        for axis, (o, n) in enumerate(zip(old, new, strict=True)):
            if not o or not n:
                raise ValueError(f"axis {axis} has no chunks: old {o}, new {n}")
            if None in o or None in n:
                if o != n:
                    raise ValueError(
                        f"axis {axis} has unknown chunk sizes (NaN) and would change from "
                        f"{o} to {n}; compute them first (x.compute_chunk_sizes())"
                    )
                continue
            ko, kn = cast("tuple[int, ...]", o), cast("tuple[int, ...]", n)  # no None
            if any(c < 0 for c in (*ko, *kn)):
                raise ValueError(f"axis {axis}: chunk lengths must be >= 0: {o} -> {n}")
            if sum(ko) != sum(kn):
                raise ValueError(
                    f"axis {axis}: old chunks {o} sum to {sum(ko)}, new chunks {n} to {sum(kn)}"
                )
        by_input, by_output = [], []
        for o, n in zip(old, new, strict=True):
            pieces = _axis_pieces(o, n)
            by_input.append(_group(pieces, len(o), lambda p: p.input_chunk))
            by_output.append(_group(pieces, len(n), lambda p: p.output_chunk))
        object.__setattr__(self, "_by_input", tuple(by_input))
        object.__setattr__(self, "_by_output", tuple(by_output))

    def __reduce__(self) -> tuple[Any, ...]:
        # Ship the chunks only; the receiving process rebuilds the tables, once per
        # layout (every transfer task of a rechunk unpickles the same one).
        return (_unpickle, (self.old, self.new))

    @property
    def ndim(self) -> int:
        return len(self.old)

    @property
    def npartitions_in(self) -> int:
        return math.prod(len(axis) for axis in self.old)

    @property
    def npartitions_out(self) -> int:
        return math.prod(len(axis) for axis in self.new)

    def input_index(self, flat: int) -> NDIndex:
        return _unravel(flat, self.old, "input")

    def output_index(self, flat: int) -> NDIndex:
        return _unravel(flat, self.new, "output")

    def flat_input(self, index: Sequence[int]) -> int:
        return _ravel(index, self.old, "input")

    def flat_output(self, index: Sequence[int]) -> int:
        return _ravel(index, self.new, "output")

    def input_shape(self, flat: int) -> tuple[int | None, ...]:
        """The chunk's shape; ``None`` along axes of unknown length."""
        return tuple(axis[i] for axis, i in zip(self.old, self.input_index(flat), strict=True))

    def output_shape(self, flat: int) -> tuple[int | None, ...]:
        """The chunk's shape; ``None`` along axes of unknown length."""
        return tuple(axis[i] for axis, i in zip(self.new, self.output_index(flat), strict=True))

    def pieces_of_input(self, flat: int) -> Iterator[tuple[int, tuple[slice, ...]]]:
        """``(output chunk, slices of the input chunk)`` for every piece it contributes."""
        for combo in _combinations(self._by_input, self.input_index(flat)):
            yield (
                self.flat_output(tuple(p.output_chunk for p in combo)),
                tuple(p.in_slice for p in combo),
            )

    def pieces_of_output(self, flat: int) -> Iterator[tuple[int, tuple[slice, ...]]]:
        """``(input chunk, slices of the output chunk)`` for every piece it receives."""
        for source, _, out_slices in self.sources_of_output(flat):
            yield source, out_slices

    def sources_of_output(
        self, flat: int
    ) -> Iterator[tuple[int, tuple[slice, ...], tuple[slice, ...]]]:
        """``(input chunk, slices of it, slices of the output chunk)`` per piece."""
        for combo in _combinations(self._by_output, self.output_index(flat)):
            yield (
                self.flat_input(tuple(p.input_chunk for p in combo)),
                tuple(p.in_slice for p in combo),
                tuple(p.out_slice for p in combo),
            )

    def outputs_of_input(self, flat: int) -> int:
        """How many output chunks input chunk ``flat`` contributes to."""
        index = self.input_index(flat)
        return math.prod(len(self._by_input[axis][i]) for axis, i in enumerate(index))

    def inputs_of_output(self, flat: int) -> int:
        """How many pieces output chunk ``flat`` receives."""
        index = self.output_index(flat)
        return math.prod(len(self._by_output[axis][j]) for axis, j in enumerate(index))


def _combinations(
    by_chunk: tuple[tuple[tuple[AxisPiece, ...], ...], ...], index: NDIndex
) -> Iterator[tuple[AxisPiece, ...]]:
    """The pieces of the chunk at ``index``: every combination of one piece per axis."""
    return itertools.product(*(by_chunk[axis][i] for axis, i in enumerate(index)))


def is_rechunk(meta: object) -> TypeGuard[RechunkLayout]:
    """Whether a run's ``meta`` makes it an array rechunk (a ``RechunkLayout``) rather
    than a dataframe shuffle (whose meta is dask's empty frame)."""
    return isinstance(meta, RechunkLayout)


@functools.lru_cache(maxsize=16)
def _unpickle(old: Chunks, new: Chunks) -> RechunkLayout:
    """The layout of these chunks; immutable, so one instance serves every task."""
    return RechunkLayout(old, new)


def _group(
    pieces: Sequence[AxisPiece], n: int, chunk_of: Callable[[AxisPiece], int]
) -> tuple[tuple[AxisPiece, ...], ...]:
    """``pieces`` grouped by chunk number (``0 <= chunk_of(p) < n``), order kept.

    One pass, not one per chunk: k chunks merged into one (or split from one) make k
    pieces, and k x k comparisons took seconds per layout at k = 10,000.
    """
    groups: list[list[AxisPiece]] = [[] for _ in range(n)]
    for p in pieces:
        groups[chunk_of(p)].append(p)
    return tuple(map(tuple, groups))


def _chunk_lengths(chunks: Any, what: str) -> Chunks:
    """``chunks`` as integers, NaN (dask's unknown length) or ``None`` as ``None``."""
    try:
        return tuple(tuple(_length(c) for c in axis) for axis in chunks)
    except TypeError:
        raise ValueError(f"{what} chunks {chunks} are not integers or NaN") from None


def _length(c: Any) -> int | None:
    if c is None or (isinstance(c, float) and math.isnan(c)):
        return None
    return operator.index(c)


def _unravel(flat: int, chunks: Chunks, what: str) -> NDIndex:
    sizes = [len(axis) for axis in chunks]
    if not 0 <= flat < math.prod(sizes):
        raise ValueError(f"{what} chunk {flat} is out of range for a grid of {sizes} chunks")
    out = []
    for size in reversed(sizes):
        flat, i = divmod(flat, size)
        out.append(i)
    return tuple(reversed(out))


def _ravel(index: Sequence[int], chunks: Chunks, what: str) -> int:
    sizes = [len(axis) for axis in chunks]
    if len(index) != len(sizes) or not all(0 <= i < n for i, n in zip(index, sizes, strict=True)):
        raise ValueError(f"{what} chunk index {tuple(index)} is not in a grid of {sizes} chunks")
    flat = 0
    for i, size in zip(index, sizes, strict=True):
        flat = flat * size + int(i)
    return flat
