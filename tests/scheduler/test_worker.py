"""Tier 1: running a group of tasks inside one (simulated) Ray task (no Ray)."""

from __future__ import annotations

import gc
import weakref

import pytest

from ray_oob_sched._fuse import plan
from ray_oob_sched._graph import build, to_task_spec
from ray_oob_sched._worker import GroupSpec, GroupStatus, current_scope, run_group


def _spec(dsk, outputs, size=100):
    graph = build(to_task_spec(dsk), outputs)
    (group,) = plan(graph, sources=frozenset(), size=size, options_of={})
    nodes = tuple(graph.nodes[k] for k in group.keys)
    return GroupSpec(group.keys, nodes, group.inputs, group.outputs)


def test_group_returns_status_then_outputs():
    spec = _spec({"a": 1, "b": (lambda x: x + 1, "a"), "c": (sum, ["a", "b"])}, ["c", "a"])
    status, *outs = run_group(spec, ())
    assert isinstance(status, GroupStatus) and ":" in status.worker
    assert dict(zip(spec.outputs, outs, strict=False)) == {"a": 1, "c": 3}


def test_inputs_are_bound_in_order():
    from dask._task_spec import Task, TaskRef

    t = Task("d", lambda x, y: x - y, TaskRef("x"), TaskRef("y"))
    spec = GroupSpec(("d",), (t,), ("x", "y"), ("d",))
    _, out = run_group(spec, (10, 3))
    assert out == 7
    with pytest.raises(ValueError):
        run_group(spec, (10,))


class Blob:
    pass


def test_intermediates_are_dropped_after_last_use():
    seen = []

    def make():
        b = Blob()
        seen.append(weakref.ref(b))
        return b

    def check(_):
        gc.collect()
        return sum(r() is not None for r in seen)

    dsk = {"a": (make,), "b": (lambda a: 1, "a"), "c": (check, "b")}
    _, alive = run_group(_spec(dsk, ["c"]), ())
    assert alive == 0


def test_failing_task_keeps_its_type_and_names_its_key():
    def boom(x):
        raise LookupError("bad value")

    spec = _spec({"a": 1, ("boom", 3): (boom, "a")}, [("boom", 3)])
    with pytest.raises(LookupError, match="bad value") as info:
        run_group(spec, ())
    assert any("('boom', 3)" in n for n in info.value.__notes__)


class Staged:
    """A deferred item that records when it is finished."""

    def __init__(self, log: list, fail: bool = False) -> None:
        self.log, self.fail, self.items = log, fail, []

    def finish(self) -> None:
        self.log.append(("finish", tuple(self.items)))
        if self.fail:
            raise ConnectionError("peer went away")


def _in_order(dsk, outputs):
    """A group running ``dsk``'s keys in the order written (dask.order may reorder)."""
    graph = build(to_task_spec(dsk), outputs)
    keys = tuple(dsk)
    return GroupSpec(keys, tuple(graph.nodes[k] for k in keys), (), tuple(outputs))


def _stage(log: list, token: str, fail: bool = False):
    def task(x):
        item = current_scope().deferred(token, lambda: Staged(log, fail))
        item.items.append(x)
        log.append(("staged", x))
        return x

    return task


def test_deferred_work_finishes_before_the_group_returns_and_before_readers():
    log: list = []
    stage = _stage(log, "run-1")

    def read(*xs):
        log.append(("read", xs))
        return sum(xs)

    dsk = {"a": (stage, 1), "b": (stage, 2), "c": (read, "a", "b"), "d": (stage, 3)}
    _, c, d = run_group(_in_order(dsk, ["c", "d"]), ())
    assert (c, d) == (3, 3)
    # "c" reads deferred keys: what was pending finishes first; "d" at the group's end.
    assert log == [
        ("staged", 1),
        ("staged", 2),
        ("finish", (1, 2)),
        ("read", (1, 2)),
        ("staged", 3),
        ("finish", (3,)),
    ]
    assert current_scope() is None  # only inside run_group


def test_one_item_per_token_and_a_failing_finish_names_its_keys():
    log: list = []
    dsk = {
        ("t", 0): (_stage(log, "x"), 0),
        ("t", 1): (_stage(log, "y", fail=True), 1),
        ("t", 2): (_stage(log, "x"), 2),
    }
    with pytest.raises(ConnectionError, match="peer went away") as info:
        run_group(_in_order(dsk, [("t", 0), ("t", 1), ("t", 2)]), ())
    assert ("finish", (0, 2)) in log  # the first token's item finished, with both
    assert any("finishing dask keys ('t', 1)" in n for n in info.value.__notes__)
    assert current_scope() is None


class _RefusedSend:
    def finish(self):
        raise ConnectionError("refused")


def _stage_refused(x):
    current_scope().deferred("send", _RefusedSend)
    return 1


@pytest.mark.parametrize("entry", ["run_group", "ray task"])
def test_a_failed_group_leaves_its_inputs_to_reference_counting(entry):
    # Ray may keep a failed task's error in a reference cycle; the frames still running
    # when the error was raised (the Ray task's, run_group's) stay in its traceback and
    # must not keep the group's inputs (views of the object store) with it.
    from dask._task_spec import Task, TaskRef

    from ray_oob_sched._executor import _ray_run_group

    spec = GroupSpec(("d",), (Task("d", _stage_refused, TaskRef("x")),), ("x",), ("d",))
    value = Blob()
    alive = weakref.ref(value)
    gc.collect()
    gc.disable()
    try:
        try:  # not pytest.raises: its ExceptionInfo is part of a cycle of its own
            if entry == "run_group":
                run_group(spec, (value,))
            else:
                _ray_run_group._function(spec, None, value)
        except ConnectionError as e:
            kept = e  # as a cycle in Ray would keep it
        del value
        assert alive() is None, "the failed group's input outlives it in the traceback"
        assert kept.__traceback__ is not None
    finally:
        gc.enable()
