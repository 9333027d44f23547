"""Tasks whose result is dask's only in the caller's process run there (``_caller``)."""

from __future__ import annotations

import threading

import dask
import dask.array as da
import dask.bag as db
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest

import ray_oob_sched
from ray_oob_sched import CallerOnlyTaskError, UnpicklableGroupError


def _stats():
    stats = ray_oob_sched.last_stats()
    assert stats is not None
    return stats


def test_a_closure_that_sets_a_variable_of_the_caller_is_seen_by_the_caller(ray_get):
    calls = 0
    seen = []

    def count(block):
        nonlocal calls
        calls += 1
        seen.append(block.shape)
        return block * 2

    x = da.ones((6, 6), chunks=2)
    y = x.map_blocks(count, meta=np.array((), float)).sum()  # meta: no call to infer it
    assert y.compute() == 72
    assert calls == 9 and len(seen) == 9  # dask's local schedulers count 9
    stats = _stats()
    assert 9 <= stats.in_caller < stats.dask_tasks  # the sums still ran in the workers


def test_a_generator_in_the_graph_is_consumed_lazily_where_it_lives(ray_get):
    current = [None]

    def part():
        for i in range(10):
            current[0] = i
            yield i

    def func(items):
        first = next(items)
        assert current[0] == first == 0  # the generator runs as the task consumes it
        return first + sum(items)

    b = db.Bag({("gen", 0): part()}, "gen", 1)
    assert b.reduction(func, sum).compute() == 45
    assert _stats().in_caller >= 1


def test_a_task_that_returns_what_cannot_be_pickled_keeps_its_consumers_here(ray_get):
    made = 0

    def numbers(n):
        nonlocal made
        made += 1
        return (i for i in range(n))  # a generator: it cannot enter Ray's store

    gen = dask.delayed(numbers)(4)
    total = dask.delayed(sum)(gen)
    assert total.compute() == 6 and made == 1
    with pytest.raises(UnpicklableGroupError, match="cannot be pickled"):
        ray_oob_sched.get_refs(dict(gen.__dask_graph__()), gen.key)


class CountingLock:
    """A lock that counts its acquisitions; holds a ``threading.Lock`` (unpicklable)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.acquired = 0

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        got = self.lock.acquire(blocking, timeout)
        self.acquired += got
        return got

    def release(self) -> None:
        self.lock.release()


def test_a_lock_of_the_caller_is_the_lock_its_tasks_take(ray_get):
    lock = CountingLock()
    x = da.from_array(np.arange(12.0), chunks=3, lock=lock)
    assert (x + 1).sum().compute() == 78
    assert lock.acquired == 4  # one per chunk, in this process
    assert _stats().in_caller >= 4


def _stored(d):
    at, bt = np.zeros((4, 4)), np.zeros((4, 4))
    dat, dbt = da.store([d + 1, d + 2], [at, bt], compute=False, return_stored=True)
    assert not at.any() and not bt.any()
    return (at, bt), (dat, dbt)


def test_tasks_reading_stored_targets_see_what_the_driver_wrote(ray_get):
    d = da.ones((4, 4), chunks=2)
    (at, bt), stored = _stored(d)
    results = dask.compute(*stored)  # each chunk's value is the whole target
    assert (at == 2).all() and (bt == 3).all()
    _, expected = _stored(d)
    for got, want in zip(results, dask.compute(*expected, scheduler="sync"), strict=True):
        np.testing.assert_array_equal(got, want)


def test_a_consumer_fused_into_the_storing_task_reads_the_target(ray_get):
    d = da.ones((4, 4), chunks=2)
    (at, bt), (dat, _) = _stored(d)
    # dask fuses the + into the task that stores: it reads the target as written so far.
    got = (dat + 1).compute()
    assert (at == 2).all() and not bt.any()
    (at, _), (dat, _) = _stored(d)
    assert got.shape == (dat + 1).compute(scheduler="sync").shape
    # The target as written so far: 1 where unwritten yet, 3 where written (dask's
    # local schedulers give the same, in their order).
    assert set(np.unique(got)) <= {1.0, 3.0} and got.max() == 3


def test_off_refuses_before_anything_runs(ray_get, tmp_path):
    flag = tmp_path / "ran"
    hits = 0

    def count(block):
        nonlocal hits
        hits += 1
        return block

    def touch(block):
        flag.write_text("ran")
        return block

    meta = np.array((), float)  # no call to infer it
    x = da.ones(4, chunks=2).map_blocks(touch, meta=meta).map_blocks(count, meta=meta)
    with dask.config.set({"ray-oob-sched.scheduler.run-in-caller": False}):
        with pytest.raises(CallerOnlyTaskError, match="run-in-caller") as info:
            x.compute()
        assert "count" in str(info.value) and "nonlocal" in str(info.value)
        assert not flag.exists() and hits == 0
        b = db.Bag({("gen", 0): (i for i in range(3))}, "gen", 1)
        with pytest.raises(UnpicklableGroupError, match="run-in-caller") as info:
            b.sum().compute()
        # pickle's own reason, not Ray's whole serialisation trace
        assert "cannot pickle 'generator' object" in str(info.value)
        assert len(str(info.value)) < 600


def test_ordinary_work_never_runs_in_the_caller(ray_get):
    x = da.random.random((200, 200), chunks=50)
    assert np.isclose((x + x.T).sum().compute(), 2 * x.sum().compute())
    assert _stats().in_caller == 0
    df = pd.DataFrame({"a": np.arange(400) % 7, "b": np.arange(400.0)})
    ddf = dd.from_pandas(df, npartitions=4)
    got = ddf.groupby("a").b.sum().compute().sort_index()
    pd.testing.assert_series_equal(got, df.groupby("a").b.sum())
    assert _stats().in_caller == 0
    assert db.range(50, npartitions=5).map(lambda i: i * 2).sum().compute() == 2450
    assert _stats().in_caller == 0


def test_a_failed_input_of_a_group_run_here_raises_the_tasks_own_error(ray_get):
    def boom():
        raise ValueError("boom")

    bad = dask.delayed(boom, pure=False)()
    numbers = (i for i in range(3))  # graph data that cannot be pickled
    total = dask.delayed(lambda g, b: sum(g) + b)(numbers, bad)
    with pytest.raises(ValueError, match="boom") as info:
        total.compute()
    assert type(info.value) is ValueError  # not Ray's wrapper
    assert any(bad.key in note for note in info.value.__notes__)
