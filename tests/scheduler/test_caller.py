"""Tier 1: which tasks run in the caller's process (``_caller``), without Ray."""

from __future__ import annotations

import functools

import dask
import dask.array as da
import dask.bag as db
import numpy as np
import pytest
from dask._task_spec import DataNode, Task, TaskRef, _execute_subgraph

from ray_oob_sched._caller import caller_keys, rebinds_enclosing, refusal
from ray_oob_sched._graph import build, output_keys, to_task_spec

COUNTER = 0


def _counter():
    calls = 0

    def count(x):
        nonlocal calls
        calls += 1
        return x

    return count


def _flag_set_by_a_nested_function():
    seen = False

    def outer(x):
        def inner():
            nonlocal seen
            seen = True

        inner()
        return x

    return outer


def _deleter():
    gone = 1

    def delete(x):
        nonlocal gone
        del gone
        return x

    return delete


def _reader():
    total = [0]

    def read(x):
        total.append(x)  # mutates the list the closure holds: not a rebinding
        return x + total[0]

    return read


def _own_cell(x):
    kept = x

    def inner():
        return kept

    kept = x + 1  # rebinds its own cell, not the caller's
    return inner()


def _writes_global(x):
    global COUNTER
    COUNTER += 1
    return x


@pytest.mark.parametrize(
    "f, expected",
    [
        (_counter(), True),
        (_flag_set_by_a_nested_function(), True),
        (_deleter(), True),
        (_reader(), False),
        (_own_cell, False),
        (_writes_global, False),
        (abs, False),  # a builtin: no code
        (np.add, False),
    ],
)
def test_rebinds_enclosing(f, expected):
    assert rebinds_enclosing(f) is expected


def _collection_graph(c):
    return build(to_task_spec(c.__dask_graph__()), output_keys(c.__dask_keys__()))


def _graph(dsk, out):
    graph = build(to_task_spec(dsk), out)
    return graph.nodes, graph.dependents


def test_a_task_whose_function_rebinds_is_found_with_the_function_named():
    count = _counter()
    nodes, dependents = _graph({"a": 1, "b": (count, "a"), "c": (abs, "b")}, ["c"])
    found = caller_keys(nodes, dependents)
    assert list(found) == ["b"]
    assert "_counter.<locals>.count" in found["b"] and "nonlocal" in found["b"]


@pytest.mark.parametrize(
    "wrap",
    [
        lambda f: Task("t", f, TaskRef("a")),  # the task's function
        lambda f: Task("t", map, f, TaskRef("a")),  # an argument
        lambda f: Task("t", map, functools.partial(f), TaskRef("a")),  # in a partial
        lambda f: Task("t", map, [f], TaskRef("a")),  # in a list argument
        lambda f: Task("t", map, Task(None, functools.partial, f), TaskRef("a")),  # nested
        lambda f: Task("t", max, DataNode(None, f), TaskRef("a")),  # as data
        lambda f: Task("t", lambda x: f(x), TaskRef("a")),  # called by a closure
        lambda f: Task("t", functools.wraps(f)(lambda x: x), TaskRef("a")),  # decorated
        lambda f: Task("t", np.vectorize(f), TaskRef("a")),  # np.vectorize
    ],
)
def test_functions_are_found_wherever_the_task_holds_them(wrap):
    nodes = {"a": DataNode("a", [1]), "t": wrap(_counter())}
    assert list(caller_keys(nodes, {"a": {"t"}, "t": set()})) == ["t"]


def _method_counter():
    calls = 0

    class Counter:
        def __call__(self, x):
            nonlocal calls
            calls += 1
            return x

    return Counter().__call__  # a bound method


def test_a_method_that_rebinds_is_found():
    nodes = {"a": DataNode("a", 1), "t": Task("t", _method_counter(), TaskRef("a"))}
    assert list(caller_keys(nodes, {"a": {"t"}, "t": set()})) == ["t"]


def test_a_closure_that_refers_to_itself_is_searched_once():
    def loop():
        def again(x):
            return again if x else x

        return again

    nodes = {"t": Task("t", loop(), 1)}
    assert caller_keys(nodes, {"t": set()}) == {}


def test_large_fused_subgraphs_are_searched_whole():
    inner = {f"i{j}": Task(f"i{j}", abs, -j) for j in range(300)}
    inner["out"] = Task("out", _counter(), TaskRef("i299"))  # last: searched after 300
    nodes = {"t": Task("t", _execute_subgraph, inner, "out", ())}
    assert list(caller_keys(nodes, {"t": set()})) == ["t"]


def test_functions_inside_fused_subgraphs_are_found():
    count = _counter()
    x = da.ones(4, chunks=2).map_blocks(count, dtype=float) + 1
    (fused,) = dask.optimize(x)  # blockwise fusion: one subgraph per output chunk
    graph = _collection_graph(fused)
    assert all(k[0].startswith("add") for k in graph.nodes)
    assert set(caller_keys(graph.nodes, graph.dependents)) == set(graph.nodes)


def test_bag_functions_are_found():
    count = _counter()
    b = db.from_sequence([1, 2, 3], npartitions=1).map(count)
    graph = _collection_graph(b)
    assert set(caller_keys(graph.nodes, graph.dependents)) == set(b.__dask_keys__())


def test_ordinary_graphs_run_in_the_workers():
    """dask's own closures (blockwise, reductions, bags) rebind nothing: nothing here
    may pay for running in the caller's process."""
    x = da.random.random((40, 40), chunks=10)
    collections = [
        (x + x.T).sum(),
        da.cumsum(x, axis=0),
        x.rechunk((40, 5)),
        db.range(20, npartitions=4).map(lambda i: i + 1).foldby(lambda i: i % 3, max),
        dask.delayed(sum)([dask.delayed(abs)(-i) for i in range(3)]),
    ]
    for c in collections:
        graph = _collection_graph(dask.optimize(c)[0])
        assert caller_keys(graph.nodes, graph.dependents) == {}


def test_consumers_of_store_target_stand_ins_run_in_the_caller():
    nodes, dependents = _graph({"s": 1, "t": (abs, "s"), "u": (abs, "t")}, ["u"])
    found = caller_keys(nodes, dependents, stand_ins=["s"])
    assert list(found) == ["t"] and "'s'" in found["t"] and "return_stored" in found["t"]


def test_excluded_keys_stay_in_the_workers():
    count = _counter()
    nodes, dependents = _graph({"a": 1, "b": (count, "a"), "c": (abs, "a")}, ["b", "c"])
    assert caller_keys(nodes, dependents, stand_ins=["a"], exclude=frozenset({"b", "c"})) == {}


def test_refusal_names_the_key_the_reason_and_the_setting():
    err = refusal(("x", 0), "because")
    assert isinstance(err, TypeError)
    text = str(err)
    assert "('x', 0)" in text and "because" in text
    assert "ray-oob-sched.scheduler.run-in-caller" in text
