"""Tier 1: the scheduler state machine, asserted on its instruction lists (no Ray)."""

from __future__ import annotations

import pytest

from ray_oob_sched._fuse import plan
from ray_oob_sched._graph import build, to_task_spec
from ray_oob_sched._state import OutputWindow, Release, SchedulerState, Submit


def _chain_graph(n):
    dsk = {f"t{i}": (abs, f"t{i - 1}") if i else 0 for i in range(n)}
    return build(to_task_spec(dsk), [f"t{n - 1}"])


def _submitted(instrs):
    return [i.group.index for i in instrs if isinstance(i, Submit)]


def _released(instrs):
    return [k for i in instrs if isinstance(i, Release) for k in i.keys]


def test_window_bounds_groups_in_flight():
    graph = _chain_graph(10)
    groups = plan(graph, sources=frozenset(), size=1, options_of={})
    state = SchedulerState(groups, outputs=graph.outputs, max_in_flight=3)
    first = state.start()
    assert _submitted(first) == [0, 1, 2]
    assert state.in_flight == {0, 1, 2}
    nxt = state.group_finished(1)  # completion order does not matter
    assert _submitted(nxt) == [3]


def test_key_released_right_after_its_last_consumer_is_submitted():
    graph = _chain_graph(4)
    groups = plan(graph, sources=frozenset(), size=1, options_of={})
    state = SchedulerState(groups, outputs=graph.outputs, max_in_flight=1)
    instrs = state.start()
    assert instrs == [Submit(groups[0])]
    instrs = state.group_finished(0)
    # t0 is dropped as soon as t1, its only consumer, is submitted; not before.
    assert instrs == [Submit(groups[1]), Release(("t0",))]
    assert state.group_finished(1) == [Submit(groups[2]), Release(("t1",))]
    assert state.group_finished(2) == [Submit(groups[3]), Release(("t2",))]
    assert state.group_finished(3) == []
    assert state.done


def test_outputs_are_never_released():
    dsk = {"a": 1, "b": (abs, "a"), "c": (abs, "b")}
    graph = build(to_task_spec(dsk), ["a", "c"])
    groups = plan(graph, sources=frozenset(), size=1, options_of={})
    state = SchedulerState(groups, outputs=graph.outputs, max_in_flight=10)
    instrs = state.start()
    for g in range(3):
        instrs += state.group_finished(g)
    assert _released(instrs) == ["b"]


def test_fused_intermediates_are_never_refs_at_all():
    graph = _chain_graph(6)
    groups = plan(graph, sources=frozenset(), size=3, options_of={})
    assert [g.outputs for g in groups] == [("t2",), ("t5",)]
    state = SchedulerState(groups, outputs=graph.outputs, max_in_flight=10)
    instrs = state.start()
    assert _submitted(instrs) == [0, 1]
    assert _released(instrs) == ["t2"]


def test_sources_are_released_after_last_use_and_shown_finished():
    dsk = {"p": 0, "a": (abs, "p"), "b": (abs, "p"), "c": (sum, ["a", "b"])}
    graph = build(to_task_spec(dsk), ["c"])
    groups = plan(graph, sources=frozenset({"p"}), size=1, options_of={})
    state = SchedulerState(groups, outputs=graph.outputs, sources={"p"}, max_in_flight=10)
    assert "p" in state.view["finished"]
    instrs = state.start()
    assert set(_released(instrs)) == {"p", "a", "b"}


def test_view_moves_keys_like_dask_local_state():
    graph = _chain_graph(3)
    groups = plan(graph, sources=frozenset(), size=1, options_of={})
    state = SchedulerState(groups, outputs=graph.outputs, max_in_flight=1)
    v = state.view
    assert v["waiting"] == {"t0", "t1", "t2"} and not v["running"]
    state.start()
    assert v["running"] == {"t0"} and v["waiting"] == {"t1", "t2"}
    state.group_finished(0)
    assert v["finished"] == {"t0"} and v["running"] == {"t1"}


def test_finishing_an_unknown_group_is_an_error():
    graph = _chain_graph(2)
    groups = plan(graph, sources=frozenset(), size=1, options_of={})
    state = SchedulerState(groups, outputs=graph.outputs, max_in_flight=1)
    state.start()
    with pytest.raises(RuntimeError, match="group 1"):
        state.group_finished(1)


def test_window_must_be_positive():
    with pytest.raises(ValueError, match="max_in_flight"):
        SchedulerState([], outputs=(), max_in_flight=0)


def test_a_group_waits_for_the_group_it_comes_after_and_so_does_the_plan():
    graph = _chain_graph(5)
    groups = plan(graph, sources=frozenset(), size=1, options_of={})
    state = SchedulerState(groups, outputs=graph.outputs, max_in_flight=10, after={2: 1})
    # Group 2 waits for group 1 to finish; the plan's order holds groups 3 and 4 behind it.
    assert _submitted(state.start()) == [0, 1]
    assert _submitted(state.group_finished(0)) == []
    assert _submitted(state.group_finished(1)) == [2, 3, 4]


def test_a_group_run_in_the_caller_waits_for_every_maker_of_its_inputs():
    # t0 -> a, t0 -> b, (a, b) -> c, c -> d: c runs in the caller.
    dsk = {"t0": 1, "a": (abs, "t0"), "b": (abs, "t0"), "c": (max, "a", "b"), "d": (abs, "c")}
    graph = build(to_task_spec(dsk), ["d"])
    groups = plan(graph, sources=frozenset(), size=1, options_of={})
    index = {g.keys[0]: g.index for g in groups}
    state = SchedulerState(
        groups, outputs=graph.outputs, max_in_flight=10, in_caller=frozenset({index["c"]})
    )
    first = _submitted(state.start())
    assert index["c"] not in first and index["d"] not in first  # the plan waits with c
    assert {index["t0"], index["a"], index["b"]} <= set(first)
    state.group_finished(index["t0"])
    assert _submitted(state.group_finished(index["a"])) == []  # b still in flight
    assert _submitted(state.group_finished(index["b"])) == [index["c"], index["d"]]


def test_after_names_an_earlier_group():
    graph = _chain_graph(3)
    groups = plan(graph, sources=frozenset(), size=1, options_of={})
    with pytest.raises(ValueError, match="group 1 cannot wait for group 2"):
        SchedulerState(groups, outputs=graph.outputs, max_in_flight=1, after={1: 2})


def _window_state(order, inputs, batches, *, max_bytes, each):
    """Groups of one key each, in ``order``; ``inputs[key]``: the keys it takes."""
    from ray_oob_sched._fuse import Group

    needed = {d for ds in inputs.values() for d in ds}
    groups = [Group(i, (k,), tuple(inputs.get(k, ())), (k,), ()) for i, k in enumerate(order)]
    index = {k: i for i, k in enumerate(order)}
    asked: list[str] = []

    def bytes_of(i):
        asked.append(order[i])
        return each

    window = OutputWindow(frozenset(index[b] for b in batches), max_bytes, bytes_of)
    outputs = [k for k in order if k not in needed]
    state = SchedulerState(groups, outputs=outputs, max_in_flight=10, window=window)
    return state, index, asked


def _names(order, instrs):
    return [order[i] for i in _submitted(instrs)]


def test_a_batch_of_outputs_waits_while_earlier_ones_wait_for_their_consumers():
    order = ["b1", "c1", "b2", "c2"]
    state, index, asked = _window_state(
        order, {"c1": ["b1"], "c2": ["b2"]}, ["b1", "b2"], max_bytes=1000, each=600
    )
    assert _names(order, state.start()) == ["b1", "c1"]  # 600 waiting + 600 > 1000
    assert _names(order, state.group_finished(index["b1"])) == []  # c1 still runs
    assert _names(order, state.group_finished(index["c1"])) == ["b2", "c2"]
    assert asked.count("b1") == 1 and "b2" in asked


def test_outputs_whose_consumers_are_not_submitted_do_not_count():
    """c needs both batches: b2 must go although b1's outputs wait (no deadlock)."""
    order = ["b1", "b2", "c"]
    state, _, _ = _window_state(order, {"c": ["b1", "b2"]}, ["b1", "b2"], max_bytes=1, each=600)
    assert _names(order, state.start()) == order


def test_a_window_of_zero_bytes_still_lets_one_batch_through_at_a_time():
    order = ["b0", "c0", "b1", "c1", "b2", "c2"]
    inputs = {f"c{i}": [f"b{i}"] for i in range(3)}
    state, index, _ = _window_state(order, inputs, ["b0", "b1", "b2"], max_bytes=0, each=10)
    done: list[str] = []
    pending = _names(order, state.start())
    while pending:
        k = pending.pop(0)
        done.append(k)
        pending += _names(order, state.group_finished(index[k]))
    assert state.done and done == order  # each batch after the consumer before it
