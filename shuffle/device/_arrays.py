"""Device arrays (CuPy) of array pieces: what is sent, what is rebuilt, host copies.

``shuffle.wire._ndarray`` is the one array codec; it calls here for device memory
only, so that CuPy is touched by this folder alone. Importing this module imports no
GPU library: a CuPy array is recognised through ``sys.modules`` (if the array exists,
CuPy is loaded), and CuPy is imported when the first device piece is rebuilt.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from shuffle._exceptions import FrameError
from shuffle.device._cai import cai_nbytes
from shuffle.device._cuda import import_cupy
from shuffle.device._cudf import is_cudf_frame

__all__ = ["contiguous_device_array", "device_array", "is_cupy_array", "to_host"]

#: What CuPy arrays can hold (no structured, string, datetime or object dtypes).
CUPY_KINDS = "biufc"


def is_cupy_array(obj: Any) -> bool:
    """Whether ``obj`` is a ``cupy.ndarray`` (without importing CuPy)."""
    cupy = sys.modules.get("cupy")
    return cupy is not None and isinstance(obj, cupy.ndarray)


def contiguous_device_array(array: Any) -> tuple[Any, int]:
    """A C-contiguous CuPy array of ``array``'s bytes (a copy only if strided) and its
    size. Waits for the current stream, so the bytes are complete before a transport
    (on its own streams) reads them."""
    dtype = np.dtype(array.dtype)
    if dtype.kind not in CUPY_KINDS:
        raise TypeError(f"cannot send a cupy array of dtype {dtype}: CuPy holds numbers only")
    cupy = sys.modules["cupy"]
    array = cupy.ascontiguousarray(array)
    cupy.cuda.get_current_stream().synchronize()
    return array, cai_nbytes(array.__cuda_array_interface__)


def device_array(buffer: Any, *, dtype: np.dtype[Any], shape: tuple[int, ...], nbytes: int) -> Any:
    """A CuPy array of ``dtype`` and ``shape`` over the received device ``buffer``
    (a view that keeps ``buffer`` alive); ``nbytes`` is what the meta describes."""
    if dtype.kind not in CUPY_KINDS:
        raise FrameError(f"array piece announces dtype {dtype}, which CuPy cannot hold")
    try:
        got = cai_nbytes(buffer.__cuda_array_interface__)
    except ValueError as e:
        raise FrameError(f"array piece buffer: {e}") from None
    if got != nbytes:
        raise FrameError(
            f"array piece of shape {shape} and dtype {dtype} needs {nbytes} bytes, got {got}"
        )
    cupy = import_cupy()
    if not nbytes:
        return cupy.empty(shape, dtype=dtype)
    return cupy.asarray(buffer).view(cupy.uint8).reshape(-1).view(dtype).reshape(shape)


def to_host(obj: Any) -> Any:
    """A host copy of a device partition (CuPy -> NumPy, cuDF -> pandas); else ``obj``."""
    if is_cupy_array(obj):
        return sys.modules["cupy"].asnumpy(obj)
    if is_cudf_frame(obj):
        return obj.to_pandas()
    return obj
