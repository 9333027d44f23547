"""The array codec: pieces of array chunks, host (NumPy) or device (CuPy), never pickle.

A piece travels as its C-contiguous bytes (one frame, in host or device memory) and a
``meta`` blob in the message header: ``ARRAY_TAG`` + JSON of dtype and shape. One
meta for both memories: the decoder builds a NumPy array over a host buffer and a
CuPy array over a device buffer (``shuffle.device._arrays``, which alone touches
CuPy), aliasing the received memory either way.

dtypes are described with ``numpy.lib.format``'s descriptors (what ``.npy`` files
use), which cover structured and sub-array dtypes; object dtypes are refused, since
their bytes are pointers into the sender's memory. Every meta from the network is
checked (dtype, shape, size against the buffer) before it is trusted: a defect
raises ``FrameError``.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from shuffle._exceptions import FrameError
from shuffle.wire._message import Piece

__all__ = ["ARRAY_TAG", "decode_piece", "dtype_from_json", "dtype_to_json", "encode_piece"]

#: Leads the meta of an array piece.
ARRAY_TAG = b"array\0"
#: Bound on the JSON of one meta: a corrupt header cannot make us parse megabytes.
_MAX_JSON_BYTES = 1 << 20
_MAX_NDIM = 64  # NumPy's own limit


def encode_piece(array: Any) -> Piece:
    """``array`` (a numpy or CuPy array) as a ``Piece``; copies only if not C-contiguous."""
    if type(array) is np.ndarray:
        meta = _meta(array.dtype, array.shape)
        contiguous = np.ascontiguousarray(array)
        # A uint8 view, because memoryview refuses some dtypes (datetime64, for one).
        data = contiguous.reshape(-1).view(np.uint8).data if contiguous.size else b""
        return Piece(memoryview(data), meta, contiguous.nbytes)
    cupy = sys.modules.get("cupy")  # loaded if a CuPy array exists; never imported here
    if cupy is not None and isinstance(array, cupy.ndarray):
        from shuffle.device._arrays import contiguous_device_array

        meta = _meta(np.dtype(array.dtype), array.shape)
        data, nbytes = contiguous_device_array(array)
        return Piece(data, meta, nbytes)
    raise TypeError(
        f"cannot rechunk a {type(array).__module__}.{type(array).__name__} chunk out of band: "
        "only numpy.ndarray (and cupy.ndarray on GPUs) are supported; masked, sparse and "
        "other chunk types need x.rechunk(..., method='tasks')"
    )


def decode_piece(meta: bytes, data: Any) -> Any:
    """The array that ``encode_piece`` described by ``meta``, aliasing ``data``: NumPy
    over host memory, CuPy over device memory."""
    if not meta.startswith(ARRAY_TAG):
        raise FrameError(f"array piece with unknown kind tag {bytes(meta[:8])!r}")
    dtype, shape = _parse(meta[len(ARRAY_TAG) :])
    expected = dtype.itemsize * math.prod(shape)
    if hasattr(data, "__cuda_array_interface__"):
        from shuffle.device._arrays import device_array

        return device_array(data, dtype=dtype, shape=shape, nbytes=expected)
    with memoryview(data) as view:
        nbytes = view.nbytes
    _check_size(nbytes, expected, dtype, shape)
    if expected == 0:
        return np.empty(shape, dtype)
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def _meta(dtype: np.dtype[Any], shape: tuple[int, ...]) -> bytes:
    text = json.dumps({"dtype": dtype_to_json(dtype), "shape": [int(n) for n in shape]})
    return ARRAY_TAG + text.encode()


def _parse(raw: bytes) -> tuple[np.dtype[Any], tuple[int, ...]]:
    if len(raw) > _MAX_JSON_BYTES:
        raise FrameError(f"array piece description of {len(raw)} bytes is too long")
    try:
        description = json.loads(raw)
        dtype = dtype_from_json(description["dtype"])
        shape = description["shape"]
    except (ValueError, KeyError, TypeError) as e:
        raise FrameError(f"invalid array piece description {raw[:200]!r}: {e}") from None
    if (
        not isinstance(shape, list)
        or len(shape) > _MAX_NDIM
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
    ):
        raise FrameError(f"invalid array piece shape {shape!r}")
    return dtype, tuple(shape)


def _check_size(nbytes: int, expected: int, dtype: np.dtype[Any], shape: tuple[int, ...]) -> None:
    if nbytes != expected:
        raise FrameError(
            f"array piece of shape {shape} and dtype {dtype} needs {expected} bytes, got {nbytes}"
        )


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
            fields: Mapping[str, tuple[Any, ...]] = dtype.fields or {}
            dtype = np.dtype(
                {
                    "names": names,
                    "formats": [fields[n][0] for n in names],
                    "offsets": [fields[n][1] for n in names],
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
