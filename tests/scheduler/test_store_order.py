"""Partial writes into shared zarr shards are ordered; aligned writes are not (no Ray)."""

from __future__ import annotations

import itertools

import dask.array as da
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ray_oob_sched import _graph
from ray_oob_sched._store_order import chain_shared_writes, write_units
from tests.scheduler.test_store import nodes_of, run_here

zarr = pytest.importorskip("zarr", minversion="3.0.0")


def test_write_units_whole_and_part():
    shape, unit = (60, 60), (18, 18)
    assert write_units((slice(0, 3), slice(0, 3)), shape, unit) == ([], [(0, 0)])
    # The array's last, shorter shard is whole when the write reaches the end.
    assert write_units((slice(0, 18), slice(54, 60)), shape, unit) == ([(0, 3)], [])
    assert write_units((slice(0, 36), slice(18, 40)), shape, unit) == (
        [(0, 1), (1, 1)],
        [(0, 2), (1, 2)],
    )
    assert write_units(None, shape, unit)[1] == []  # the whole array
    assert write_units((slice(5, 5),), shape, unit) == ([], [])
    assert write_units((slice(0, 6, 2),), shape, unit) is None  # strided: unknown
    assert write_units(([1, 2],), shape, unit) is None


@given(
    n=st.integers(1, 40),
    unit=st.integers(1, 12),
    cuts=st.lists(st.integers(0, 40), max_size=6),
)
def test_write_units_match_a_brute_force_count(n, unit, cuts):
    bounds = sorted({0, n, *(c for c in cuts if c <= n)})
    for start, stop in itertools.pairwise(bounds):
        whole, part = write_units((slice(start, stop),), (n,), (unit,))
        touched = {i // unit for i in range(start, stop)}
        full = {
            u
            for u in touched
            if set(range(u * unit, min(n, u * unit + unit))) <= set(range(start, stop))
        }
        assert {u for (u,) in whole} == full
        assert {u for (u,) in part} == touched - full


def sharded(tmp_path, shape, shards, chunks):
    return zarr.create_array(tmp_path, shape=shape, shards=shards, chunks=chunks, dtype="f8")


def test_writes_sharing_a_shard_wait_for_each_other(tmp_path):
    target = sharded(tmp_path, (12, 12), (6, 6), (3, 3))
    x = da.ones((12, 12), chunks=3)
    nodes = nodes_of(da.store(x, target, lock=False, compute=False))
    graph = _graph.build(nodes, list(nodes), resolve=lambda k: None)
    chained = chain_shared_writes(graph.nodes, graph.order)
    assert chained is not None
    again = _graph.build(chained, list(chained), resolve=lambda k: None)  # no cycle
    stores = [k for k in graph.order if chained[k] is not graph.nodes[k]]
    # 16 chunks, 4 per shard: each shard's writers form a chain of 4, so 3 of them wait.
    assert len(stores) == 12
    waits = {k: again.dependencies[k] - graph.dependencies[k] for k in stores}
    assert all(len(w) == 1 for w in waits.values())
    assert len(set().union(*waits.values())) == 12  # the first three writers of each shard

    from ray_oob_sched._store import rewrite

    run_here(*rewrite(chained))  # still runs, in order, and writes everything
    np.testing.assert_array_equal(np.asarray(target[:]), np.ones((12, 12)))


def test_aligned_writes_are_left_alone(tmp_path):
    target = sharded(tmp_path, (12, 12), (6, 6), (3, 3))
    x = da.ones((12, 12), chunks=6)
    nodes = nodes_of(da.store(x, target, lock=False, compute=False))
    graph = _graph.build(nodes, list(nodes), resolve=lambda k: None)
    assert chain_shared_writes(graph.nodes, graph.order) is None


def test_regions_count_in_the_shards_a_write_touches(tmp_path):
    target = sharded(tmp_path, (12,), (6,), (3,))
    x = da.ones(6, chunks=3)
    # Into [3, 9): both chunks are partial writes into shards 0 and 1, one each.
    nodes = nodes_of(da.store(x, target, regions=(slice(3, 9),), lock=False, compute=False))
    graph = _graph.build(nodes, list(nodes), resolve=lambda k: None)
    assert chain_shared_writes(graph.nodes, graph.order) is None
    nodes = nodes_of(da.store(x, target, regions=(slice(0, 6),), lock=False, compute=False))
    graph = _graph.build(nodes, list(nodes), resolve=lambda k: None)
    assert chain_shared_writes(graph.nodes, graph.order) is not None  # both in shard 0
