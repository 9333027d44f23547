"""Give memory the process freed back to the operating system.

A shuffle actor allocates and frees hundreds of MiB per run (received frames, spilled
partitions read back, outputs being built), and neither Arrow's pool (mimalloc or
jemalloc) nor glibc's malloc returns freed pages to the OS on their own soon enough:
the process keeps its high-water mark between runs. ``release_memory`` asks both to
give back what they hold unused. It costs milliseconds, so it runs once per closed run,
never per message. Each step is best effort: a platform without it (no glibc, an
Arrow without ``release_unused``) skips it, and a failure is logged, never raised.
"""

from __future__ import annotations

import ctypes
import logging
import sys
from collections.abc import Callable

__all__ = ["release_memory"]

logger = logging.getLogger(__name__)


def _arrow_release() -> None:
    import pyarrow as pa  # already loaded in an actor that shuffled dataframes

    pa.default_memory_pool().release_unused()


def _malloc_trim() -> Callable[[], None] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL(None).malloc_trim  # glibc only; musl has none
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int

    def step() -> None:
        trim(0)

    return step


_STEPS: dict[str, Callable[[], None] | None] = {
    "arrow pool release_unused": _arrow_release,
    "malloc_trim": _malloc_trim(),
}


def release_memory() -> None:
    """Return freed memory to the OS: Arrow's pool first, then glibc's heap."""
    for name, step in _STEPS.items():
        if step is None:
            continue
        try:
            step()
        except Exception as e:  # noqa: BLE001 -- best effort, never fatal
            logger.debug("releasing memory: %s failed: %r", name, e)
