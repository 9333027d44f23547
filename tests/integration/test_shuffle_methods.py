"""Which of dask's dataframe shuffle methods run through ray_oob_sched.

``"p2p"`` runs through the shuffle actors (the p2p test modules); ``"tasks"`` runs as
plain tasks; ``"disk"`` (partd directories on one worker's disk) is refused before
anything runs. dask's temporary directory is pointed at the test's own directory,
where a disk shuffle would create its ``*.partd`` directory.
"""

from __future__ import annotations

from pathlib import Path

import dask
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


def test_disk_shuffle_is_refused_before_it_runs(temp_dir):
    _, left, _, right = _frames()
    for lazy in (
        left.shuffle("k", shuffle_method="disk"),
        left.merge(right, on="k", shuffle_method="disk", broadcast=False),
    ):
        with pytest.raises(ray_oob_sched.UnsupportedGraphError, match="shuffle_method='disk'"):
            lazy.compute()
        assert ray_oob_sched.last_stats() is None  # nothing ran


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
