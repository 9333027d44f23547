"""Which of dask's dataframe shuffle methods run through ray_oob_sched.

``"p2p"`` runs through the shuffle actors (the p2p test modules); ``"tasks"`` runs as
plain tasks; ``"disk"`` (a partd directory, also bag's disk groupby) runs on one node
and its directory is removed when the compute ends. dask's temporary directory is
pointed at the test's own directory, where a disk shuffle creates its ``*.partd``
directory: none may be left there, whatever happened.
"""

from __future__ import annotations

from pathlib import Path

import dask
import dask.bag as db
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest

import ray_oob_sched

pytestmark = pytest.mark.ray


@pytest.fixture
def temp_dir(ray_get, tmp_path: Path) -> Path:
    with dask.config.set({"temporary_directory": str(tmp_path)}):
        yield tmp_path
    assert list(tmp_path.glob("*.partd")) == [], "partd directories left behind"


def _frames() -> tuple[pd.DataFrame, dd.DataFrame, pd.DataFrame, dd.DataFrame]:
    rng = np.random.default_rng(3)
    left = pd.DataFrame({"k": rng.integers(0, 30, 600), "v": np.arange(600.0)})
    right = pd.DataFrame({"k": np.arange(30), "w": np.arange(30) * 2})
    return left, dd.from_pandas(left, npartitions=6), right, dd.from_pandas(right, npartitions=3)


def _sorted(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values(list(df.columns)).reset_index(drop=True)


def test_disk_shuffle_and_merge_run_and_leave_nothing(temp_dir):
    pleft, left, pright, right = _frames()
    got = left.shuffle("k", shuffle_method="disk").compute()
    pd.testing.assert_frame_equal(got.sort_index(), pleft)
    assert list(temp_dir.glob("*.partd")) == []
    merged = left.merge(right, on="k", shuffle_method="disk", broadcast=False).compute()
    pd.testing.assert_frame_equal(_sorted(merged), _sorted(pleft.merge(pright, on="k")))
    assert ray_oob_sched.last_stats().shuffles == 0  # not the shuffle actors
    assert list(temp_dir.glob("*.partd")) == []


def test_persisted_disk_shuffle_leaves_nothing_once_persisted(temp_dir):
    pleft, left, _, _ = _frames()
    (shuffled,) = dask.persist(left.shuffle("k", shuffle_method="disk", npartitions=4))
    assert list(temp_dir.glob("*.partd")) == []  # its consumers are done: it is gone
    parts = [shuffled.partitions[i].compute() for i in range(4)]
    keys = [set(p.k) for p in parts]
    assert all(not (a & b) for i, a in enumerate(keys) for b in keys[i + 1 :])
    pd.testing.assert_frame_equal(pd.concat(parts).sort_index(), pleft)


def test_bag_disk_groupby_matches_sync_and_leaves_nothing(temp_dir):
    bag = db.from_sequence(range(300), npartitions=5).groupby(lambda x: x % 7, shuffle="disk")
    expected = sorted((k, sorted(v)) for k, v in bag.compute(scheduler="sync"))
    assert list(temp_dir.glob("*.partd")) == []  # dask's own cleanup, for comparison
    assert sorted((k, sorted(v)) for k, v in bag.compute()) == expected


def _grouper(x: int) -> int:
    if x == 150:
        raise ValueError("grouper failed on 150")
    return x % 7


@pytest.mark.parametrize("kind", ["bag", "dataframe"])
def test_failed_disk_shuffle_leaves_nothing(temp_dir, kind):
    if kind == "bag":
        lazy = db.from_sequence(range(300), npartitions=5).groupby(_grouper, shuffle="disk")
    else:  # fails reading the shuffle's output: its store is full by then
        _, left, _, _ = _frames()
        lazy = left.shuffle("k", shuffle_method="disk").map_partitions(
            lambda df: df.assign(g=df.v.astype(int).map(_grouper))
        )
    with pytest.raises(ValueError, match="grouper failed on 150"):
        lazy.compute()


def test_tasks_shuffle_runs(temp_dir):
    pleft, left, pright, right = _frames()
    got = left.shuffle("k", shuffle_method="tasks").compute()
    pd.testing.assert_frame_equal(got.sort_index(), pleft)
    merged = left.merge(right, on="k", shuffle_method="tasks", broadcast=False).compute()
    expected = pleft.merge(pright, on="k")
    pd.testing.assert_frame_equal(
        merged.sort_values("v").reset_index(drop=True),
        expected.sort_values("v").reset_index(drop=True),
    )
    assert ray_oob_sched.last_stats().shuffles == 0  # plain tasks, no shuffle actors
