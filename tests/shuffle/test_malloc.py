"""glibc malloc's thresholds in a sending process (``shuffle._malloc``)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from shuffle._malloc import MallocTuning

# A child process, so that this process's malloc stays as it was: it allocates,
# fills and frees a 48 MiB buffer five times, and prints the page faults of the
# last four. glibc's default maps such a buffer afresh every time (above its mmap
# threshold, which never rises past 32 MiB); tuned, the heap keeps and reuses it.
_CHILD = """
import ctypes, resource, sys
from shuffle._malloc import DEFAULT_MALLOC, tune_malloc
if sys.argv[1] == "tuned":
    assert tune_malloc(DEFAULT_MALLOC)
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
n = 48 * 2**20
def fill():
    p = libc.malloc(n)
    ctypes.memset(p, 1, n)
    libc.free(p)
fill()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    fill()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, mode], capture_output=True, text=True, check=True
    )
    return int(out.stdout)


def test_tuned_malloc_reuses_freed_buffers_instead_of_faulting_in_new_pages() -> None:
    try:
        import ctypes

        ctypes.CDLL(None).gnu_get_libc_version  # noqa: B018
    except (OSError, AttributeError):
        pytest.skip("glibc only")
    pages = 48 * 2**20 // 4096
    assert _faults("default") > 3 * pages  # a fresh mapping per buffer
    assert _faults("tuned") < pages // 4  # the first buffer's pages, reused


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"mmap_threshold": -1, "trim_threshold": 0}, ValueError, "mmap_threshold must lie"),
        ({"mmap_threshold": 0, "trim_threshold": 2**31}, ValueError, "trim_threshold must lie"),
        ({"mmap_threshold": True, "trim_threshold": 0}, TypeError, "must be an int"),
        ({"mmap_threshold": 1.5, "trim_threshold": 0}, TypeError, "must be an int"),
    ],
)
def test_tuning_values_are_checked(kwargs: dict[str, object], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        MallocTuning(**kwargs)  # type: ignore[arg-type]
