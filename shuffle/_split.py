"""The sending side's splitting: one input into pieces, grouped by owning participant.

A dataframe partition is cut by dask's partition column into Arrow record-batch
pieces (``shuffle.wire._arrow``), or for a cuDF frame into device pieces split on
the GPU; an array chunk is cut by the output chunks of a rechunk
(``shuffle._rechunk``) into array pieces (``shuffle.wire._ndarray``). Pieces of
joined inputs (``shuffle._combine``) carry the inputs they cover in their meta.
Pure: runs in the sender's thread, no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pandas as pd

from shuffle._combine import joined_meta
from shuffle._ids import ShardKey
from shuffle._partition import group_by_owner, sort_by_partition
from shuffle._rechunk import RechunkLayout, is_rechunk
from shuffle._spec import ShuffleRunSpec
from shuffle.device._cudf import is_cudf_frame, split_cudf
from shuffle.wire._arrow import encode_slices
from shuffle.wire._message import Piece, payload_nbytes
from shuffle.wire._ndarray import encode_piece

__all__ = [
    "Shards",
    "check_frame",
    "check_input",
    "check_input_partition",
    "shard_frame",
    "split_chunk",
    "split_input",
]

#: ``{owner: [(ShardKey, payload)]}``; payloads are Arrow IPC buffers or ``Piece``s.
Shards = dict[str, list[tuple[ShardKey, Any]]]

_MAX_PARTITION = (1 << 32) - 1  # the wire header stores partitions as u32


def split_input(
    data: Any,
    *,
    spec: ShuffleRunSpec,
    meta: Any,
    input_partition: int,
    checked: bool = False,
    covers: Sequence[int] = (),
) -> Shards:
    """Input partition ``input_partition`` as ``{owner: [(ShardKey, payload)]}``.

    Payloads are Arrow record-batch ``Piece``s (dataframe shuffles) or array
    ``Piece``s (rechunks). CPU work (sort, gather, encoding) runs in the calling
    thread, not on the loop. ``checked``: the caller already validated the input
    (``check_input``). ``covers``: the inputs joined into ``data`` (``_combine``),
    named by the first, ``input_partition``; their pieces' metas say so. ``meta``: the
    run's ``RechunkLayout``, or dask's empty frame of a dataframe shuffle.
    """
    if is_rechunk(meta):
        check_input_partition(input_partition, where=_where(spec))
        by_owner = split_chunk(data, meta, input_partition, owner_of=spec.owner_of)
    else:
        if not checked:
            check_input(data, spec=spec, meta=meta, input_partition=input_partition)
        by_owner = shard_frame(data, spec)
        if len(covers) > 1:
            by_owner = _mark_joined(by_owner, covers)
    return {
        owner: [(ShardKey(p, input_partition), payload) for p, payload in items]
        for owner, items in by_owner.items()
    }


def _mark_joined(
    by_owner: dict[str, list[tuple[int, Any]]], covers: Sequence[int]
) -> dict[str, list[tuple[int, Any]]]:
    metas: dict[bytes, bytes] = {}  # one joined meta per own meta: messages carry it once

    def mark(payload: Any) -> Piece:
        data, meta, nbytes = (
            (payload.data, payload.meta, payload.nbytes)
            if isinstance(payload, Piece)
            else (payload, b"", payload_nbytes(payload))  # an IPC stream: no meta
        )
        joined = metas.get(meta)
        if joined is None:
            joined = metas[meta] = joined_meta(covers, meta)
        return Piece(data, joined, nbytes)

    return {owner: [(p, mark(x)) for p, x in items] for owner, items in by_owner.items()}


def check_input(df: Any, *, spec: ShuffleRunSpec, meta: Any, input_partition: int) -> None:
    """What every dataframe input partition must be before it is split."""
    where = _where(spec)
    check_input_partition(input_partition, where=where)
    check_frame(df, meta, input_partition, where=where)


def _where(spec: ShuffleRunSpec) -> str:
    return f"shuffle {spec.shuffle_id!r} run {spec.run_id}"


def check_frame(df: Any, meta: Any, input_partition: int, *, where: str) -> None:
    """A dataframe input partition must be a pandas or cuDF frame with meta's columns."""
    if not isinstance(df, pd.DataFrame) and not is_cudf_frame(df):
        raise TypeError(f"{where}: expected a pandas or cuDF DataFrame, got {type(df).__name__}")
    if len(df.columns) != len(meta.columns) or set(df.columns) != set(meta.columns):
        raise ValueError(
            f"{where}: input partition {input_partition} has columns "
            f"{list(df.columns)!r}, meta has {list(meta.columns)!r}"
        )


def shard_frame(df: Any, spec: ShuffleRunSpec) -> dict[str, list[tuple[int, Any]]]:
    """A dataframe partition as ``{owner: [(output partition, payload)]}``.

    Payloads are Arrow record-batch ``Piece``s sharing one schema
    (``shuffle.wire._arrow``), or for a cuDF frame device ``Piece``s split on the GPU;
    only the partitions in ``spec.needed`` (if set) are made.
    """
    column, npartitions, drop, keep = (
        spec.column,
        spec.npartitions_out,
        spec.drop_column,
        spec.needed,
    )
    shards: dict[int, Any]
    if is_cudf_frame(df):
        shards = split_cudf(df, column=column, npartitions=npartitions, drop_column=drop, keep=keep)
    else:
        table, bounds = sort_by_partition(
            df, column=column, npartitions=npartitions, drop_column=drop, keep=keep
        )
        shards = encode_slices(table, bounds)
    return group_by_owner(shards, owner_of=spec.owner_of)


def check_input_partition(input_partition: Any, *, where: str) -> None:
    """Input partitions travel as u32 in the wire header."""
    if (
        isinstance(input_partition, bool)
        or not isinstance(input_partition, int)
        or not 0 <= input_partition <= _MAX_PARTITION
    ):
        raise ValueError(
            f"{where}: input partition must be an int in [0, 2**32), got {input_partition!r}"
        )


def split_chunk(
    array: Any, layout: RechunkLayout, input_partition: int, *, owner_of: Callable[[int], str]
) -> dict[str, list[tuple[int, Piece]]]:
    """Input chunk ``input_partition`` as ``{owner: [(output chunk, Piece)]}``."""
    shape = layout.input_shape(input_partition)
    got = tuple(getattr(array, "shape", ()))
    if len(got) != len(shape) or any(
        e is not None and e != g for e, g in zip(shape, got, strict=True)
    ):
        raise ValueError(
            f"input chunk {layout.input_index(input_partition)} has shape "
            f"{getattr(array, 'shape', None)}, the rechunk expects {shape}"
        )
    out: dict[str, list[tuple[int, Piece]]] = {}
    for partition, slices in layout.pieces_of_input(input_partition):
        out.setdefault(owner_of(partition), []).append((partition, encode_piece(array[slices])))
    return out
