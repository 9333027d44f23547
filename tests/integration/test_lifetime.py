"""ObjectRef lifetimes: intermediates freed early, nothing of ours left afterwards."""

from __future__ import annotations

import gc
import re

import dask
import dask.array as da
import numpy as np
import pytest
import ray
from ray._private.internal_api import memory_summary
from ray.util.state import list_objects

import ray_oob_sched
from tests.conftest import OBJECT_STORE_BYTES
from tests.integration.conftest import driver_refs


def _address() -> str:
    """This session's Ray: the state API would refuse "auto" where several run."""
    return str(ray.get_runtime_context().gcs_address)


MB = 2**20


def spilled_mib() -> int:
    m = re.search(r"Spilled (\d+) MiB", memory_summary(address=_address(), stats_only=True))
    return int(m.group(1)) if m else 0


def _grow(prev, step):
    # 24 MiB per step: a new array each time, so every step is a new object.
    return np.full(3 * MB, step, dtype=np.float64) + prev[:1]


@pytest.fixture
def unfused(ray_get):
    with dask.config.set({"ray-oob-sched.scheduler.fuse.enabled": False}):
        yield


def test_chain_with_intermediates_far_beyond_the_store_runs_without_spilling(unfused):
    steps = 48  # 48 x 24 MiB = 1.1 GiB through a 128 MiB store
    dsk = {"s0": (np.zeros, 3 * MB)}
    for i in range(1, steps):
        dsk[f"s{i}"] = (_grow, f"s{i - 1}", i)
    dsk["out"] = (np.sum, f"s{steps - 1}")
    assert steps * 24 * MB > 8 * OBJECT_STORE_BYTES
    before = spilled_mib()
    result = ray_oob_sched.get(dsk, "out")
    # s_i holds i + s_{i-1}[0], i.e. the triangular number i(i+1)/2.
    assert result == 3 * MB * (steps - 1) * steps // 2
    assert spilled_mib() == before


def _add_all(parts):
    return np.sum(parts, axis=0)


def test_tree_reduction_frees_leaves_as_it_goes(unfused):
    # 256 x 4 MiB leaves plus 4 MiB partial sums: 1.3 GiB in all. At most a few
    # partial sums per level wait for their siblings, so ~10 objects are live.
    leaves = 256
    dsk = {("leaf", i): (np.full, MB // 2, float(i)) for i in range(leaves)}
    level = list(dsk)
    depth = 0
    while len(level) > 1:
        depth += 1
        nxt = []
        for j in range(0, len(level), 4):
            k = ("sum", depth, j)
            dsk[k] = (_add_all, level[j : j + 4])
            nxt.append(k)
        level = nxt
    before = spilled_mib()
    with dask.config.set({"ray-oob-sched.scheduler.max-in-flight": 4}):
        out = ray_oob_sched.get(dsk, level[0])
    np.testing.assert_array_equal(out, np.full(MB // 2, float(sum(range(leaves)))))
    assert spilled_mib() == before


def test_no_reference_of_ours_remains_after_compute(ray_get, ray_session):
    gc.collect()
    refs_before = driver_refs(ray_session)
    objects_before = {o.object_id for o in list_objects(address=_address(), limit=10_000)}
    x = da.ones((2000, 2000), chunks=250)
    assert (x + x.T).sum().compute() == 2 * 2000 * 2000
    gc.collect()
    assert driver_refs(ray_session) <= refs_before
    left = {o.object_id for o in list_objects(address=_address(), limit=10_000)} - objects_before
    assert not left, f"objects of the compute still listed: {left}"


def test_persisted_collection_is_freed_when_dropped(ray_get, ray_session):
    gc.collect()
    refs_before = driver_refs(ray_session)
    x = da.ones((1000, 1000), chunks=250) + 1
    (y,) = dask.persist(x)
    held = driver_refs(ray_session) - refs_before
    assert len(held) == 16  # one object per chunk, nothing else
    assert y.sum().compute() == 2 * 10**6
    assert driver_refs(ray_session) - refs_before == held
    del y
    gc.collect()
    assert driver_refs(ray_session) <= refs_before
