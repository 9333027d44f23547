"""Shuffle settings changed after the service started apply to the next shuffle.

The service starts early (``enable()`` with Ray running starts it in the background),
so settings a user sets afterwards, e.g. in a ``dask.config.set`` block around one
compute, must restart it rather than be ignored.
"""

from __future__ import annotations

from pathlib import Path

import dask
import dask.dataframe as dd
import pandas as pd

import ray_oob_sched


def _shuffle_totals(df: dd.DataFrame) -> tuple[pd.DataFrame, object]:
    result = df.shuffle("k", npartitions=4).compute()
    stats = ray_oob_sched.last_stats()
    assert stats is not None and len(stats.shuffle_runs) == 1
    return result, stats.shuffle_runs[0]


def test_settings_set_after_the_service_started_apply_to_the_next_shuffle(
    p2p: None, tmp_path: Path
) -> None:
    frame = pd.DataFrame({"k": range(2000), "v": [float(i) for i in range(2000)]})
    df = dd.from_pandas(frame, npartitions=4)
    first, run = _shuffle_totals(df)
    assert run.bytes_received > 0 and run.bytes_spilled == 0  # the default budget holds it
    started = ray_oob_sched._schedule._shuffle_service
    spill = tmp_path / "spill"
    with dask.config.set(
        {
            "ray-oob-sched.shuffle.memory-limit": 0,  # everything received goes to disk
            "ray-oob-sched.shuffle.spill-directory": str(spill),
        }
    ):
        second, run = _shuffle_totals(df)
        assert run.bytes_spilled == run.bytes_received > 0
        assert ray_oob_sched._schedule._shuffle_service is not started
    # Back to the defaults: the next shuffle runs with them again.
    third, run = _shuffle_totals(df)
    assert run.bytes_spilled == 0
    for result in (first, second, third):
        pd.testing.assert_frame_equal(result.sort_index(), frame)
