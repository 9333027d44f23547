"""Failures: original exception type, the failing key, cancellation, no leaks."""

from __future__ import annotations

import gc
import time

import dask
import dask.array as da
import numpy as np
import pytest
import ray
from dask.callbacks import Callback
from ray._common.test_utils import wait_for_condition
from ray.util.state import list_tasks

import ray_oob_sched
from ray_oob_sched import InvalidGraphError
from tests.integration.conftest import driver_refs


class CustomError(Exception):
    pass


def fail(x):
    raise CustomError(f"bad input {x}")


def slow(i):
    time.sleep(120)  # only ever ends by cancellation
    return i


def _live_slow_tasks():
    tasks = list_tasks(filters=[("func_or_class_name", "=", "_ray_run_group")], limit=10_000)
    return [t for t in tasks if t.name.startswith("('slow'") and t.state not in ("FINISHED", "FAILED")]


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


def test_failure_cancels_outstanding_tasks(ray_get, ray_session):
    dsk = {("slow", i): (slow, i) for i in range(4)}
    dsk["bad"] = (fail, 1)
    dsk["out"] = (list, [*dsk])
    with dask.config.set({"ray-oob-sched.scheduler.fuse.enabled": False}):
        with dask.annotate(ray_remote_args={"num_cpus": 0.1}):
            with pytest.raises(CustomError):
                ray_oob_sched.get(dsk, "out")
    wait_for_condition(lambda: not _live_slow_tasks(), timeout=60)


def test_keyboard_interrupt_cancels_and_releases(ray_get, ray_session):
    gc.collect()
    before = driver_refs(ray_session)
    dsk = {("slow", i): (slow, i) for i in range(3)}
    dsk["last"] = (sum, [*dsk])

    class Interrupt(Callback):
        def _pretask(self, key, dsk, state):
            if key == "last":
                raise KeyboardInterrupt

    with dask.config.set({"ray-oob-sched.scheduler.fuse.enabled": False}):
        with pytest.raises(KeyboardInterrupt), Interrupt():
            ray_oob_sched.get(dsk, "last", ray_remote_args={"num_cpus": 0.1})
    wait_for_condition(lambda: not _live_slow_tasks(), timeout=60)
    gc.collect()
    assert driver_refs(ray_session) <= before


def _touch(path):
    path.write_text("ran")
    return 1


@pytest.mark.parametrize(
    "extra, error, match",
    [
        ({"a": (np.add, "b", 1), "b": (np.add, "a", 1), "out": (sum, ["a", "side"])}, InvalidGraphError, "cycle"),
        ({"out": (sum, ["side", "side"]), "dangling": (np.add, "missing", 1), "out2": "dangling"}, InvalidGraphError, "missing"),
    ],
)
def test_bad_graphs_fail_before_anything_runs(ray_get, tmp_path, extra, error, match):
    marker = tmp_path / "ran"
    dsk = {"side": (_touch, marker), **extra}
    from dask._task_spec import Task, TaskRef

    if "dangling" in dsk:
        dsk["dangling"] = Task("dangling", np.add, TaskRef("missing"), 1)
    keys = ["out", "out2"] if "out2" in dsk else ["out"]
    with pytest.raises(error, match=match):
        ray_oob_sched.get(dsk, keys)
    assert not marker.exists()


def test_unknown_key_is_a_key_error(ray_get, tmp_path):
    marker = tmp_path / "ran"
    with pytest.raises(KeyError, match="nope"):
        ray_oob_sched.get({"side": (_touch, marker)}, ["side", "nope"])
    assert not marker.exists()


def test_unknown_keyword_is_refused(ray_get):
    with pytest.raises(TypeError, match="ray_remote_arg"):
        ray_oob_sched.get({"x": 1}, "x", ray_remote_arg={"num_cpus": 1})
