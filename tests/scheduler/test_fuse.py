"""Tier 1: grouping of consecutive tasks into Ray tasks (no Ray)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ray_oob_sched._fuse import group_size, plan
from ray_oob_sched._graph import build, to_task_spec


def _random_dag(seed: int, n: int) -> dict:
    rng = random.Random(seed)
    dsk: dict = {}
    for i in range(n):
        deps = rng.sample(range(i), k=min(i, rng.randint(0, 3)))
        dsk[f"t{i}"] = (sum, [f"t{d}" for d in deps]) if deps else i
    return dsk


def _check_plan(graph, groups, sources=frozenset()):
    owner = {}
    for g in groups:
        for k in g.keys:
            assert k not in owner, f"{k} planned twice"
            owner[k] = g.index
    assert set(owner) == set(graph.nodes) - sources
    for g in groups:
        members = set(g.keys)
        needed = {d for k in g.keys for d in graph.dependencies[k]} - members
        assert set(g.inputs) == needed
        for d in g.inputs:
            # Every edge between groups points forward: the group DAG is acyclic.
            assert d in sources or owner[d] < g.index
        for k in g.keys:
            leaves = not graph.dependents[k] <= members
            assert (k in g.outputs) == (k in graph.outputs or leaves)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 120), size=st.integers(1, 20))
def test_plan_covers_every_key_once_and_is_acyclic(seed, n, size):
    dsk = _random_dag(seed, n)
    outputs = [f"t{n - 1}", f"t{seed % n}"]
    graph = build(to_task_spec(dsk), outputs)
    groups = plan(graph, sources=frozenset(), size=size, options_of={})
    _check_plan(graph, groups)
    assert all(len(g.keys) <= size for g in groups)


@st.composite
def _dags_with_unfusable_keys(draw, *, every: int):
    """A random DAG's graph, and its unfusable keys: one in 1 to ``every`` in order."""
    seed, n = draw(st.integers(0, 10_000)), draw(st.integers(1, 120))
    graph = build(to_task_spec(_random_dag(seed, n)), [f"t{n - 1}"])
    unfusable_every = draw(st.integers(1, every))
    return graph, {k for i, k in enumerate(graph.order) if i % unfusable_every == 0}


@settings(max_examples=60, deadline=None)
@given(case=_dags_with_unfusable_keys(every=5), size=st.integers(1, 20))
def test_plan_with_unfusable_keys_stays_acyclic(case, size):
    graph, alone = case
    groups = plan(
        graph, sources=frozenset(), size=size, options_of={}, fusable=lambda k: k not in alone
    )
    _check_plan(graph, groups)
    for g in groups:
        assert len(g.keys) == 1 or alone.isdisjoint(g.keys)


def _shuffle_shaped(n):
    """A shuffle's shape in dask's order: barrier b, then unpack u i and its consumer
    c i in turn; returns the graph and the unpacks."""
    dsk = {"b": 0}
    for i in range(n):
        dsk[f"u{i}"] = (abs, "b")
        dsk[f"c{i}"] = (abs, f"u{i}")
    return build(to_task_spec(dsk), [f"c{i}" for i in range(n)]), {f"u{i}" for i in range(n)}


def test_unfusable_keys_needing_nothing_open_do_not_cut_the_interval():
    # The unpacks go ahead; the consumers share groups of ``size``.
    graph, unpacks = _shuffle_shaped(6)
    groups = plan(
        graph, sources=frozenset(), size=3, options_of={}, fusable=lambda k: k not in unpacks
    )
    _check_plan(graph, groups)
    consumers = [set(g.keys) for g in groups if not unpacks & set(g.keys) and "b" not in g.keys]
    assert [len(c) for c in consumers] == [3, 3]  # not six groups of one
    assert set().union(*consumers) == {f"c{i}" for i in range(6)}
    assert sum(1 for g in groups if unpacks & set(g.keys)) == 6


@pytest.mark.parametrize("max_hoisted", [0, 1, 2, 3])
def test_hoisting_is_capped_so_a_group_fetches_few_partitions(max_hoisted):
    graph, unpacks = _shuffle_shaped(12)
    groups = plan(
        graph,
        sources=frozenset(),
        size=100,
        options_of={},
        fusable=lambda k: k not in unpacks,
        max_hoisted=max_hoisted,
    )
    _check_plan(graph, groups)
    consumers = [g for g in groups if not unpacks & set(g.keys) and "b" not in g.keys]
    fetched = [len(unpacks & set(g.inputs)) for g in consumers]
    assert max(fetched) <= max(1, max_hoisted)  # 0: every unpack cuts, as before hoisting
    assert sum(fetched) == 12


def test_sources_are_not_planned():
    graph = build(to_task_spec(_random_dag(1, 30)), ["t29"])
    sources = frozenset(k for k in graph.nodes if not graph.dependencies[k])
    groups = plan(graph, sources=sources, size=4, options_of={})
    _check_plan(graph, groups, sources)


def test_different_options_never_share_a_group():
    dsk = {f"t{i}": (abs, f"t{i - 1}") if i else 0 for i in range(10)}
    graph = build(to_task_spec(dsk), ["t9"])
    options = {f"t{i}": ("gpu",) for i in range(3, 6)}
    groups = plan(graph, sources=frozenset(), size=100, options_of=options)
    assert [g.keys for g in groups] == [
        ("t0", "t1", "t2"),
        ("t3", "t4", "t5"),
        ("t6", "t7", "t8", "t9"),
    ]
    assert [g.options for g in groups] == [(), ("gpu",), ()]


def test_unfusable_tasks_run_alone():
    dsk = {f"t{i}": (abs, f"t{i - 1}") if i else 0 for i in range(6)}
    graph = build(to_task_spec(dsk), ["t5"])
    groups = plan(graph, sources=frozenset(), size=100, options_of={}, fusable=lambda k: k != "t2")
    assert [g.keys for g in groups] == [("t0", "t1"), ("t2",), ("t3", "t4", "t5")]


@pytest.mark.parametrize(
    "ntasks, cpus, max_tasks, per_cpu, expected",
    [
        (10_000, 2, 64, 8, 64),  # tiny tasks: capped by max_tasks
        (100, 2, 64, 8, 7),  # few tasks: 16 groups keep 2 CPUs busy
        (100, 1000, 64, 8, 1),  # big cluster: no fusion
        (1, 2, 64, 8, 1),
    ],
)
def test_group_size(ntasks, cpus, max_tasks, per_cpu, expected):
    got = group_size(ntasks, cluster_cpus=cpus, max_tasks=max_tasks, tasks_per_cpu=per_cpu)
    assert got == expected


def _batched_plan(graph, unpacks, *, token_of, size=100, max_hoisted=8, max_batch=4):
    return plan(
        graph,
        sources=frozenset(),
        size=size,
        options_of={},
        fusable=lambda k: k not in unpacks,
        max_hoisted=max_hoisted,
        batch_of=lambda k: token_of(k) if k in unpacks else None,
        max_batch=max_batch,
    )


@pytest.mark.parametrize(("max_hoisted", "max_batch"), [(8, 4), (8, 8), (3, 8), (8, 1)])
def test_unpacks_with_one_token_share_groups_of_at_most_max_batch(max_hoisted, max_batch):
    graph, unpacks = _shuffle_shaped(12)
    groups = _batched_plan(
        graph, unpacks, token_of=lambda k: "actor", max_hoisted=max_hoisted, max_batch=max_batch
    )
    _check_plan(graph, groups)
    batches = [g.keys for g in groups if unpacks & set(g.keys)]
    assert all(unpacks.issuperset(b) for b in batches)  # never fused with other tasks
    assert sorted(k for b in batches for k in b) == sorted(unpacks)
    per_batch = min(max_batch, max_hoisted)
    assert [len(b) for b in batches] == [per_batch] * (12 // per_batch) + (
        [12 % per_batch] if 12 % per_batch else []
    )
    # Batching does not make a group fetch more partitions than max_hoisted allows.
    consumers = [g for g in groups if not unpacks & set(g.keys) and "b" not in g.keys]
    assert max(len(unpacks & set(g.inputs)) for g in consumers) <= max_hoisted


def test_unpacks_of_different_owners_or_shuffles_never_share_a_group():
    # A merge's shape: the left and right unpack of each output, then its merge.
    dsk = {"bl": 0, "br": 0}
    for i in range(8):
        dsk[f"l{i}"] = (abs, "bl")
        dsk[f"r{i}"] = (abs, "br")
        dsk[f"m{i}"] = (max, f"l{i}", f"r{i}")
    graph = build(to_task_spec(dsk), [f"m{i}" for i in range(8)])
    unpacks = {k for k in dsk if k[0] in "lr"}
    owner = {k: (k[0], int(k[1:]) // 4) for k in unpacks}  # 2 shuffles x 2 actors
    groups = _batched_plan(graph, unpacks, token_of=owner.__getitem__, max_batch=8)
    _check_plan(graph, groups)
    batches = [g.keys for g in groups if unpacks & set(g.keys)]
    assert all(len({owner[k] for k in b}) == 1 for b in batches)
    # Alternating sides still batch: 16 unpacks, 4 tokens, 8 hoisted per interval.
    assert len(batches) <= 6


@settings(max_examples=60, deadline=None)
@given(
    case=_dags_with_unfusable_keys(every=4),
    size=st.integers(1, 20),
    tokens=st.integers(1, 3),
    max_batch=st.integers(1, 6),
    max_hoisted=st.integers(0, 8),
)
def test_batched_plan_stays_acyclic(case, size, tokens, max_batch, max_hoisted):
    graph, alone = case
    token = {k: hash(k) % tokens for k in alone}
    groups = _batched_plan(
        graph,
        alone,
        token_of=token.__getitem__,
        size=size,
        max_hoisted=max_hoisted,
        max_batch=max_batch,
    )
    _check_plan(graph, groups)
    for g in groups:
        if alone & set(g.keys):
            assert alone.issuperset(g.keys) and len(g.keys) <= max_batch
            assert len({token[k] for k in g.keys}) == 1


def _longest_chain(groups) -> int:
    owner = {k: g.index for g in groups for k in g.keys}
    depth: dict[int, int] = {}
    for g in groups:  # in plan order: producers first
        depth[g.index] = 1 + max((depth[owner[d]] for d in g.inputs if d in owner), default=0)
    return max(depth.values())


def test_tasks_needing_a_closed_group_do_not_chain_the_independent_ones():
    """(x + x.T).sum(): dask's order interleaves chunk creation with partial sums of
    earlier chunks; mixed in one interval, every group waited for the one before."""
    import dask.array as da
    from dask.base import collections_to_expr

    from ray_oob_sched import _graph

    x = da.ones((64, 64), chunks=8)
    expr = collections_to_expr([(x + x.T).sum()])
    nodes, _ = _graph.materialize(expr.__dask_graph__())
    graph = build(nodes, _graph.output_keys(expr.__dask_keys__()))
    groups = plan(graph, sources=frozenset(), size=10, options_of={})
    _check_plan(graph, groups)
    assert all(len(g.keys) <= 10 for g in groups)
    independent = [g for g in groups if not g.inputs]
    assert len(independent) >= len(groups) // 2
    assert _longest_chain(groups) <= len(groups) // 2


@pytest.mark.parametrize("size", [2, 3, 4, 7])
def test_a_full_interval_does_not_cut_a_task_from_the_one_it_feeds(size):
    """Make-then-send pairs (a shuffle's input and its transfer): the maker moves on
    with its consumer rather than cross Ray's store, where a transfer's input stays
    held until the shuffle ends."""
    pairs = 12
    dsk = {}
    for i in range(pairs):
        dsk[f"make{i}"] = (abs, -i)
        dsk[f"send{i}"] = (abs, f"make{i}")
    dsk["barrier"] = (sum, [f"send{i}" for i in range(pairs)])
    graph = build(to_task_spec(dsk), ["barrier"])
    groups = plan(graph, sources=frozenset(), size=size, options_of={})
    _check_plan(graph, groups)
    assert all(len(g.keys) <= size for g in groups)
    owner = {k: g.index for g in groups for k in g.keys}
    assert all(owner[f"make{i}"] == owner[f"send{i}"] for i in range(pairs))
    crossing = {k for g in groups for k in g.inputs}
    assert crossing == {f"send{i}" for i in range(pairs)} - set(groups[-1].keys)
