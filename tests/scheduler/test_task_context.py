"""Tasks run under the caller's dask config, and their warnings come back (no Ray)."""

from __future__ import annotations

import pickle
import warnings
from concurrent.futures import ThreadPoolExecutor

import dask
import dask.config
import pytest
from dask._task_spec import Task, TaskRef

from ray_oob_sched._task_warnings import Forwarder, Recorder, TaskWarning
from ray_oob_sched._taskconfig import applied, snapshot
from ray_oob_sched._worker import GroupSpec, TaskContext, run_group


def read_config(key):
    return dask.config.get(key)


def warn(message, category=RuntimeWarning):
    warnings.warn(message, category)
    return message


def test_snapshot_holds_the_callers_config_but_not_its_scheduler():
    pool = ThreadPoolExecutor(1)  # the local schedulers' pool: it cannot be pickled
    with dask.config.set({"temporary-directory": "/caller/tmp", "scheduler": "sync", "pool": pool}):
        blob = snapshot()
    pool.shutdown()
    caller = pickle.loads(blob)
    assert caller["temporary-directory"] == "/caller/tmp" and "scheduler" not in caller
    assert "pool" not in caller


def test_snapshot_pickles_lambdas_and_names_what_it_cannot_pickle():
    with dask.config.set({"my.hook": lambda: 3}):
        assert pickle.loads(snapshot())["my"]["hook"]() == 3
    import threading

    with dask.config.set({"my.lock": threading.Lock()}):
        with pytest.raises(TypeError, match=r"cannot be pickled.*remove"):
            snapshot()


def test_applied_swaps_the_config_and_restores_the_workers():
    with dask.config.set({"temporary-directory": "/caller/tmp"}):
        blob = snapshot()
    own = dask.config.get("temporary-directory", None)
    with applied(blob):
        assert dask.config.get("temporary-directory") == "/caller/tmp"
        dask.config.set({"temporary-directory": "/changed/by/a/task"})  # not undone by it
    assert dask.config.get("temporary-directory", None) == own


def test_run_group_runs_tasks_under_the_context_config():
    with dask.config.set({"temporary-directory": "/caller/tmp"}):
        context = TaskContext(config=snapshot(), forward_warnings=False)
    spec = GroupSpec(("t",), (Task("t", read_config, "temporary-directory"),), (), ("t",))
    status, value = run_group(spec, (), context=context)
    assert value == "/caller/tmp" and status.warnings == ()


def test_run_group_returns_distinct_warnings_with_the_key_that_raised_them():
    nodes = (
        Task("a", warn, "overflow"),
        Task("b", warn, "overflow"),  # same warning again: reported once
        Task("c", warn, "deprecated", UserWarning),
        Task("d", lambda *_: None, TaskRef("a"), TaskRef("b"), TaskRef("c")),
    )
    spec = GroupSpec(("a", "b", "c", "d"), nodes, (), ("d",))
    context = TaskContext(config=snapshot(), forward_warnings=True)
    with warnings.catch_warnings(record=True) as leaked:
        warnings.simplefilter("always")
        status, _ = run_group(spec, (), context=context)
    assert leaked == []  # captured, not shown in the worker
    assert [(w.category, w.message, w.key) for w in status.warnings] == [
        (RuntimeWarning, "overflow", "'a'"),
        (UserWarning, "deprecated", "'c'"),
    ]
    off = TaskContext(config=context.config, forward_warnings=False)
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        status, _ = run_group(spec, (), context=off)
    assert status.warnings == () and len(shown) == 3  # left to the worker's filters


def test_recorder_is_reentrant_per_group():
    with Recorder() as rec:
        warnings.warn("x", RuntimeWarning)
        rec.after("k")
    assert [w.message for w in rec.warnings()] == ["x"]


def test_forwarder_emits_each_distinct_warning_once_with_its_key():
    found = TaskWarning(RuntimeWarning, "overflow", "('x', 0)", "numpy/core.py", 7)
    forwarder = Forwarder()
    with pytest.warns(RuntimeWarning, match="^overflow$") as record:
        forwarder.emit([found])
        forwarder.emit([found])  # another group, same warning
    assert len(record) == 1
    assert record[0].filename == "numpy/core.py (in dask key ('x', 0), on a Ray worker)"
    assert record[0].lineno == 7
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the caller's filters apply
        Forwarder().emit([found])
