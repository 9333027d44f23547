"""glibc malloc's thresholds, and the Arrow pool, of the processes that split inputs.

A transfer task allocates and frees several buffers of megabytes per input: the sort
order, the gathered table, the encoded pieces. By default glibc serves a request
above its mmap threshold (128 KiB, raised on each free up to 32 MiB) with a fresh
mapping that ``free`` unmaps, and gives the heap's top back to the OS beyond twice
that; Arrow's default pool (mimalloc) returns freed memory to the OS after 10 ms.
Either way each buffer is new memory that the kernel faults in and zeroes on every
input: on the 2-core benchmark machine about a fifth of the transfer workers' CPU at
64 x 16 MiB, and 12.8 % of it at 8 GiB.

``tune_malloc`` raises both glibc thresholds in the calling process, so freed
buffers stay in the heap and the next input reuses them, and the sender makes its
Arrow copies in ``sender_pool()``, glibc's heap. That shortened the 1 GiB shuffle's
receive phase by about 11 % (docs/benchmarks.md). The cost: a worker keeps freed
heap memory for reuse instead of returning it at once (at least the trim threshold
at the heap's top), and every task in that process, not only the shuffle's,
allocates this way. glibc only: other C libraries are left alone.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa

__all__ = ["DEFAULT_MALLOC", "MAX_THRESHOLD", "MallocTuning", "sender_pool", "tune_malloc"]

logger = logging.getLogger(__name__)

# mallopt's parameter numbers (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: mallopt takes an int; glibc may refuse less than this (logged by ``tune_malloc``).
MAX_THRESHOLD = 2**31 - 1


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
            if not 0 <= value <= MAX_THRESHOLD:
                raise ValueError(f"{name} must lie in [0, {MAX_THRESHOLD}], got {value}")


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

    Returns whether both are now set: False off glibc, or where glibc refused the
    mmap threshold (older releases cap it at 32 MiB; logged). Then neither is set:
    setting the trim threshold alone would switch off glibc's dynamic mmap
    threshold and leave it at 128 KiB, worse than the defaults.
    """
    mallopt = _glibc_mallopt()
    if mallopt is None:
        return False
    if mallopt(_M_MMAP_THRESHOLD, tuning.mmap_threshold) != 1:
        logger.warning(
            "glibc refused M_MMAP_THRESHOLD = %d; malloc keeps its defaults (set "
            "ray-oob-sched.shuffle.malloc-mmap-threshold to 33554432 or less)",
            tuning.mmap_threshold,
        )
        return False
    if mallopt(_M_TRIM_THRESHOLD, tuning.trim_threshold) != 1:
        logger.warning("glibc refused M_TRIM_THRESHOLD = %d", tuning.trim_threshold)
        return False
    return True


def sender_pool() -> pa.MemoryPool:
    """The Arrow pool of the sender's copies of an input (module docstring)."""
    return pa.system_memory_pool()
