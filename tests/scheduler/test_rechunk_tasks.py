"""Tier 1: which p2p rechunk partials run as gather tasks, and what those tasks compute."""

from __future__ import annotations

import itertools

import dask.array as da
import numpy as np
import pytest
from dask._task_spec import execute_graph
from dask.array.core import concatenate_shaped
from hypothesis import given, settings
from hypothesis import strategies as st

from ray_oob_sched import _p2p
from ray_oob_sched._rechunk_tasks import (
    gather_chunk,
    gather_inputs,
    plan_pieces,
    rechunk_as_tasks,
)
from shuffle._rechunk import RechunkLayout
from tests.scheduler.support import graph_of
from tests.scheduler.test_p2p import FakeService

ROWS_TO_COLS = RechunkLayout(((250,) * 24, (6000,)), ((6000,), (250,) * 24))  # 576 pieces
MERGE_ONLY = RechunkLayout(((2,) * 8, (10,)), ((4,) * 4, (10,)))  # every input feeds one output
SPLIT = RechunkLayout(((8,), (10,)), ((2,) * 4, (10,)))  # one input feeds four outputs


def test_pieces_are_input_output_overlaps_counted_up_to_the_limit():
    assert plan_pieces(ROWS_TO_COLS, limit=10_000) == 24 * 24
    assert plan_pieces(ROWS_TO_COLS, limit=30) == 48  # stops at the first output past 30
    assert plan_pieces(MERGE_ONLY, limit=100) == 8


@pytest.mark.parametrize(
    ("layout", "nodes", "max_pieces", "expected"),
    [
        (ROWS_TO_COLS, 1, 4096, True),
        (ROWS_TO_COLS, 1, 576, True),  # the limit is inclusive
        (ROWS_TO_COLS, 1, 575, False),
        (ROWS_TO_COLS, 1, 0, False),  # 0: always the actors
        (ROWS_TO_COLS, 2, 4096, False),  # each input read by 24 outputs: shuffle across nodes
        (MERGE_ONLY, 3, 4096, True),  # each input read once: no byte crosses twice
        (SPLIT, 2, 4096, False),
        (SPLIT, 1, 4096, True),
    ],
)
def test_rule_from_pieces_and_nodes(layout, nodes, max_pieces, expected):
    assert rechunk_as_tasks(layout, nodes=nodes, max_pieces=max_pieces) is expected


def test_rule_refuses_a_node_count_below_one():
    with pytest.raises(ValueError, match="nodes must be >= 1"):
        rechunk_as_tasks(MERGE_ONLY, nodes=0, max_pieces=10)


def _chunks(draw, n):
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=4)))
    bounds = [0, *cuts, n]
    return tuple(b - a for a, b in itertools.pairwise(bounds)) or (n,)


def _tiles(draw, chunk):
    """``chunk`` as a random grid of tiles (row-major), or as itself."""
    if not draw(st.booleans()):
        return None, [chunk]
    cuts = [np.cumsum((0, *_chunks(draw, n))) if n else np.array([0, 0]) for n in chunk.shape]
    grid = tuple(len(c) - 1 for c in cuts)
    tiles = [
        chunk[tuple(slice(c[i], c[i + 1]) for c, i in zip(cuts, index, strict=True))]
        for index in np.ndindex(*grid)
    ]
    return grid, tiles


@settings(max_examples=80, deadline=None)
@given(st.data())
def test_gather_tasks_rebuild_every_output_chunk(data):
    """From whole input chunks, or from the tiles dask would merge into them."""
    ndim = data.draw(st.integers(1, 3))
    shape = tuple(data.draw(st.integers(1, 7)) for _ in range(ndim))
    old = tuple(_chunks(data.draw, n) for n in shape)
    new = tuple(_chunks(data.draw, n) for n in shape)
    layout = RechunkLayout(old, new)
    a = np.arange(int(np.prod(shape)), dtype="i4").reshape(shape)
    bounds = [np.cumsum((0, *c)) for c in old]
    inputs = [
        _tiles(
            data.draw,
            a[
                tuple(
                    slice(b[i], b[i + 1])
                    for b, i in zip(bounds, layout.input_index(f), strict=True)
                )
            ],
        )
        for f in range(layout.npartitions_in)
    ]
    out_bounds = [np.cumsum((0, *c)) for c in new]
    for j in range(layout.npartitions_out):
        reads = [inputs[i] for i in gather_inputs(layout, j)]
        grids = tuple(grid for grid, _ in reads)
        got = gather_chunk(layout, j, grids, *(t for _, tiles in reads for t in tiles))
        where = tuple(
            slice(b[i], b[i + 1]) for b, i in zip(out_bounds, layout.output_index(j), strict=True)
        )
        np.testing.assert_array_equal(got, a[where])
        assert got.dtype == a.dtype


def test_gather_checks_its_argument_count():
    with pytest.raises(ValueError, match=r"output chunk \(0, 0\) reads 24 input chunks"):
        gather_chunk(ROWS_TO_COLS, 0, (None,), np.zeros((250, 6000)))
    with pytest.raises(ValueError, match=r"got 2 and 3 arrays \(their grids need 4\)"):
        gather_chunk(MERGE_ONLY, 0, ((2, 1), (2, 1)), *[np.zeros((1, 10))] * 3)


def test_a_small_partial_is_rewritten_as_gather_tasks_and_starts_no_run():
    a = np.arange(40 * 30, dtype="f8").reshape(40, 30)
    y = da.from_array(a, chunks=(4, 30)).rechunk((40, 3), method="p2p")
    g = graph_of(y)
    service = FakeService()
    rw = _p2p.rewrite(
        g.nodes, g.dependents, start_run=service.start_run, rechunk_as_tasks=lambda layout: True
    )
    assert not service.started and not rw.runs and not rw.unpacks and not rw.handles
    out_keys = list(y.__dask_keys__()[0])
    assert all(rw.nodes[k].func is gather_chunk for k in out_keys)
    # The barrier has no dependents left: building the graph for the outputs culls it.
    from ray_oob_sched import _graph

    built = _graph.build(rw.nodes, out_keys)
    assert not _p2p.p2p_barriers(built.nodes)
    # dask merged the small input chunks into one transfer input; the gather tasks
    # read the chunks themselves, so the merge is culled.
    merges = [n for n in g.nodes.values() if getattr(n, "func", None) is concatenate_shaped]
    assert merges and not any(
        getattr(n, "func", None) is concatenate_shaped for n in built.nodes.values()
    )
    assert all(any(grids) for _, _, grids, *_ in (rw.nodes[k].args for k in out_keys))
    values = execute_graph(dict(built.nodes), keys=out_keys)
    np.testing.assert_array_equal(np.concatenate([values[k] for k in out_keys], axis=1), a)


def test_the_choice_is_made_per_partial():
    y = da.ones((40, 30), chunks=(40, 3)).rechunk((4, 30), method="p2p")
    g = graph_of(y)
    service = FakeService()
    rw = _p2p.rewrite(
        g.nodes, g.dependents, start_run=service.start_run, rechunk_as_tasks=lambda layout: False
    )
    assert len(service.started) == 1 and rw.unpacks  # the default: through the actors
