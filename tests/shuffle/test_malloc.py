"""glibc malloc's thresholds in a sending process (``shuffle._malloc``)."""

from __future__ import annotations

import subprocess
import sys

import pytest

import shuffle._malloc as malloc
from shuffle._malloc import DEFAULT_MALLOC, MallocTuning

# A child process, so that this process's malloc stays as it was: it allocates,
# fills and frees a 48 MiB buffer five times, and prints the page faults of the
# last four. glibc's default maps such a buffer afresh every time (above its mmap
# threshold, which never rises past 32 MiB); tuned, the heap keeps and reuses it.
_CHILD = """
import ctypes, resource, sys
from shuffle._malloc import DEFAULT_MALLOC, tune_malloc
if sys.argv[1] == "tuned" and not tune_malloc(DEFAULT_MALLOC):
    print(-1)  # this glibc refused the thresholds (logged): nothing to measure
    sys.exit()
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
    tuned = _faults("tuned")
    if tuned < 0:
        pytest.skip("this glibc refuses a 64 MiB mmap threshold")
    assert _faults("default") > 3 * pages  # a fresh mapping per buffer
    assert tuned < pages // 4  # the first buffer's pages, reused


def test_a_refused_mmap_threshold_leaves_the_trim_threshold_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Setting the trim threshold alone would switch off glibc's dynamic mmap threshold.
    calls: list[tuple[int, int]] = []

    def mallopt(param: int, value: int) -> int:
        calls.append((param, value))
        return 0 if param == -3 else 1  # M_MMAP_THRESHOLD refused, as older glibc does

    monkeypatch.setattr(malloc, "_glibc_mallopt", lambda: mallopt)
    assert malloc.tune_malloc(DEFAULT_MALLOC) is False
    assert calls == [(-3, DEFAULT_MALLOC.mmap_threshold)]


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
