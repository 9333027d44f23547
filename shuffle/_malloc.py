"""glibc malloc's thresholds in the worker processes that split shuffle inputs.

A transfer task allocates and frees several buffers of megabytes per input: the sort
order, the gathered table, the encoded pieces. By default glibc serves a request
above its mmap threshold (128 KiB, raised on each free up to 32 MiB) with a fresh
mapping that ``free`` unmaps, and gives the heap's top back to the OS beyond twice
that. Each such buffer is then new memory that the kernel faults in and zeroes,
page by page, on every input. On the 2-core benchmark machine a 64 x 16 MiB shuffle
spent about a fifth of its transfer workers' CPU in the kernel this way.

``tune_malloc`` raises both thresholds in the calling process, so freed buffers stay
in the heap and the next input reuses them. That shortened the 1 GiB shuffle's
receive phase by about 15% (docs/benchmarks.md). The cost: a worker keeps up to
``trim_threshold`` bytes of freed heap instead of returning them at once, and every
task in that process, not only the shuffle's, allocates this way. glibc only: other
C libraries are left alone.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["DEFAULT_MALLOC", "MallocTuning", "tune_malloc"]

logger = logging.getLogger(__name__)

# mallopt's parameter numbers (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: mallopt takes an int; glibc may refuse less than this (logged by ``tune_malloc``).
_MAX_THRESHOLD = 2**31 - 1


@dataclass(frozen=True)
class MallocTuning:
    """Bytes: requests up to ``mmap_threshold`` come from the heap, and the heap
    keeps up to ``trim_threshold`` freed bytes at its top."""

    mmap_threshold: int
    trim_threshold: int

    def __post_init__(self) -> None:
        for name in ("mmap_threshold", "trim_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {value!r}")
            if not 0 <= value <= _MAX_THRESHOLD:
                raise ValueError(f"{name} must lie in [0, {_MAX_THRESHOLD}], got {value}")


DEFAULT_MALLOC = MallocTuning(mmap_threshold=64 * 2**20, trim_threshold=128 * 2**20)


@functools.cache
def _glibc_mallopt() -> Callable[[int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 -- glibc only; musl has mallopt too
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt


def tune_malloc(tuning: MallocTuning) -> bool:
    """Set glibc malloc's thresholds in this process to ``tuning`` (module docstring).

    Returns whether both are now set as asked: False off glibc, or where glibc
    refused a value (logged; that threshold stays as it was).
    """
    mallopt = _glibc_mallopt()
    if mallopt is None:
        return False
    ok = True
    for name, param, value in (
        ("M_MMAP_THRESHOLD", _M_MMAP_THRESHOLD, tuning.mmap_threshold),
        ("M_TRIM_THRESHOLD", _M_TRIM_THRESHOLD, tuning.trim_threshold),
    ):
        if mallopt(param, value) != 1:
            logger.warning("glibc refused %s = %d; it stays as it was", name, value)
            ok = False
    return ok
