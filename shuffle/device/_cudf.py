"""cuDF partitions in a dataframe shuffle: split on the GPU, pieces stay device memory.

The host path (``_partition``) turns pandas frames into Arrow IPC shards. A cuDF frame
instead is scattered by dask's partition column on the GPU (``scatter_by_map``), each
piece is packed into one device buffer (``_device_codec.encode_cudf``) and travels as
a ``Piece`` whose meta (host bytes, in the message header) rebuilds it; the receiver
concatenates the pieces of an output partition in input order with ``cudf.concat``.
Nothing here imports cuDF until a cuDF frame is met, so CPU-only processes never load
CUDA libraries.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from shuffle.wire._message import Piece

__all__ = ["CUDF_TAG", "concat_cudf", "is_cudf_frame", "split_cudf"]

#: Leads the meta of a cuDF piece; Arrow IPC shards carry no meta at all.
CUDF_TAG = b"cudf\0"


def is_cudf_frame(obj: Any) -> bool:
    """Whether ``obj`` is a ``cudf.DataFrame`` (without importing cuDF)."""
    cudf = sys.modules.get("cudf")
    return cudf is not None and isinstance(obj, cudf.DataFrame)


def split_cudf(
    df: Any,
    *,
    column: str,
    npartitions: int,
    drop_column: bool,
    keep: Sequence[int] | None = None,
) -> dict[int, Piece]:
    """``{output partition: Piece}`` for the rows of ``df``, by its integer ``column``.

    Rows keep their input order inside each piece. Values outside
    ``[0, npartitions)`` are refused, as on the host path; with ``keep``, only those
    partitions' pieces are made.
    """
    from shuffle.device._codec import encode_cudf

    if column not in df.columns:
        raise KeyError(f"partition column {column!r} is missing; columns are {list(df.columns)}")
    codes = df[column]
    if codes.dtype.kind not in "iu":
        raise TypeError(f"partition column {column!r} must hold integers, got {codes.dtype}")
    if len(df):
        if codes.isnull().any():
            raise ValueError(f"partition column {column!r} holds missing values")
        low, high = int(codes.min()), int(codes.max())
        if low < 0 or high >= npartitions:
            raise ValueError(
                f"partition column {column!r} must lie at or above 0 and below {npartitions}; "
                f"found values in [{low}, {high}]"
            )
    else:
        return {}
    parts = df.scatter_by_map(column, map_size=npartitions, keep_index=True)
    out = {}
    wanted = None if keep is None else set(keep)
    for partition, part in enumerate(parts):
        if not len(part) or (wanted is not None and partition not in wanted):
            continue
        if drop_column:
            part = part.drop(columns=[column])
        meta, buffer = encode_cudf(part)
        out[partition] = Piece(buffer, CUDF_TAG + meta, int(buffer.nbytes))
    return out


def concat_cudf(pieces: Sequence[tuple[bytes, Any]], *, meta: Any) -> Any:
    """One output partition from its ``(meta, device buffer)`` pieces, in input order."""
    from shuffle.device._codec import decode_cudf

    frames = []
    for tag_and_meta, buffer in pieces:
        if not tag_and_meta.startswith(CUDF_TAG):
            raise ValueError(f"expected a cuDF piece, got meta {bytes(tag_and_meta[:8])!r}")
        frames.append(decode_cudf(tag_and_meta[len(CUDF_TAG) :], buffer))
    if not frames:
        return meta.iloc[:0].copy()
    cudf = sys.modules["cudf"]
    out = cudf.concat(frames) if len(frames) > 1 else frames[0]
    return out[list(meta.columns)]
