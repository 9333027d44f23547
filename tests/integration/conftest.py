from __future__ import annotations

import gc

import pytest

import ray_oob_sched
from ray_oob_sched._futures import REGISTRY


@pytest.fixture
def ray_get(ray_session):
    """ray_oob_sched as the dask scheduler, with a check that nothing of ours leaks."""
    with ray_oob_sched.enable():
        # The background start (actors, warm-up tasks) holds refs until it is done:
        # let it finish before tests take stock of the driver's refs.
        prestart = ray_oob_sched._schedule._prestart
        assert prestart is None or prestart.join(60), "the background start did not finish"
        yield ray_oob_sched.get
    gc.collect()
    assert len(REGISTRY) == 0, "persisted futures left alive"


def driver_refs(ray):
    """Object ids the driver still references (owned or borrowed)."""
    worker = ray._private.worker.global_worker
    return set(worker.core_worker.get_all_reference_counts())
