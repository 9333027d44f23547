"""Collections computed on Ray equal the synchronous scheduler's results."""

from __future__ import annotations

import dask
import dask.array as da
import dask.bag as db
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest

import ray_oob_sched
from ray_oob_sched._futures import RayFuture


@pytest.fixture(params=[True, False], ids=["fused", "unfused"])
def fuse(request, ray_get):
    with dask.config.set({"ray-oob-sched.scheduler.fuse.enabled": request.param}):
        yield request.param


def _reference(lazy):
    """dask's own synchronous result (its "tasks" shuffle: sync cannot run p2p)."""
    with dask.config.set({"dataframe.shuffle.method": "tasks"}):
        return lazy.compute(scheduler="sync")


def _same(lazy):
    ours = lazy.compute()
    expected = _reference(lazy)
    if isinstance(expected, (pd.DataFrame, pd.Series)):
        pd.testing.assert_frame_equal(pd.DataFrame(ours), pd.DataFrame(expected))
    else:
        np.testing.assert_allclose(ours, expected)
    return ours


def test_array_workloads(fuse):
    x = da.random.default_rng(0).random((600, 400), chunks=(100, 150))
    _same((x + 1).sum())
    _same(x.mean(axis=0))
    _same(x[::7, 13:200].std(axis=1))
    _same(x.rechunk((250, 70), method="tasks").max(axis=0))
    _same(x @ x.T)
    _same(da.linalg.qr(x.rechunk((100, 400)))[1])


def _frame(n=2_000, parts=8):
    rng = np.random.default_rng(1)
    pdf = pd.DataFrame(
        {"k": rng.integers(0, 50, n), "v": rng.normal(size=n), "s": rng.choice(list("abc"), n)}
    )
    ddf = dd.from_pandas(pdf, npartitions=parts)
    # The reference is what dask itself makes of the frame (e.g. its string dtype).
    return ddf.compute(scheduler="sync"), ddf


def test_dataframe_groupby_and_reductions(fuse):
    pdf, ddf = _frame()
    got = ddf.groupby("k").v.agg(["sum", "count", "mean"]).compute().sort_index()
    pd.testing.assert_frame_equal(got, pdf.groupby("k").v.agg(["sum", "count", "mean"]))
    assert len(got) == 50
    assert ddf.v.sum().compute() == pytest.approx(pdf.v.sum())
    # split_out > 1 shuffles: with enable() that is the p2p shuffle through the
    # actors (the sync scheduler cannot run it), so the reference is pandas.
    nunique = ddf.groupby("s").k.nunique(split_out=3).compute()
    assert dict(nunique) == dict(pdf.groupby("s").k.nunique())


def test_dataframe_shuffle_merge_set_index(fuse):
    pdf, ddf = _frame()
    dright = dd.from_pandas(
        pd.DataFrame({"k": np.arange(50), "w": np.arange(50) * 10}), npartitions=3
    )
    right = dright.compute(scheduler="sync")
    merged = ddf.merge(dright, on="k", shuffle_method="tasks").compute()
    expected = pdf.merge(right, on="k")
    pd.testing.assert_frame_equal(
        merged.sort_values(["k", "v"]).reset_index(drop=True),
        expected.sort_values(["k", "v"]).reset_index(drop=True),
    )
    shuffled = ddf.shuffle("k", shuffle_method="tasks", npartitions=5)
    assert shuffled.npartitions == 5
    keys_per_part = [set(shuffled.partitions[i].k.compute()) for i in range(5)]
    for i in range(5):
        for j in range(i + 1, 5):
            assert not keys_per_part[i] & keys_per_part[j], "a key in two partitions"
    assert set().union(*keys_per_part) == set(pdf.k)
    assert len(shuffled.compute()) == len(pdf)
    indexed = ddf.set_index("v", shuffle_method="tasks").compute()
    pd.testing.assert_frame_equal(indexed, pdf.set_index("v").sort_index())


def test_bag_and_delayed(fuse):
    b = db.from_sequence(range(1000), npartitions=7)
    assert b.map(lambda v: v * 2).filter(lambda v: v % 3 == 0).sum().compute() == sum(
        v * 2 for v in range(1000) if (v * 2) % 3 == 0
    )
    folded = b.map(lambda v: (v % 5, v)).foldby(
        0, lambda a, kv: a + kv[1], 0, combine=lambda a, b: a + b
    )
    assert dict(folded.compute()) == {
        r: sum(v for v in range(1000) if v % 5 == r) for r in range(5)
    }

    @dask.delayed
    def add(a, b):
        return a + b

    total = dask.delayed(sum)([add(i, i) for i in range(20)])
    assert total.compute() == sum(2 * i for i in range(20))
    assert dask.compute(add(1, 2), {"x": add(3, 4)}) == (3, {"x": 7})


def test_persist_returns_futures_and_later_computes_use_them(ray_get):
    x = da.arange(10_000, chunks=1000) * 2
    (y,) = dask.persist(x)
    values = list(dict(y.__dask_graph__()).values())
    assert values and all(isinstance(v, RayFuture) for v in values)
    assert y.sum().compute() == x.sum().compute(scheduler="sync")
    np.testing.assert_array_equal(y.compute(), np.arange(10_000) * 2)
    pdf, ddf = _frame()
    pers = ddf.persist()
    assert pers.v.sum().compute() == pytest.approx(pdf.v.sum())
    pd.testing.assert_frame_equal(pers.compute(), pdf)


def test_get_refs_returns_object_refs(ray_session):
    d = dask.delayed(sum)([1, 2, 3])
    ref = ray_oob_sched.get_refs(d.__dask_graph__(), d.key)
    assert isinstance(ref, ray_session.ObjectRef)
    assert ray_session.get(ref) == 6
    (refs,) = ray_oob_sched.get_refs(d.__dask_graph__(), [[d.key]])
    assert ray_session.get(list(refs)) == [6]


def test_importing_ray_util_dask_does_not_change_persist(ray_get, monkeypatch):
    # ray.util.dask patches dask.persist at import; undo that after this test.
    monkeypatch.setattr(dask, "persist", dask.persist)
    monkeypatch.setattr(dask.base.DaskMethodsMixin, "persist", dask.base.DaskMethodsMixin.persist)
    import ray.util.dask  # noqa: F401

    (y,) = dask.persist(da.ones(100, chunks=10))
    assert all(isinstance(v, RayFuture) for v in dict(y.__dask_graph__()).values())
    assert y.sum().compute() == 100


def test_two_computes_at_once_from_two_threads(ray_get):
    from concurrent.futures import ThreadPoolExecutor

    xs = [da.arange(i * 1000, (i + 1) * 1000, chunks=100) for i in range(6)]
    with ThreadPoolExecutor(3) as pool:
        got = list(pool.map(lambda x: (x * 2).sum().compute(), xs))
    assert got == [int((np.arange(i * 1000, (i + 1) * 1000) * 2).sum()) for i in range(6)]
    assert dask.config.get("optimization.fuse.active", None) is None  # restored


def test_empty_keys_and_large_data_outputs(ray_get):
    assert ray_oob_sched.get({"x": 1}, []) == ()
    big = np.arange(1_000_000)  # above inline-data-bytes: put into Ray once
    dsk = {"big": big, "n": (len, "big")}
    got_big, n = ray_oob_sched.get(dsk, ["big", "n"])
    np.testing.assert_array_equal(got_big, big)
    assert n == len(big) and ray_oob_sched.last_stats().from_store == 1
