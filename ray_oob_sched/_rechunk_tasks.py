"""Small p2p rechunks as plain tasks: the choice (pure) and the gather function.

dask plans a p2p rechunk as "partials", each an all-to-all exchange between its
input and output chunks. Through the shuffle actors every piece is cut by a
transfer task, sent, stored, assembled by the owning actor and returned as an
object: four copies and an actor round trip, which pays off for many small pieces
(one message carries many) and loses for a few large ones, where Ray's own object
store already moves whole chunks cheaply. A partial whose plan is small runs as
one *gather task* per output chunk instead: it takes the input chunks it overlaps
as arguments (on one node Ray hands them over without a copy) and copies their
slices into the output chunk, which is what dask's "tasks" method does, without
its intermediate objects per piece.

The rule (``rechunk_as_tasks``), from the partial's plan:

- ``max_pieces`` (``shuffle.rechunk-tasks-max-pieces``): at most this many pieces
  (input-chunk x output-chunk overlaps) in the partial; each is one argument of a
  gather task, and Ray's per-argument cost grows with their number. 0: never.
- on more than one node, only if no input chunk feeds more than one output chunk:
  a gather task fetches whole input chunks, so an input read by several outputs
  would cross the network several times, where the shuffle moves each byte once.

Bytes do not enter on one node: there a gather task reads its inputs in place.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from shuffle._rechunk import RechunkLayout

__all__ = ["gather_chunk", "gather_inputs", "plan_pieces", "rechunk_as_tasks"]


def plan_pieces(layout: RechunkLayout, *, limit: int) -> int:
    """Pieces in ``layout``'s plan, counted up to just past ``limit``."""
    pieces = 0
    for j in range(layout.npartitions_out):
        pieces += layout.inputs_of_output(j)
        if pieces > limit:
            break
    return pieces


def rechunk_as_tasks(layout: RechunkLayout, *, nodes: int, max_pieces: int) -> bool:
    """Whether the partial ``layout`` runs as gather tasks (module docstring)."""
    if nodes < 1:
        raise ValueError(f"nodes must be >= 1, got {nodes!r}")
    if max_pieces <= 0 or layout.npartitions_out > max_pieces:
        return False
    if plan_pieces(layout, limit=max_pieces) > max_pieces:
        return False
    if nodes > 1:
        return all(layout.outputs_of_input(i) <= 1 for i in range(layout.npartitions_in))
    return True


def gather_inputs(layout: RechunkLayout, partition: int) -> list[int]:
    """The input chunks output chunk ``partition`` reads, in ``gather_chunk``'s order."""
    return [i for i, _, _ in layout.sources_of_output(partition)]


#: How one input chunk reaches a gather task: None, as one array; a grid shape,
#: as the tiles that dask's p2p graph would first concatenate into it
#: (``concatenate_shaped``), given flat in row-major order.
Grid = tuple[int, ...] | None


def gather_chunk(layout: RechunkLayout, partition: int, grids: Sequence[Grid], *chunks: Any) -> Any:
    """Output chunk ``partition`` from its input chunks, given in ``gather_inputs``
    order, each as one array or as its tiles (``grids``)."""
    sources = list(layout.sources_of_output(partition))
    needed = sum(1 if g is None else math.prod(g) for g in grids)
    if len(grids) != len(sources) or len(chunks) != needed:
        raise ValueError(
            f"rechunk output chunk {layout.output_index(partition)} reads "
            f"{len(sources)} input chunks, got {len(grids)} and {len(chunks)} arrays "
            f"(their grids need {needed})"
        )
    inputs: list[Any] = []
    at = 0
    for grid in grids:
        n = 1 if grid is None else math.prod(grid)
        inputs.append(chunks[at] if grid is None else _Tiles(grid, chunks[at : at + n]))
        at += n
    if all(g is None for g in grids):
        first = inputs[0][sources[0][1]]
        # Along an axis of unknown length every piece is a whole input chunk (_rechunk).
        shape = tuple(
            first.shape[axis] if n is None else n
            for axis, n in enumerate(layout.output_shape(partition))
        )
        if len(sources) == 1 and tuple(first.shape) == shape:
            return first  # one input covers the chunk: no copy
    else:  # tiles are only planned where every length is known (_p2p)
        shape = tuple(int(n) for n in layout.output_shape(partition))  # type: ignore[arg-type]
    # empty_like keeps the array library (NumPy or CuPy) of the inputs.
    out = np.empty_like(chunks[0], shape=shape)
    for (_, in_slices, out_slices), chunk in zip(sources, inputs, strict=True):
        if isinstance(chunk, _Tiles):
            chunk.copy_into(out, in_slices, out_slices)
        else:
            out[out_slices] = chunk[in_slices]
    return out


class _Tiles:
    """An input chunk as its tiles: slices of it are copied from the tiles they
    overlap, without concatenating the tiles first."""

    def __init__(self, grid: tuple[int, ...], tiles: Sequence[Any]) -> None:
        flat = np.empty(len(tiles), dtype=object)
        for i, tile in enumerate(tiles):  # one by one: numpy would stack equal shapes
            flat[i] = tile
        self.tiles = flat.reshape(grid)
        ndim = len(grid)
        # Each axis's tile offsets, from the tiles along that axis (dask's concatenate3).
        self.bounds = [
            np.cumsum(
                [0]
                + [
                    self.tiles[(0,) * axis + (i,) + (0,) * (ndim - axis - 1)].shape[axis]
                    for i in range(grid[axis])
                ]
            )
            for axis in range(ndim)
        ]

    def copy_into(
        self, out: Any, in_slices: tuple[slice, ...], out_slices: tuple[slice, ...]
    ) -> None:
        """``out[out_slices] = concatenated[in_slices]``, tile by tile."""
        per_axis = []
        for axis, (src, dst) in enumerate(zip(in_slices, out_slices, strict=True)):
            bounds = self.bounds[axis]
            start, stop, _ = src.indices(int(bounds[-1]))
            first = int(np.searchsorted(bounds, start, side="right")) - 1
            parts = []
            for i in range(first, len(bounds) - 1):
                if bounds[i] >= stop:
                    break
                lo, hi = max(start, int(bounds[i])), min(stop, int(bounds[i + 1]))
                if lo >= hi:
                    continue  # an empty tile
                base = (dst.start or 0) - start
                parts.append(
                    (
                        i,
                        slice(lo - int(bounds[i]), hi - int(bounds[i])),
                        slice(lo + base, hi + base),
                    )
                )
            per_axis.append(parts)
        for combo in itertools.product(*per_axis):
            tile = self.tiles[tuple(i for i, _, _ in combo)]
            out[tuple(d for _, _, d in combo)] = tile[tuple(t for _, t, _ in combo)]
