"""Tasks run under the caller's dask config; their warnings reach the caller."""

from __future__ import annotations

import warnings

import dask
import dask.array as da
import dask.bag as db
import numpy as np
import pytest

import ray_oob_sched


@pytest.mark.parametrize("inline_bytes", [65536, 0])  # 0: the context is put once
def test_tasks_read_the_config_in_force_at_compute(ray_get, tmp_path, inline_bytes):
    task = dask.delayed(dask.config.get)("temporary-directory", None)
    settings = {
        "temporary-directory": str(tmp_path),
        "ray-oob-sched.scheduler.inline-data-bytes": inline_bytes,
    }
    with dask.config.set(settings):
        assert task.compute() == str(tmp_path)
    assert task.compute() is None  # the next compute's config, not a stale one


def chunks_of_a_new_array():
    return da.ones(2**20, dtype="u1", chunks="auto").chunks  # reads array.chunk-size


def test_settings_read_at_run_time_are_the_callers(ray_get):
    with dask.config.set({"array.chunk-size": "256KiB"}):
        chunks = dask.delayed(chunks_of_a_new_array)().compute()
    assert chunks == ((2**18,) * 4,)


def test_task_warnings_reach_the_caller_once_each(ray_get):
    x = da.full(1_000, 1e300, chunks=100)  # ten chunks, each overflows
    with pytest.warns(RuntimeWarning, match="overflow") as record:
        total = (x * x).sum().compute()
    assert total == np.inf
    assert len(record) == 1
    assert "in dask key" in record[0].filename


def test_task_warnings_keep_their_category(ray_get):
    def deprecated(i):
        warnings.warn(f"old api {i % 2}", FutureWarning)
        return i

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert db.from_sequence(range(8), npartitions=4).map(deprecated).sum().compute() == 28
    shown = sorted((w.category.__name__, str(w.message)) for w in record)
    assert shown == [("FutureWarning", "old api 0"), ("FutureWarning", "old api 1")]


def test_forward_warnings_can_be_switched_off(ray_get):
    x = da.full(100, 1e300, chunks=50)
    with ray_oob_sched.enable(ray_oob_sched__scheduler__forward_warnings=False):
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            (x * x).sum().compute()
    assert record == []
