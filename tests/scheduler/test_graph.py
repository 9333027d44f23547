"""Tier 1: graph normalisation, validation, culling and ordering (no Ray)."""

from __future__ import annotations

from operator import add

import pytest
from dask._task_spec import Alias, DataNode, Task, TaskRef
from dask.highlevelgraph import HighLevelGraph

from ray_oob_sched._graph import InvalidGraphError, build, output_keys, to_task_spec


def inc(x):
    return x + 1


def test_legacy_graph_is_converted():
    nodes = to_task_spec({"x": 1, "y": (inc, "x"), "z": "y"})
    assert isinstance(nodes["x"], DataNode)
    assert isinstance(nodes["y"], Task)
    assert isinstance(nodes["z"], Alias)
    assert nodes["y"].dependencies == {"x"}


def test_high_level_graph_is_flattened():
    hlg = HighLevelGraph({"a": {"x": 1}, "b": {"y": (inc, "x")}}, {"a": set(), "b": {"a"}})
    assert set(to_task_spec(hlg)) == {"x", "y"}


def test_build_culls_to_what_outputs_need():
    nodes = to_task_spec({"x": 1, "y": (inc, "x"), "unused": (inc, "x")})
    g = build(nodes, ["y"])
    assert set(g.nodes) == {"x", "y"}
    assert g.dependents["x"] == {"y"}
    assert g.order == ("x", "y")


def test_order_puts_dependencies_first_on_a_tree():
    dsk = {f"leaf-{i}": (inc, i) for i in range(64)}
    level = [f"leaf-{i}" for i in range(64)]
    n = 0
    while len(level) > 1:
        nxt = []
        for j in range(0, len(level), 8):
            k = f"sum-{n}"
            n += 1
            dsk[k] = (sum, level[j : j + 8])
            nxt.append(k)
        level = nxt
    g = build(to_task_spec(dsk), level)
    pos = {k: i for i, k in enumerate(g.order)}
    assert len(g.order) == len(dsk)
    for k, deps in g.dependencies.items():
        assert all(pos[d] < pos[k] for d in deps)
    # dask.order runs each subtree to completion before starting the next one:
    # the 8 leaves of a first-level sum come right before it.
    for i in range(8):
        leaves = [pos[f"leaf-{j}"] for j in range(8 * i, 8 * i + 8)]
        assert pos[f"sum-{i}"] - 9 < min(leaves) and max(leaves) < pos[f"sum-{i}"]


def test_unknown_output_key_is_a_key_error():
    with pytest.raises(KeyError, match="badkey"):
        build(to_task_spec({"x": 1}), ["badkey"])


def test_missing_dependency_names_both_keys():
    nodes = {"y": Task("y", inc, TaskRef("nope"))}
    with pytest.raises(InvalidGraphError, match=r"'y' depends on key 'nope'"):
        build(nodes, ["y"])


def test_cycle_is_reported_with_its_keys():
    nodes = {
        "a": Task("a", inc, TaskRef("c")),
        "b": Task("b", inc, TaskRef("a")),
        "c": Task("c", inc, TaskRef("b")),
        "out": Task("out", inc, TaskRef("c")),
    }
    with pytest.raises(InvalidGraphError, match="cycle") as info:
        build(nodes, ["out"])
    for k in "abc":
        assert repr(k) in str(info.value)


def test_external_keys_are_resolved_not_defined():
    nodes = {"y": Task("y", add, TaskRef("persisted"), 1)}
    g = build(nodes, ["y", "other"], resolve={"persisted": "REF-1", "other": "REF-2"}.get)
    assert g.external == {"persisted": "REF-1", "other": "REF-2"}
    assert g.order == ("y",)
    assert g.dependencies["y"] == {"persisted"}
    assert g.dependents["persisted"] == {"y"}


def test_output_keys_flattens_nested_lists():
    assert output_keys([["a"], "b", [["c"]]]) == ["a", "b", "c"]
    assert output_keys(("x", 0)) == [("x", 0)]
