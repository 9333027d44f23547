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
