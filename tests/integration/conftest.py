from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from typing import Any

import dask
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


@pytest.fixture
def p2p(ray_get, ray_session):
    """Shuffles and rechunks through the shuffle actors; afterwards no run is left open,
    no actor holds a run, and the driver holds no more ObjectRefs than before."""
    config = {"dataframe.shuffle.method": "p2p", "array.rechunk.method": "p2p"}
    with leaves_no_runs(ray_session, config=config, runs="shuffle runs"):
        yield


@contextlib.contextmanager
def leaves_no_runs(ray, *, config: dict[str, Any], runs: str) -> Iterator[None]:
    """Under ``config``; afterwards no run is left open, no actor holds a run, and the
    driver holds no more ObjectRefs than before. ``runs`` names them in the failure."""
    refs_before = driver_refs(ray)
    with dask.config.set(config):
        yield
    service = ray_oob_sched._schedule._shuffle_service
    if service is not None:
        assert not service.open_runs(), f"{runs} left open after the compute"
        for actor in service.actors():
            assert ray.get(actor.handle.runs.remote()) == []
    assert driver_refs(ray) <= refs_before
