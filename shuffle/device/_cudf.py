"""cuDF partitions in a dataframe shuffle: split on the GPU, pieces stay device memory.

The host path (``_partition``) turns pandas frames into Arrow IPC shards. A cuDF frame
instead is scattered by dask's partition column on the GPU (``scatter_by_map``), each
piece is packed into one device buffer (``encode_cudf``) and travels as a ``Piece``
whose meta (host bytes, in the message header) rebuilds it; the receiver decodes
(``decode_cudf``) and concatenates the pieces of an output partition in input order
with ``cudf.concat``. Nothing here imports cuDF until a cuDF frame is met, so CPU-only
processes never load CUDA libraries.

A piece's meta is ``CUDF_TAG`` + ``pack_meta``'s blob; nothing unpickles::

    magic "RDC1" | len(json) u32 LE | json utf-8 | tail

The JSON keeps what ``pylibcudf.contiguous_split.pack`` drops: column labels, the
index (a RangeIndex as numbers, other indexes as leading columns) and the dtypes;
the tail is pack's own metadata.
"""

from __future__ import annotations

import json
import struct
import sys
from collections.abc import Sequence
from typing import Any

from shuffle._exceptions import FrameError
from shuffle.device._cai import is_device_object
from shuffle.device._cuda import import_cupy
from shuffle.device._options import DeviceUnavailableError
from shuffle.wire._message import Piece

__all__ = [
    "CUDF_TAG",
    "concat_cudf",
    "decode_cudf",
    "encode_cudf",
    "is_cudf_frame",
    "pack_meta",
    "split_cudf",
    "unpack_meta",
]

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


# --------------------------------------------------------------------------- meta

META_MAGIC = b"RDC1"
_PREFIX = struct.Struct("<4sI")
#: Bound on the JSON part of a meta: a corrupt length cannot make us parse megabytes.
MAX_JSON_BYTES = 1 << 20


# --------------------------------------------------------------------------- meta


def pack_meta(info: dict[str, Any], tail: bytes | memoryview = b"") -> bytes:
    """``info`` as JSON (no NaN, no pickle) followed by an opaque binary ``tail``."""
    text = json.dumps(info, separators=(",", ":"), allow_nan=False).encode()
    if len(text) > MAX_JSON_BYTES:
        raise ValueError(f"payload meta of {len(text)} bytes exceeds {MAX_JSON_BYTES}")
    return _PREFIX.pack(META_MAGIC, len(text)) + text + bytes(tail)


def unpack_meta(meta: Any) -> tuple[dict[str, Any], memoryview]:
    """Parse ``pack_meta``'s output; every defect raises ``FrameError``."""
    try:
        view = memoryview(meta).cast("B")
    except (TypeError, ValueError) as e:
        raise FrameError(f"payload meta is not a byte buffer ({e})") from None
    if len(view) < _PREFIX.size:
        raise FrameError(f"payload meta is truncated: {len(view)} bytes")
    magic, length = _PREFIX.unpack_from(view)
    if magic != META_MAGIC:
        raise FrameError(f"payload meta has magic {bytes(magic)!r}, expected {META_MAGIC!r}")
    end = _PREFIX.size + length
    if length > MAX_JSON_BYTES or end > len(view):
        raise FrameError(f"payload meta announces {length} JSON bytes, holds {len(view)} in all")
    try:
        info = json.loads(str(view[_PREFIX.size : end], "utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise FrameError(f"payload meta is not valid JSON ({e})") from None
    if not isinstance(info, dict) or not isinstance(info.get("codec"), str):
        raise FrameError(f"payload meta names no codec: {info!r}")
    return info, view[end:]


# --------------------------------------------------------------------------- codec


def _import_cudf() -> tuple[Any, Any]:
    try:
        import cudf
        import pylibcudf
    except Exception as e:  # noqa: BLE001 -- as for CuPy
        raise DeviceUnavailableError(
            f"received a cuDF partition, but cuDF cannot be imported here ({e!r})"
        ) from None
    return cudf, pylibcudf


def _label(value: Any, what: str) -> Any:
    # JSON keeps these exactly; anything else (tuples, floats, timestamps) it would not.
    if (
        value is None
        or isinstance(value, str)
        or (isinstance(value, int) and not isinstance(value, bool))
    ):
        return value
    raise TypeError(
        f"cannot send a cuDF frame whose {what} is {value!r} ({type(value).__name__}): "
        "labels must be str, int or None"
    )


def _frame_info(df: Any) -> tuple[dict[str, Any], Any]:
    """JSON info for ``df`` and the frame to pack (the index as leading columns)."""
    columns = [_label(c, "column label") for c in df.columns]
    if len(set(columns)) != len(columns):
        raise TypeError(f"cannot send a cuDF frame with duplicate column labels {columns}")
    dtypes = [str(t) for t in df.dtypes]
    for label, dtype in zip(columns, dtypes, strict=True):
        if dtype == "category":
            raise TypeError(
                f"cannot send cuDF column {label!r}: categorical columns are not packed "
                "with their categories; cast them (e.g. .astype('str')) or send host frames"
            )
    index = df.index
    info: dict[str, Any] = {
        "codec": "cudf",
        "columns": columns,
        "columns_name": _label(df.columns.name, "columns name"),
        "dtypes": dtypes,
    }
    cudf = sys.modules["cudf"]
    if isinstance(index, cudf.RangeIndex):
        info["index"] = {
            "kind": "range",
            "start": int(index.start),
            "stop": int(index.stop),
            "step": int(index.step),
            "name": _label(index.name, "index name"),
        }
        return info, df
    names = [_label(n, "index name") for n in index.names]
    slots = [f"__index_level_{i}__" for i in range(len(names))]
    if set(slots) & set(columns):
        raise TypeError(f"cannot send a cuDF frame with columns named like {slots}")
    frame = df.copy(deep=False)
    frame.index = index.set_names(slots)  # a new index: the caller's keeps its names
    info["index"] = {"kind": "columns", "names": names, "slots": slots}
    return info, frame.reset_index()


def encode_cudf(df: Any) -> tuple[bytes, Any]:
    """A ``cudf.DataFrame`` as (meta, one contiguous device buffer).

    ``contiguous_split.pack`` copies every column (and the index) into one device
    allocation; its metadata (host bytes, a few per column) becomes the meta's tail.
    """
    if not is_cudf_frame(df):
        raise TypeError(f"expected a cudf.DataFrame, got {type(df).__name__}")
    _, plc = _import_cudf()
    info, frame = _frame_info(df)
    table, _ = frame.to_pylibcudf()
    if table.num_columns() != len(frame.columns):  # the decoder relies on this layout
        raise RuntimeError(
            f"cudf {getattr(sys.modules['cudf'], '__version__', '?')}: to_pylibcudf gave "
            f"{table.num_columns()} columns for a frame of {len(frame.columns)}; this cuDF "
            "version is not supported by the device codec"
        )
    packed_meta, gpu_data = plc.contiguous_split.pack(table).release()
    cupy = sys.modules.get("cupy") or import_cupy()
    cupy.cuda.runtime.deviceSynchronize()  # pack ran on cuDF's stream; finish before send
    return pack_meta(info, memoryview(packed_meta)), gpu_data


def decode_cudf(meta: Any, buf: Any) -> Any:
    """The ``cudf.DataFrame`` of ``encode_cudf`` (a copy of ``buf``, as unpack makes)."""
    info, tail = unpack_meta(meta)
    if info["codec"] != "cudf":
        raise FrameError(f"expected cudf payload meta, got codec {info['codec']!r}")
    columns, index, dtypes = info.get("columns"), info.get("index"), info.get("dtypes")
    if (
        not isinstance(columns, list)
        or not isinstance(dtypes, list)
        or len(dtypes) != len(columns)
        or not isinstance(index, dict)
        or index.get("kind") not in ("range", "columns")
    ):
        raise FrameError(f"cudf payload meta is malformed: {info!r}")
    if not is_device_object(buf):
        raise FrameError(f"a cuDF partition needs a device buffer, got {type(buf).__name__}")
    cudf, plc = _import_cudf()
    slots = index["slots"] if index["kind"] == "columns" else []
    table = plc.contiguous_split.unpack_from_memoryviews(tail, plc.gpumemoryview(buf))
    if table.num_columns() != len(slots) + len(columns):
        raise FrameError(
            f"cudf payload holds {table.num_columns()} columns, its meta names "
            f"{len(slots) + len(columns)}"
        )
    df = cudf.DataFrame.from_pylibcudf(table, metadata={"columns": [*slots, *columns]})
    if index["kind"] == "range":
        df.index = cudf.RangeIndex(index["start"], index["stop"], index["step"], name=index["name"])
    else:
        df = df.set_index(slots)
        df.index = df.index.set_names(index["names"])
    for label, dtype in zip(columns, dtypes, strict=True):
        if str(df[label].dtype) != dtype:  # e.g. libcudf widens day timestamps
            df[label] = df[label].astype(dtype)
    if info.get("columns_name") is not None:
        # cuDF's ``columns`` is a fresh pandas Index per access: assign, do not mutate.
        df.columns = df.columns.rename(info["columns_name"])
    return df
