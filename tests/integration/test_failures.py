"""Failures: original exception type, the failing key, cancellation, no leaks."""

from __future__ import annotations

import gc
import os
import time

import dask
import dask.array as da
import numpy as np
import pytest
import ray
from dask._task_spec import Task, TaskRef
from dask.callbacks import Callback
from ray._common.test_utils import wait_for_condition

import ray_oob_sched
from ray_oob_sched import InvalidGraphError
from tests.integration.conftest import driver_refs


class CustomError(Exception):
    pass


def fail(x):
    raise CustomError(f"bad input {x}")


def slow(i, where):
    """Runs until cancelled, leaving a trace: started-<i> with its pid, stopped-<i>."""
    (where / f"started-{i}").write_text(str(os.getpid()))
    try:
        time.sleep(120)
    finally:  # a polite cancel raises KeyboardInterrupt here; a forced one kills us
        (where / f"stopped-{i}").write_text("")
    return i


def _all_started(where, n):
    wait_for_condition(lambda: len(list(where.glob("started-*"))) == n, timeout=30)


def fail_once_started(where, n):
    _all_started(where, n)
    raise CustomError("failing while others run")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _none_still_running(where) -> bool:
    for started in where.glob("started-*"):
        i = started.name.split("-", 1)[1]
        if not (where / f"stopped-{i}").exists() and _pid_alive(int(started.read_text())):
            return False
    return True


def _wait_until_no_slow_tasks(where, timeout=30):
    try:
        wait_for_condition(lambda: _none_still_running(where), timeout=timeout)
    except RuntimeError:
        running = sorted(p.name for p in where.iterdir())
        pytest.fail(f"slow tasks still running after cancel: {running}")


@pytest.mark.parametrize("fuse", [True, False])
def test_exception_keeps_type_and_names_the_key(ray_get, ray_session, fuse):
    gc.collect()
    before = driver_refs(ray_session)
    x = da.arange(100, chunks=10)
    y = x.map_blocks(lambda b: fail(b[0]) if b[0] == 30 else b, dtype=x.dtype)
    with dask.config.set({"ray-oob-sched.scheduler.fuse.enabled": fuse}):
        with pytest.raises(CustomError, match="bad input 30") as info:
            y.sum().compute()
    assert type(info.value) is CustomError
    notes = "\n".join(info.value.__notes__)
    assert "dask key (" in notes and ", 3)" in notes  # the key of block 3
    assert isinstance(info.value.__cause__, ray.exceptions.RayTaskError)
    gc.collect()
    assert driver_refs(ray_session) <= before


def test_failure_cancels_outstanding_tasks(ray_get, tmp_path):
    dsk = {("slow", i): (slow, i, tmp_path) for i in range(4)}
    dsk["bad"] = (fail_once_started, tmp_path, 4)
    dsk["out"] = (list, [*dsk])
    with dask.config.set({"ray-oob-sched.scheduler.fuse.enabled": False}):
        with dask.annotate(ray_remote_args={"num_cpus": 0.1}):
            with pytest.raises(CustomError):
                ray_oob_sched.get(dsk, "out")
    _wait_until_no_slow_tasks(tmp_path)


def test_keyboard_interrupt_cancels_and_releases(ray_get, ray_session, tmp_path):
    gc.collect()
    before = driver_refs(ray_session)
    dsk = {("slow", i): (slow, i, tmp_path) for i in range(3)}
    dsk["last"] = (sum, [*dsk])

    class Interrupt(Callback):
        def _pretask(self, key, dsk, state):
            if key == "last":
                _all_started(tmp_path, 3)
                raise KeyboardInterrupt

    with dask.config.set({"ray-oob-sched.scheduler.fuse.enabled": False}):
        with pytest.raises(KeyboardInterrupt), Interrupt():
            ray_oob_sched.get(dsk, "last", ray_remote_args={"num_cpus": 0.1})
    _wait_until_no_slow_tasks(tmp_path)
    gc.collect()
    assert driver_refs(ray_session) <= before


def _touch(path):
    path.write_text("ran")
    return 1


@pytest.mark.parametrize(
    "extra, keys, match",
    [
        (
            {"a": (np.add, "b", 1), "b": (np.add, "a", 1), "out": (sum, ["a", "side"])},
            ["out"],
            "cycle",
        ),
        (
            {
                "out": (sum, ["side", "side"]),
                "dangling": Task("dangling", np.add, TaskRef("missing"), 1),
            },
            ["out", "dangling"],
            "missing",
        ),
    ],
)
def test_bad_graphs_fail_before_anything_runs(ray_get, tmp_path, extra, keys, match):
    marker = tmp_path / "ran"
    with pytest.raises(InvalidGraphError, match=match):
        ray_oob_sched.get({"side": (_touch, marker), **extra}, keys)
    assert not marker.exists()


def test_failure_with_persisted_inputs_leaves_no_refs(ray_get, ray_session):
    gc.collect()
    before = driver_refs(ray_session)
    (x,) = dask.persist(da.arange(100, chunks=10))
    held = driver_refs(ray_session)
    y = x.map_blocks(lambda b: fail(b[0]) if b[0] == 50 else b, dtype=x.dtype)
    with pytest.raises(CustomError):
        y.sum().compute()
    gc.collect()
    assert driver_refs(ray_session) <= held  # only the persisted chunks
    del x, y  # y's graph holds x's futures too
    gc.collect()
    assert driver_refs(ray_session) <= before


def test_unknown_key_is_a_key_error(ray_get, tmp_path):
    marker = tmp_path / "ran"
    with pytest.raises(KeyError, match="nope"):
        ray_oob_sched.get({"side": (_touch, marker)}, ["side", "nope"])
    assert not marker.exists()


def test_unknown_keyword_is_refused(ray_get):
    with pytest.raises(TypeError, match="ray_remote_arg"):
        ray_oob_sched.get({"x": 1}, "x", ray_remote_arg={"num_cpus": 1})


def test_p2p_rechunk_of_objects_fails_with_the_fix_and_leaves_no_run(ray_get):
    x = da.from_array(np.array([None, "a"] * 800, dtype=object).reshape(40, 40), chunks=(40, 4))
    with (
        dask.config.set({"ray-oob-sched.shuffle.rechunk-tasks-max-pieces": 0}),
        pytest.raises(TypeError, match=r"dtype object .* method='tasks'") as info,
    ):
        x.rechunk((4, 40), method="p2p").compute()
    assert any("rechunk-transfer" in note for note in getattr(info.value, "__notes__", []))
    assert not ray_oob_sched._schedule.shuffle_service().open_runs()
