"""Tier 1: running a group of tasks inside one (simulated) Ray task (no Ray)."""

from __future__ import annotations

import gc
import weakref

import pytest

from ray_oob_sched._fuse import plan
from ray_oob_sched._graph import build, to_task_spec
from ray_oob_sched._worker import GroupSpec, GroupStatus, run_group


def _spec(dsk, outputs, size=100):
    graph = build(to_task_spec(dsk), outputs)
    (group,) = plan(graph, sources=frozenset(), size=size, options_of={})
    return GroupSpec(group.keys, tuple(graph.nodes[k] for k in group.keys), group.inputs, group.outputs)


def test_group_returns_status_then_outputs():
    spec = _spec({"a": 1, "b": (lambda x: x + 1, "a"), "c": (sum, ["a", "b"])}, ["c", "a"])
    status, *outs = run_group(spec, ())
    assert isinstance(status, GroupStatus) and ":" in status.worker
    assert dict(zip(spec.outputs, outs)) == {"a": 1, "c": 3}


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
