"""Fetched results become the caller's own: read-only arrays copied once (no Ray)."""

from __future__ import annotations

from collections import namedtuple

import numpy as np
import pandas as pd

from ray_oob_sched._owned import owned


def read_only(a):
    """A read-only view of fresh bytes, as Ray hands out store-backed arrays."""
    return np.frombuffer(a.tobytes(), dtype=a.dtype).reshape(a.shape)


def test_read_only_arrays_are_copied_and_owned_ones_kept():
    ro = read_only(np.arange(10))
    mine = owned(ro)
    assert mine is not ro and mine.flags.writeable and not np.shares_memory(mine, ro)
    writeable = np.arange(3)
    assert owned(writeable) is writeable  # no second copy


def test_arrays_nested_as_dask_returns_them():
    Pair = namedtuple("Pair", "x y")
    value = (read_only(np.arange(3)), [read_only(np.arange(2)), 1], {"k": read_only(np.ones(2))})
    out = owned([value, Pair(read_only(np.arange(2)), "s")])
    assert out[0][0].flags.writeable and out[0][1][0].flags.writeable
    assert out[0][2]["k"].flags.writeable and out[0][1][1] == 1
    assert isinstance(out[1], Pair) and out[1].x.flags.writeable and out[1].y == "s"


def test_containers_without_arrays_are_returned_untouched():
    items = [(1, "a"), (2, "b")]
    assert owned(items) is items and owned(items)[0] is items[0]


def test_pandas_read_only_blocks_are_copied_and_owned_blocks_kept():
    df = pd.DataFrame(
        {
            "i": np.arange(4),
            "f": np.arange(4.0),
            "m": pd.array(np.arange(4), dtype="Int64"),
            "t": pd.date_range("2020", periods=4, tz="UTC"),
        }
    )
    blocks = {type(b.values).__name__: b for b in df._mgr.blocks}
    for b in df._mgr.blocks:
        if isinstance(b.values, np.ndarray):
            b.values.setflags(write=False)
    blocks["IntegerArray"].values._data.setflags(write=False)
    blocks["DatetimeArray"].values._ndarray.setflags(write=False)
    assert owned(df) is df
    df.iloc[0, 0] = 42
    df.iloc[0, 1] = 4.5
    df.loc[0, "m"] = 7
    df.loc[0, "t"] = pd.Timestamp("2021", tz="UTC")
    assert (
        df.loc[0, "i"] == 42
        and df.loc[0, "f"] == 4.5
        and df.loc[0, "m"] == 7
        and df.loc[0, "t"].year == 2021
    )
    s = pd.Series(read_only(np.arange(5.0)))
    owned(s).iloc[0] = 1.5
    assert s.iloc[0] == 1.5
