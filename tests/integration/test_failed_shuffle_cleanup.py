"""A shuffle that fails part-way leaves nothing of its compute in the object store.

The failure is a refusal by the actors: one input partition's task closes the open
runs on every actor, so the transfers still to come are refused with
``ShuffleClosedError``. Ray workers that ran failed transfers must not keep the
input partitions (zero-copy views into the store) alive afterwards.
"""

from __future__ import annotations

import gc
import time
from typing import Any

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
import ray
from ray.util.state import list_objects

from shuffle import ShuffleClosedError
from tests.integration.p2p_support import WAIT, configured_service


def _address() -> str:
    """This session's Ray: the state API would refuse "auto" where several run."""
    return str(ray.get_runtime_context().gcs_address)


pytestmark = pytest.mark.ray

NPARTS = 8
ROWS = NPARTS * 100_000  # 1.6 MB per input partition: each one an object in the store


def close_runs_under(df: pd.DataFrame, *, actors: list[Any], first_row: int) -> pd.DataFrame:
    """In the partition holding ``first_row``: close every open run on ``actors``."""
    if first_row in df.index:
        for actor in actors:
            for info in ray.get(actor.runs.remote(), timeout=WAIT):
                ray.get(actor.close_run.remote(info.shuffle_id, info.run_id), timeout=WAIT)
    return df


def _objects() -> set[str]:
    return {
        o.object_id
        for o in list_objects(address=_address(), limit=10_000, raise_on_missing_output=False)
    }


@pytest.mark.parametrize("max_tasks", [1, 4], ids=["unfused", "fused"])
def test_a_refused_shuffle_leaves_no_input_in_the_store(ray_get, tmp_path, max_tasks):
    rng = np.random.default_rng(5)
    pdf = pd.DataFrame({"k": rng.integers(0, 100, ROWS), "v": rng.normal(size=ROWS)})
    config = {
        "dataframe.shuffle.method": "p2p",
        "ray-oob-sched.scheduler.fuse.max-tasks": max_tasks,
    }
    with dask.config.set(config), configured_service(tmp_path) as oob:
        before = _objects()
        # Computed in workers, so the inputs are objects that workers deserialise.
        ddf = dd.from_pandas(pdf, npartitions=NPARTS).map_partitions(
            lambda df: df.assign(v=df.v * 2), meta=pdf.iloc[:0]
        )
        doomed = ddf.map_partitions(
            close_runs_under,
            actors=[a.handle for a in oob.service.actors()],
            first_row=ddf.divisions[2],
            meta=ddf._meta,
        )
        with pytest.raises(ShuffleClosedError):
            doomed.shuffle("k", npartitions=4).compute()
        gc.collect()  # the driver's own garbage (pytest's exception info): not the point
        deadline = time.monotonic() + 30
        while (left := _objects() - before) and time.monotonic() < deadline:
            time.sleep(0.2)  # the driver's frees reach the store asynchronously
        held = [
            (o.pid, o.type, o.reference_type)
            for o in list_objects(
                address=_address(), limit=10_000, detail=True, raise_on_missing_output=False
            )
            if o.object_id in left
        ]
        assert not left, f"objects of the failed compute stay in the store: {held}"
