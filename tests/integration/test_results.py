"""compute() results are the caller's: writeable, never aliasing Ray's object store."""

from __future__ import annotations

import dask
import dask.array as da
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest


@pytest.mark.parametrize("n", [10, 40_000])  # inline, and above Ray's ~100 KiB: from the store
@pytest.mark.parametrize("chunks", [-1, 4_000, 3])
def test_compute_copy(ray_get, n, chunks):
    """dask's own contract: compute never returns a buffer shared with the graph."""
    x = da.asarray(np.arange(n), chunks=chunks)
    nx = x.compute()
    nx[0] = 42
    assert x[0].compute() == 0
    (nx,) = dask.compute(x)
    nx[0] = 42
    assert x[0].compute() == 0
    for copy in (True, None):
        asarray = np.asarray(x, copy=copy)
        asarray[0] = 42
    assert x[0].compute() == 0


def test_nested_results_are_writeable(ray_get):
    x = da.ones(20_000, chunks=5_000)
    total, parts = dask.compute(x.sum(), {"a": [x, x + 1]})
    parts["a"][0][0] = 5.0
    parts["a"][1][:] = 0
    assert total == 20_000 and parts["a"][0][0] == 5.0
    assert not np.shares_memory(parts["a"][0], parts["a"][1])


@pytest.mark.parametrize("rows", [10, 50_000])
def test_dataframe_results_are_writeable(ray_get, rows):
    pdf = pd.DataFrame(
        {
            "i": np.arange(rows),
            "f": np.arange(rows, dtype=float),
            "m": pd.array(np.arange(rows), dtype="Int64"),
        }
    )
    df = dd.from_pandas(pdf, npartitions=2)
    out = (df + 1).compute()
    out.iloc[0, 0] = -1
    out.iloc[0, 1] = -1.0
    out.loc[out.index[0], "m"] = -1
    assert (out.iloc[0] == -1).all()
    series = df.f.compute()
    series.iloc[0] = 7.0
    assert series.iloc[0] == 7.0


def test_requested_data_is_the_object_itself(ray_get):
    """dask's local schedulers return a requested key that is data in the graph as
    the very object (dask's ``test_callable_obj`` and ``test_traverse_false``)."""
    import ray_oob_sched

    class Foo:
        a = 1

        def __call__(self):
            return 2

    foo = Foo()
    f = dask.delayed(foo)
    assert f.compute() is foo
    assert ray_oob_sched.last_stats().ray_tasks == 0  # nothing to run
    box = [f, np.arange(3)]
    got, value, called = dask.compute(dask.delayed(box, traverse=False), f.a, f())
    assert got is box and got[0] is f
    assert (value, called) == (1, 2)  # tasks on the data still run, in Ray
    assert ray_oob_sched.last_stats().ray_tasks >= 1
