"""Payload codecs for array and GPU partitions: object <-> (meta bytes, one buffer).

A shard travels as a small host ``meta`` (in its header entry) plus one buffer frame
of the buffer's own memory type, so device data goes device-to-device and only the
meta is host bytes. Nothing here unpickles: meta is a length-prefixed JSON object,
optionally followed by a binary tail (cuDF's packed column metadata)::

    magic "RDC1" | len(json) u32 LE | json utf-8 | tail

Codecs:

``ndarray``  NumPy (host) and CuPy (device) arrays share one meta: dtype as NumPy's
             ``.npy`` descr (structured dtypes included) and shape. The decoder is
             picked by the buffer's memory type, so the dispatch is the same for both.
             Object dtypes are refused (they hold pointers, not bytes).
``cudf``     a ``cudf.DataFrame``, packed with ``pylibcudf.contiguous_split.pack`` into
             one device buffer; the JSON keeps what pack drops: column labels, the
             index (a RangeIndex as numbers, other indexes as leading columns) and the
             dtypes.

Importing this module imports neither CuPy nor cuDF: a device object is recognised by
looking its library up in ``sys.modules`` (if the object exists, its library is
loaded), and decoders import theirs on first use.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from shuffle._exceptions import FrameError
from shuffle.device._cuda import cai_nbytes, is_device_object
from shuffle.device._options import DeviceUnavailableError
from shuffle.wire._memory import MemoryType
from shuffle.wire._ndarray import dtype_from_json, dtype_to_json

__all__ = [
    "CODECS",
    "META_MAGIC",
    "Codec",
    "EncodedPayload",
    "decode_cudf",
    "decode_cupy",
    "decode_numpy",
    "decode_payload",
    "encode_cudf",
    "encode_cupy",
    "encode_numpy",
    "encode_payload",
    "pack_meta",
    "to_host",
    "unpack_meta",
]

META_MAGIC = b"RDC1"
_PREFIX = struct.Struct("<4sI")
#: Bound on the JSON part of a meta: a corrupt length cannot make us parse megabytes.
MAX_JSON_BYTES = 1 << 20
_MAX_NDIM = 64  # NumPy's own limit
#: What CuPy arrays can hold (no structured, string, datetime or object dtypes).
_CUPY_KINDS = "biufc"


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


# --------------------------------------------------------------------------- arrays


def _dtype_descr(dtype: np.dtype[Any], what: str) -> Any:
    try:
        return dtype_to_json(dtype)  # the same description as host array pieces
    except TypeError as e:
        raise TypeError(f"cannot send {what}: {e}") from None


def _array_info(arr: Any, what: str) -> dict[str, Any]:
    return {
        "codec": "ndarray",
        "dtype": _dtype_descr(np.dtype(arr.dtype), what),
        "shape": [int(n) for n in arr.shape],
    }


def _parse_array_info(info: dict[str, Any]) -> tuple[np.dtype[Any], tuple[int, ...], int]:
    shape = info.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) > _MAX_NDIM
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
    ):
        raise FrameError(f"array meta has an invalid shape {shape!r}")
    try:
        dtype = dtype_from_json(info.get("dtype"))
    except ValueError as e:
        raise FrameError(f"array meta has an invalid dtype ({e})") from None
    return dtype, tuple(shape), dtype.itemsize * math.prod(shape)


def encode_numpy(arr: np.ndarray[Any, Any]) -> tuple[bytes, memoryview]:
    """A NumPy array as (meta, flat byte view); copies only if not C-contiguous."""
    if not isinstance(arr, np.ndarray):
        raise TypeError(f"expected a numpy.ndarray, got {type(arr).__name__}")
    info = _array_info(arr, "a numpy array")
    arr = np.ascontiguousarray(arr)
    return pack_meta(info), memoryview(arr.reshape(-1).view(np.uint8))


def decode_numpy(meta: Any, buf: Any) -> np.ndarray[Any, Any]:
    """The array of ``encode_numpy``; it aliases ``buf`` (read-only if ``buf`` is)."""
    dtype, shape, nbytes = _parse_array_info(_expect(meta, "ndarray"))
    raw = np.frombuffer(buf, dtype=np.uint8) if nbytes else np.empty(0, np.uint8)
    _check_size(raw.nbytes, nbytes)
    return raw.view(dtype).reshape(shape)


def _import_cupy() -> Any:
    try:
        import cupy
    except Exception as e:  # noqa: BLE001 -- ImportError, or CUDA libraries failing to load
        raise DeviceUnavailableError(
            f"received a CuPy array, but CuPy cannot be imported here ({e!r})"
        ) from None
    return cupy


def _is_cupy(obj: Any) -> bool:
    cupy = sys.modules.get("cupy")
    return cupy is not None and isinstance(obj, cupy.ndarray)


def encode_cupy(arr: Any) -> tuple[bytes, Any]:
    """A CuPy array as (meta, contiguous device array); copies only if strided.

    Waits for the current stream, so the bytes are complete before a transport
    (on its own streams) reads them.
    """
    if not _is_cupy(arr):
        raise TypeError(f"expected a cupy.ndarray, got {type(arr).__name__}")
    dtype = np.dtype(arr.dtype)
    if dtype.kind not in _CUPY_KINDS:
        raise TypeError(f"cannot send a cupy array of dtype {dtype}: CuPy holds numbers only")
    info = _array_info(arr, "a cupy array")
    cupy = sys.modules["cupy"]
    arr = cupy.ascontiguousarray(arr)
    cupy.cuda.get_current_stream().synchronize()
    return pack_meta(info), arr


def decode_cupy(meta: Any, buf: Any) -> Any:
    """The CuPy array of ``encode_cupy``, aliasing the device buffer ``buf``."""
    dtype, shape, nbytes = _parse_array_info(_expect(meta, "ndarray"))
    if dtype.kind not in _CUPY_KINDS:
        raise FrameError(f"array meta announces dtype {dtype}, which CuPy cannot hold")
    if not is_device_object(buf):
        raise FrameError(f"a CuPy array needs a device buffer, got {type(buf).__name__}")
    _check_size(cai_nbytes(buf.__cuda_array_interface__), nbytes)
    cupy = _import_cupy()
    if not nbytes:
        return cupy.empty(shape, dtype=dtype)
    # asarray on a CAI object is a view that keeps ``buf`` alive.
    return cupy.asarray(buf).view(cupy.uint8).reshape(-1).view(dtype).reshape(shape)


# --------------------------------------------------------------------------- cuDF


def _import_cudf() -> tuple[Any, Any]:
    try:
        import cudf
        import pylibcudf
    except Exception as e:  # noqa: BLE001 -- as for CuPy
        raise DeviceUnavailableError(
            f"received a cuDF partition, but cuDF cannot be imported here ({e!r})"
        ) from None
    return cudf, pylibcudf


def _is_cudf(obj: Any) -> bool:
    cudf = sys.modules.get("cudf")
    return cudf is not None and isinstance(obj, cudf.DataFrame)


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
    if not _is_cudf(df):
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
    cupy = sys.modules.get("cupy") or _import_cupy()
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


# --------------------------------------------------------------------------- dispatch


@dataclasses.dataclass(frozen=True)
class Codec:
    """One payload kind: how to recognise, encode and decode it."""

    name: str  # the meta's "codec"
    memory_type: MemoryType  # of the buffer it produces and decodes from
    owns: Callable[[Any], bool]
    encode: Callable[[Any], tuple[bytes, Any]]
    decode: Callable[[Any, Any], Any]


@dataclasses.dataclass(frozen=True)
class EncodedPayload:
    """What one shard becomes: its codec, the header entry's meta and its buffer."""

    codec: str
    memory_type: MemoryType
    meta: bytes
    buffer: Any


#: Device codecs first: a device object may also be host-viewable.
CODECS: tuple[Codec, ...] = (
    Codec("cudf", MemoryType.CUDA, _is_cudf, encode_cudf, decode_cudf),
    Codec("ndarray", MemoryType.CUDA, _is_cupy, encode_cupy, decode_cupy),
    Codec(
        "ndarray",
        MemoryType.HOST,
        lambda obj: isinstance(obj, np.ndarray),
        encode_numpy,
        decode_numpy,
    ),
)


def encode_payload(obj: Any, codecs: Sequence[Codec] = CODECS) -> EncodedPayload:
    """Encode ``obj`` with the first codec that owns it."""
    for codec in codecs:
        if codec.owns(obj):
            meta, buffer = codec.encode(obj)
            return EncodedPayload(codec.name, codec.memory_type, meta, buffer)
    names = sorted({f"{c.name} ({MemoryType(c.memory_type).value})" for c in codecs})
    raise TypeError(f"no payload codec for a {type(obj).__name__}; codecs: {', '.join(names)}")


def decode_payload(
    meta: Any, buffer: Any, *, memory_type: MemoryType | str, codecs: Sequence[Codec] = CODECS
) -> Any:
    """Rebuild a payload from its meta and the buffer it arrived in.

    The codec is named by the meta, the variant by ``memory_type``: an ``ndarray``
    meta with a host buffer gives NumPy, with a device buffer CuPy.
    """
    info, _ = unpack_meta(meta)
    memory_type = MemoryType(memory_type)
    for codec in codecs:
        if codec.name == info["codec"] and MemoryType(codec.memory_type) is memory_type:
            return codec.decode(meta, buffer)
    raise FrameError(f"no payload codec {info['codec']!r} for {memory_type.value} memory")


def to_host(obj: Any) -> Any:
    """A host copy of a device partition (CuPy -> NumPy, cuDF -> pandas); else ``obj``."""
    if _is_cupy(obj):
        return sys.modules["cupy"].asnumpy(obj)
    if _is_cudf(obj):
        return obj.to_pandas()
    return obj


def _expect(meta: Any, codec: str) -> dict[str, Any]:
    info, tail = unpack_meta(meta)
    if info["codec"] != codec:
        raise FrameError(f"expected {codec} payload meta, got codec {info['codec']!r}")
    if len(tail):
        raise FrameError(f"{codec} payload meta has {len(tail)} unexpected trailing bytes")
    return info


def _check_size(got: int, expected: int) -> None:
    if got != expected:
        raise FrameError(f"payload buffer holds {got} bytes, its meta describes {expected}")
