"""Fault injection: a shuffle actor killed mid-run; the shuffle restarts or fails clearly.

The kill happens inside the task computing one input partition of the shuffle, once
the actor has received messages from other transfers, and that partition is handed
on only after the actor is dead: the old run cannot complete, whatever the timing.
A flag file makes the kill happen once (the task runs again after the restart).
Each test gets a fresh service with an explicit number of actors per node (one, unless
the test asks for two through ``fresh_service``'s parameter).
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
import ray
from dask.callbacks import Callback
from distributed.shuffle._core import id_from_key
from ray._common.test_utils import wait_for_condition
from ray.exceptions import RayActorError, RayError

import ray_oob_sched
from tests.integration.conftest import driver_refs
from tests.integration.p2p_support import configured_service

NPARTS = 8
ROWS = 4_000
WAIT = 60


def _messages(actor: Any) -> int:
    return sum(i.stats.messages_received for i in ray.get(actor.runs.remote(), timeout=WAIT))


def _dead(actor: Any) -> bool:
    try:
        ray.get(actor.runs.remote(), timeout=WAIT)
    except RayActorError:
        return True
    return False


def kill_once(
    df: pd.DataFrame, *, actor: Any, flag: str, first_row: int, after: int
) -> pd.DataFrame:
    """In the partition holding ``first_row``: kill ``actor`` once it has received
    ``after`` messages, and return only once it is dead. Elsewhere: identity."""
    if first_row not in df.index or Path(flag).exists():
        return df
    wait_for_condition(lambda: _messages(actor) >= after, timeout=WAIT)
    ray.kill(actor, no_restart=True)
    wait_for_condition(lambda: _dead(actor), timeout=WAIT)
    Path(flag).write_text("killed")
    return df


def fail_in(df: pd.DataFrame, *, first_row: int) -> pd.DataFrame:
    if first_row in df.index:
        raise KeyError(f"user error in partition of row {first_row}")
    return df


def _frame() -> tuple[pd.DataFrame, dd.DataFrame]:
    rng = np.random.default_rng(7)
    pdf = pd.DataFrame(
        {
            "k": rng.integers(0, 50, ROWS),
            "v": rng.normal(size=ROWS),
            "s": rng.choice(["a", "bb", None], ROWS),
        }
    )
    ddf = dd.from_pandas(pdf, npartitions=NPARTS)
    return ddf.compute(scheduler="sync"), ddf  # dask's dtypes (Arrow strings)


def _sorted(df: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    return df.sort_values(by).reset_index(drop=True)


def _service() -> Any:
    return ray_oob_sched._schedule.shuffle_service()


def _assert_nothing_left(before_refs: set[Any]) -> None:
    service = _service()
    assert not service.open_runs(), "shuffle runs left open on the driver"
    for actor in service.actors():
        assert ray.get(actor.handle.runs.remote(), timeout=WAIT) == [], actor.name
    gc.collect()
    assert driver_refs(ray) <= before_refs, "ObjectRefs left behind"


@pytest.fixture
def fresh_service(ray_get, tmp_path, request):
    spill = tmp_path / "spill"
    spill.mkdir()
    per_node = getattr(request, "param", 1)
    # Small groups, so that the partition waiting for the kill never holds back the
    # transfers it waits for.
    with (
        configured_service(spill, actors_per_node=per_node),
        dask.config.set(
            {"dataframe.shuffle.method": "p2p", "ray-oob-sched.scheduler.fuse.max-tasks": 2}
        ),
    ):
        yield tmp_path


def _killing(
    ddf: dd.DataFrame, flag: Path, after: int = 2, victim: int = 0
) -> tuple[dd.DataFrame, str]:
    """``ddf`` with a step that kills actor ``victim`` (of ``actors()``) mid-shuffle."""
    actor = _service().actors()[victim]
    last = ddf.divisions[NPARTS - 1]
    doomed = ddf.map_partitions(
        kill_once, actor=actor.handle, flag=str(flag), first_row=last, after=after, meta=ddf._meta
    )
    return doomed, actor.name


@pytest.mark.parametrize(
    "after, window",
    [
        # Unpack calls wait in the actor's queue: they see the death first.
        (2, "auto"),
        # One group at a time: no unpack submitted yet, a transfer sees the death
        # as a transport error.
        (0, 1),
    ],
)
def test_actor_killed_mid_shuffle_restarts_the_run(fresh_service, after, window, caplog):
    pdf, ddf = _frame()
    gc.collect()
    before = driver_refs(ray)
    doomed, victim = _killing(ddf, fresh_service / "killed", after=after)
    with dask.config.set({"ray-oob-sched.scheduler.max-in-flight": window}):
        got = doomed.shuffle("k", npartitions=5).compute()
    assert (fresh_service / "killed").exists()
    stats = ray_oob_sched.last_stats()
    assert stats.shuffles == 1 and stats.restarts == 1
    pd.testing.assert_frame_equal(_sorted(got, ["k", "v"]), _sorted(pdf, ["k", "v"]))
    (successor,) = _service().actors()
    assert successor.name != victim  # re-created
    if window == 1:
        (log,) = [r.getMessage() for r in caplog.records if "restarting shuffles" in r.getMessage()]
        assert "RayTaskError" in log and "Transport" in log, log
    _assert_nothing_left(before)


def test_actor_killed_after_the_barrier_restarts_the_unpacks(fresh_service):
    """Killed by the driver once the barrier finished, before any unpack is submitted
    (one group in flight at a time): the unpack calls meet a dead actor."""
    pdf, ddf = _frame()
    (actor,) = _service().actors()
    killed_at = []

    def posttask(key, result, dsk, state, worker_id):
        if not killed_at and id_from_key(key) is not None:  # the shuffle's barrier
            ray.kill(actor.handle, no_restart=True)
            wait_for_condition(lambda: _dead(actor.handle), timeout=WAIT)
            killed_at.append(key)

    gc.collect()
    before = driver_refs(ray)
    with dask.config.set({"ray-oob-sched.scheduler.max-in-flight": 1}), Callback(posttask=posttask):
        got = ddf.shuffle("k", npartitions=5).compute()
    assert killed_at and ray_oob_sched.last_stats().restarts == 1
    pd.testing.assert_frame_equal(_sorted(got, ["k", "v"]), _sorted(pdf, ["k", "v"]))
    _assert_nothing_left(before)


def test_actor_killed_mid_merge_restarts_both_sides(fresh_service):
    pdf, ddf = _frame()
    right_pdf = pd.DataFrame({"k": np.arange(50), "w": np.arange(50) * 3})
    right = dd.from_pandas(right_pdf, npartitions=3)
    gc.collect()
    before = driver_refs(ray)
    doomed, _ = _killing(ddf, fresh_service / "killed")
    got = doomed.merge(right, on="k", broadcast=False).compute()
    assert (fresh_service / "killed").exists()
    stats = ray_oob_sched.last_stats()
    # One actor serves both shuffles: the left one (whose input waited for the kill)
    # restarted; the right one too unless its unpacks had all finished before.
    assert stats.shuffles == 2 and stats.restarts in (1, 2)
    expected = pdf.merge(right.compute(scheduler="sync"), on="k")
    pd.testing.assert_frame_equal(_sorted(got, ["k", "v"]), _sorted(expected, ["k", "v"]))
    _assert_nothing_left(before)


def test_no_restarts_left_fails_clearly_and_leaves_nothing(fresh_service):
    _pdf, ddf = _frame()
    gc.collect()
    before = driver_refs(ray)
    doomed, victim = _killing(ddf, fresh_service / "killed")
    with dask.config.set({"ray-oob-sched.shuffle.max-restarts": 0}):
        with pytest.raises(ray_oob_sched.ShuffleActorLostError) as info:
            doomed.shuffle("k", npartitions=5).compute()
    err = info.value
    assert err.actors == (victim,) and err.limit == 0 and err.restarts == 0
    assert f"shuffle {err.shuffle_id!r}" in str(err) and victim in str(err)
    assert "max-restarts = 0" in str(err)
    assert isinstance(err.__cause__, RayError)  # the error that showed the loss
    del err, info
    _assert_nothing_left(before)


def test_user_error_in_a_transfer_is_not_a_restart(fresh_service):
    _, ddf = _frame()
    (actor,) = _service().actors()
    bad = ddf.map_partitions(fail_in, first_row=ddf.divisions[3], meta=ddf._meta)
    with pytest.raises(KeyError, match="user error in partition"):
        bad.shuffle("k", npartitions=4).compute()
    assert _service().actors() == [actor]  # same actor: nothing was restarted
    assert not _service().open_runs()


@pytest.mark.parametrize("fresh_service", [2], indirect=True)
def test_one_of_two_actors_killed_restarts_the_run_on_a_successor(fresh_service):
    """Two actors on the node, the second (owning the last outputs) killed mid-run:
    only it is re-created, in its slot; the shuffle restarts once and completes."""
    pdf, ddf = _frame()
    gc.collect()
    before = driver_refs(ray)
    first, second = _service().actors()
    doomed, victim = _killing(ddf, fresh_service / "killed", victim=1)
    assert victim == second.name
    got = doomed.shuffle("k", npartitions=5).compute()
    assert (fresh_service / "killed").exists()
    stats = ray_oob_sched.last_stats()
    assert stats.shuffles == 1 and stats.restarts == 1
    pd.testing.assert_frame_equal(_sorted(got, ["k", "v"]), _sorted(pdf, ["k", "v"]))
    survivor, successor = _service().actors()
    assert survivor == first  # not re-created: same name, same address
    assert (successor.node_id, successor.index) == (second.node_id, 1)
    assert successor.name not in (first.name, victim)
    _assert_nothing_left(before)
