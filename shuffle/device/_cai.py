"""Reading the CUDA Array Interface: whether an object is device memory, and its size.

Pure (no GPU library), so the transports, the receive store and the device hooks all
measure device buffers with this one rule: C-contiguous only, where extents of 1 may
carry any stride (NumPy and CuPy both produce such views).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["cai_nbytes", "is_device_object"]


def is_device_object(obj: Any) -> bool:
    """Whether ``obj`` exposes device memory (CuPy, RMM, Numba, cuDF buffers)."""
    return hasattr(obj, "__cuda_array_interface__")


def cai_nbytes(cai: Mapping[str, Any]) -> int:
    """Bytes of a C-contiguous CAI buffer; ``ValueError`` for strided or bad ones."""
    try:
        shape = tuple(int(n) for n in cai["shape"])
        typestr = str(cai["typestr"])
        itemsize = int(typestr[2:])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"not a valid __cuda_array_interface__ ({e!r}): {dict(cai)!r}") from None
    nbytes = itemsize * math.prod(shape)
    strides = cai.get("strides")
    if strides is not None and nbytes:
        expected = []
        step = itemsize
        for extent in reversed(shape):
            expected.append(step)
            step *= extent
        # Extents of 1 may carry any stride (NumPy and CuPy both produce such views).
        pairs = zip(strides, reversed(expected), shape, strict=True)
        if any(got != want for got, want, extent in pairs if extent != 1):
            raise ValueError(
                f"device buffer of shape {shape} and strides {tuple(strides)} is not "
                "C-contiguous; make it contiguous first (e.g. cupy.ascontiguousarray)"
            )
    return nbytes
