"""Timing repeated calls: the measuring loop the benchmarks in this folder share."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def measure(
    fn: Callable[[], Any],
    *,
    repeat: int,
    warmup: int,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[float, Any, list[float]]:
    """``fn()`` timed by ``clock`` over ``repeat`` calls, after ``warmup`` untimed ones
    (imports, worker and actor start, function export): the median, the last result
    and every time, in the clock's seconds."""
    result = None
    for _ in range(warmup):
        result = fn()
    times = []
    for _ in range(repeat):
        t0 = clock()
        result = fn()
        times.append(clock() - t0)
    return statistics.median(times), result, times
