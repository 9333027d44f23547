"""The shuffle service starts ahead of the first shuffle, and shutdown() stops it."""

from __future__ import annotations

import dask
import dask.array as da
import dask.dataframe as dd
import pandas as pd
import pytest
from ray._common.test_utils import wait_for_condition
from ray.util.state import list_actors, list_tasks

import ray_oob_sched


def _alive_shuffle_actors() -> set[str]:
    filters = [("class_name", "=", "ShuffleActor"), ("state", "=", "ALIVE")]
    return {a.actor_id for a in list_actors(filters=filters)}


@pytest.fixture
def fresh(ray_session):
    """No shuffle service before the test (the session's Ray stays), none after."""
    ray_oob_sched.shutdown()
    before = _alive_shuffle_actors()
    yield before
    ray_oob_sched.shutdown()


@pytest.mark.parametrize("prestart", [True, False])
def test_enable_and_a_compute_without_shuffle_start_the_actors(fresh, prestart):
    with dask.config.set({"ray-oob-sched.shuffle.prestart": prestart}), ray_oob_sched.enable():
        assert da.ones((40, 40), chunks=10).sum().compute() == 1600
        assert ray_oob_sched.last_stats().shuffles == 0
        pre = ray_oob_sched._schedule._prestart
        assert (pre is not None) is prestart
        if pre is not None:
            assert pre.join(60), "the background start did not finish"
        started = _alive_shuffle_actors() - fresh
        assert len(started) == (1 if prestart else 0)  # one node, actors-per-node auto
    if prestart:
        # Task events reach the state API within about a second: poll, bounded.
        # The imports run while the actors start; the connections once they are up.
        def finished(name: str) -> bool:
            done = list_tasks(filters=[("name", "=", name), ("state", "=", "FINISHED")])
            return len(done) >= 1

        wait_for_condition(lambda: finished("warm_imports") and finished("warm_sender"), timeout=30)


def test_the_first_shuffle_uses_the_prestarted_actors_and_shutdown_stops_them(fresh):
    with ray_oob_sched.enable():
        pre = ray_oob_sched._schedule._prestart
        assert pre is not None and pre.join(60)
        started = _alive_shuffle_actors() - fresh
        assert len(started) == 1
        pdf = pd.DataFrame({"k": range(100), "v": range(100)})
        got = dd.from_pandas(pdf, npartitions=4).shuffle("k").compute()
        assert ray_oob_sched.last_stats().shuffles == 1
        pd.testing.assert_frame_equal(got.sort_values("k"), pdf, check_index_type=False)
        assert _alive_shuffle_actors() - fresh == started  # no other actor was created
    assert ray_oob_sched.shutdown() is False  # the session's Ray is not ours to stop
    assert ray_oob_sched._schedule._prestart is None
    # ray.kill takes effect asynchronously: poll the actors' state, bounded.
    wait_for_condition(lambda: not (_alive_shuffle_actors() & started), timeout=30)


def test_shutdown_right_after_enable_leaves_no_actor(fresh):
    with ray_oob_sched.enable():
        pass
    ray_oob_sched.shutdown()  # whether or not the actors were up yet
    assert ray_oob_sched._schedule._prestart is None
    assert not ray_oob_sched._schedule._shuffle_service
    with ray_oob_sched.enable(ray_oob_sched__shuffle__prestart=False):
        assert ray_oob_sched._schedule._prestart is None
