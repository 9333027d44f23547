"""Array pieces on the wire: raw memory plus a small JSON description, never pickle.

A piece of an array chunk travels as its C-contiguous bytes (one frame, host or
device memory) and a ``meta`` blob in the message header: the array kind, dtype and
shape. Decoding aliases the received buffer. ``meta`` starts with the kind tag
(``b"numpy\\0"``, ``b"cupy\\0"``), so a receiver picks the codec without guessing.

dtypes are described with ``numpy.lib.format``'s descriptors (what ``.npy`` files
use), which cover structured and sub-array dtypes; object dtypes are refused, since
their bytes are pointers into the sender's memory. Device arrays (CuPy) are handled
by ``shuffle.device._codec``, imported only when such an array is met.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np

from shuffle.wire._message import Piece

__all__ = ["decode_piece", "dtype_from_json", "dtype_to_json", "encode_piece"]

_NUMPY = b"numpy\0"
_CUPY = b"cupy\0"


def encode_piece(array: Any) -> Piece:
    """``array`` (a numpy or CuPy array) as a ``Piece``; copies only if not C-contiguous."""
    if type(array) is np.ndarray:
        return _encode_numpy(array)
    cupy = sys.modules.get("cupy")  # loaded if a CuPy array exists; never imported here
    if cupy is not None and isinstance(array, cupy.ndarray):
        from shuffle.device._codec import encode_cupy
        from shuffle.device._cuda import cai_nbytes

        meta, data = encode_cupy(array)
        return Piece(data, _CUPY + meta, cai_nbytes(data.__cuda_array_interface__))
    raise TypeError(
        f"cannot rechunk a {type(array).__module__}.{type(array).__name__} chunk out of band: "
        "only numpy.ndarray (and cupy.ndarray on GPUs) are supported; masked, sparse and "
        "other chunk types need x.rechunk(..., method='tasks')"
    )


def decode_piece(meta: bytes, data: Any) -> Any:
    """The array that ``encode_piece`` described by ``meta``; aliases ``data``."""
    if meta.startswith(_NUMPY):
        return _decode_numpy(meta[len(_NUMPY) :], data)
    if meta.startswith(_CUPY):
        from shuffle.device._codec import decode_cupy

        return decode_cupy(meta[len(_CUPY) :], data)
    raise ValueError(f"array piece with unknown kind tag {meta[:8]!r}")


def dtype_to_json(dtype: np.dtype[Any]) -> Any:
    """``.npy``'s descriptor of ``dtype``, plus the aligned flag it leaves out."""
    if dtype.hasobject:
        raise TypeError(
            f"cannot send arrays of dtype {dtype} out of band: they hold Python objects; "
            "use x.rechunk(..., method='tasks')"
        )
    description = {
        "descr": np.lib.format.dtype_to_descr(dtype),
        "aligned": dtype.isalignedstruct,
    }
    # The JSON trip must give the dtype back exactly; it cannot for field titles or
    # dtype metadata, which .npy descriptors cannot express either.
    try:
        same = dtype_from_json(json.loads(json.dumps(description))) == dtype
    except (TypeError, ValueError):
        same = False
    if not same:
        raise TypeError(
            f"cannot send arrays of dtype {dtype!r} out of band: it has no portable "
            "description (field titles or dtype metadata); use a plain structured dtype"
        )
    return description


def dtype_from_json(description: Any) -> np.dtype[Any]:
    try:
        descr = _tuples(description["descr"])
        dtype = np.lib.format.descr_to_dtype(descr)
        if description.get("aligned"):
            # The descriptor's padding fields already give the offsets; restore the flag.
            names = dtype.names or ()
            dtype = np.dtype(
                {
                    "names": names,
                    "formats": [dtype.fields[n][0] for n in names],
                    "offsets": [dtype.fields[n][1] for n in names],
                    "itemsize": dtype.itemsize,
                    "aligned": True,
                }
            )
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise ValueError(f"invalid dtype description {description!r}: {e}") from None
    if dtype.hasobject:
        raise ValueError(f"dtype {dtype} holds Python objects; refused")
    return dtype


def _tuples(descr: Any) -> Any:
    """JSON turned the descriptor's tuples into lists; structured fields need tuples."""
    if isinstance(descr, list):
        return [tuple(map(_tuples, f)) if isinstance(f, list) else f for f in descr]
    return descr


def _encode_numpy(array: np.ndarray) -> Piece:
    contiguous = np.ascontiguousarray(array)
    meta = json.dumps({"dtype": dtype_to_json(array.dtype), "shape": list(array.shape)})
    # A uint8 view, because memoryview refuses some dtypes (datetime64, for one).
    data = memoryview(contiguous.reshape(-1).view(np.uint8)) if contiguous.size else b""
    return Piece(memoryview(data), _NUMPY + meta.encode(), contiguous.nbytes)


def _decode_numpy(meta: bytes, data: Any) -> np.ndarray:
    try:
        description = json.loads(meta)
        dtype = dtype_from_json(description["dtype"])
        shape = tuple(int(n) for n in description["shape"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"invalid numpy piece description {meta[:200]!r}: {e}") from None
    if any(n < 0 for n in shape):
        raise ValueError(f"invalid numpy piece shape {shape}")
    with memoryview(data) as view:
        nbytes = view.nbytes
    expected = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
    if nbytes != expected:
        raise ValueError(
            f"numpy piece of shape {shape} and dtype {dtype} needs {expected} bytes, got {nbytes}"
        )
    if expected == 0:
        return np.empty(shape, dtype)
    return np.frombuffer(data, dtype=dtype).reshape(shape)
