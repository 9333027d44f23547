"""Dataframe p2p shuffles run through the out-of-band shuffle actors."""

from __future__ import annotations

import gc

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest

import ray_oob_sched
from ray_oob_sched._futures import REGISTRY
from tests.integration.conftest import driver_refs


def _frame(n=3_000, parts=6, seed=0):
    rng = np.random.default_rng(seed)
    pdf = pd.DataFrame(
        {
            "k": rng.integers(0, 40, n),
            "v": rng.normal(size=n),
            "s": rng.choice(["a", "bb", None], n),
            "c": pd.Categorical(rng.choice(["x", "y", "z"], n)),
            "i": pd.array(rng.integers(0, 5, n), dtype="Int64"),
            "t": pd.date_range("2026-01-01", periods=n, freq="min", tz="Europe/Berlin"),
        }
    )
    ddf = dd.from_pandas(pdf, npartitions=parts)
    return ddf.compute(scheduler="sync"), ddf


def _sorted(df, by):
    return df.sort_values(by).reset_index(drop=True)


@pytest.mark.parametrize("nout", [2, 6, 11])
def test_shuffle_matches_pandas(p2p, nout):
    pdf, ddf = _frame()
    shuffled = ddf.shuffle("k", npartitions=nout)
    (pers,) = dask.persist(shuffled)
    stats = ray_oob_sched.last_stats()
    parts = [pers.partitions[i].compute() for i in range(nout)]
    for i, a in enumerate(parts):
        for b in parts[i + 1 :]:
            assert not set(a.k) & set(b.k), "a key in two output partitions"
    got = pd.concat(parts)
    pd.testing.assert_frame_equal(_sorted(got, ["k", "v"]), _sorted(pdf, ["k", "v"]))
    # Through the shuffle actors, in O(N + M) Ray tasks and actor calls, not N x M.
    assert stats.shuffles == 1
    assert stats.ray_tasks <= 6 + nout + 4


def test_set_index_sort_values_groupby_merge(p2p):
    pdf, ddf = _frame(parts=5)
    pd.testing.assert_frame_equal(ddf.set_index("v").compute(), pdf.set_index("v").sort_index())
    assert ray_oob_sched.last_stats().shuffles == 1
    got = ddf.sort_values("v").persist().compute()
    pd.testing.assert_frame_equal(
        got.reset_index(drop=True), pdf.sort_values("v").reset_index(drop=True)
    )
    agg = ddf.groupby("k").v.sum(split_out=3).compute().sort_index()
    pd.testing.assert_series_equal(agg, pdf.groupby("k").v.sum(), check_names=False)
    right = dd.from_pandas(
        pd.DataFrame({"k": np.arange(40), "w": np.arange(40) * 2}), npartitions=3
    )
    merged = ddf.merge(right, on="k", broadcast=False).compute()
    assert ray_oob_sched.last_stats().shuffles == 2
    expected = pdf.merge(right.compute(scheduler="sync"), on="k")
    pd.testing.assert_frame_equal(_sorted(merged, ["k", "v"]), _sorted(expected, ["k", "v"]))


def test_empty_and_skewed_partitions(p2p):
    pdf = pd.DataFrame({"k": [7] * 500 + [1, 2, 3], "v": np.arange(503.0)})
    ddf = dd.from_pandas(pdf, npartitions=4)
    ddf = ddf[ddf.v > 100]  # the first partition becomes empty
    got = ddf.shuffle("k", npartitions=5).compute()
    pd.testing.assert_frame_equal(_sorted(got, ["v"]), _sorted(pdf[pdf.v > 100], ["v"]))


def test_selected_partitions_only(p2p):
    _pdf, ddf = _frame(parts=4)
    sel = ddf.shuffle("k", npartitions=6).partitions[[1, 4]]
    got = sel.compute()
    full = ddf.shuffle("k", npartitions=6, shuffle_method="tasks")
    expected = pd.concat([full.partitions[i].compute() for i in (1, 4)])
    pd.testing.assert_frame_equal(_sorted(got, ["k", "v"]), _sorted(expected, ["k", "v"]))


def test_batched_unpacks_give_each_output_its_own_object(p2p, ray_session):
    # One actor per node here: a batch fetches up to 8 outputs in one actor call.
    _pdf, ddf = _frame(parts=6)
    nout = 12
    with dask.config.set({"ray-oob-sched.scheduler.fuse.unpack-batch": 1}):
        (pers,) = dask.persist(ddf.shuffle("k", npartitions=nout))
    unbatched = ray_oob_sched.last_stats()
    one_by_one = [pers.partitions[i].compute() for i in range(nout)]
    del pers
    gc.collect()
    before = driver_refs(ray_session)
    (pers,) = dask.persist(ddf.shuffle("k", npartitions=nout))
    batched = ray_oob_sched.last_stats()
    # 12 unpack calls became 2 (8 + 4); the rest of the plan is the same.
    assert batched.ray_tasks == unbatched.ray_tasks - (nout - 2)
    refs = [REGISTRY.lookup(k) for k in list(REGISTRY._by_key)]  # pers' futures only
    # One object per output partition, nothing else held (no batch object).
    assert len({r.hex() for r in refs}) == nout
    assert len(driver_refs(ray_session) - before) == nout
    got = [pers.partitions[i].compute() for i in range(nout)]
    for a, b in zip(got, one_by_one, strict=True):
        pd.testing.assert_frame_equal(a, b)
    # Dropping the collection frees every output but the one still referenced, which
    # stays readable: each output of a batch is freed on its own.
    kept = refs[3]
    del pers, refs
    gc.collect()
    assert len(driver_refs(ray_session) - before) == 1
    pd.testing.assert_frame_equal(ray_session.get(kept), got[3])
    del kept


def test_batches_of_large_outputs_are_split_by_unpack_call_bytes(p2p, monkeypatch):
    """A batch's calls are sized from the barrier's value, the inputs' bytes."""
    from dask.sizeof import sizeof

    from ray_oob_sched import _executor

    sized = []

    def record(unpacks, *, inputs_nbytes, max_bytes):
        calls = real(unpacks, inputs_nbytes=inputs_nbytes, max_bytes=max_bytes)
        sized.append((inputs_nbytes, [len(positions) for _, positions in calls]))
        return calls

    real = _executor.unpack_calls
    monkeypatch.setattr(_executor, "unpack_calls", record)
    pdf, ddf = _frame(parts=6)
    inputs = sum(sizeof(ddf.partitions[i].compute(scheduler="sync")) for i in range(6))
    nout = 12
    # Room for two outputs' even share per call (2.5 leaves room for the column the
    # shuffle adds to its inputs): each batch of 8 (and then 4) goes in calls of two.
    room = int(2.5 * inputs / nout)
    with dask.config.set({"ray-oob-sched.scheduler.fuse.unpack-call-bytes": room}):
        got = ddf.shuffle("k", npartitions=nout).compute()
    pd.testing.assert_frame_equal(_sorted(got, ["k", "v"]), _sorted(pdf, ["k", "v"]))
    assert [calls for _, calls in sized] == [[2, 2, 2, 2], [2, 2]], sized
    for nbytes, _ in sized:
        assert nbytes is not None and inputs <= nbytes <= 1.2 * inputs, sized
