"""Array p2p rechunks run through the out-of-band shuffle actors."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ray_oob_sched
from ray_oob_sched._p2p import p2p_barriers
from tests.integration.conftest import leaves_no_runs


@pytest.fixture(params=["actors", "tasks"])
def p2p(request, ray_get, ray_session):
    """A p2p rechunk through the shuffle actors, or (small partials) as gather tasks."""
    max_pieces = 0 if request.param == "actors" else 1_000_000
    config = {
        "array.rechunk.method": "p2p",
        "ray-oob-sched.shuffle.rechunk-tasks-max-pieces": max_pieces,
    }
    with leaves_no_runs(ray_session, config=config, runs="rechunk runs"):
        yield request.param


def test_enable_selects_p2p_rechunks():
    with ray_oob_sched.enable():
        assert dask.config.get("array.rechunk.method") == "p2p"


@pytest.mark.parametrize(
    ("shape", "old", "new"),
    [
        ((64, 48), (8, 48), (64, 6)),  # rows to columns, one stage
        ((30, 20), (7, 3), (4, 11)),  # irregular edges on both axes
        ((12, 10, 8), (12, 1, 8), (2, 10, 4)),  # 3-d, splits and merges per axis
        ((6, 5, 4, 3), (1, 5, 4, 3), (6, 5, 1, 1)),  # 4-d "time to space"
        ((10, 10), ((3, 0, 7), 10), (5, (2, 0, 8))),  # zero-length chunks
    ],
)
def test_rechunk_matches_numpy(p2p, shape, old, new):
    a = np.random.default_rng(0).random(shape)
    x = da.from_array(a, chunks=old)
    y = x.rechunk(new)
    got = y.compute()
    np.testing.assert_array_equal(got, a)
    # One run per p2p stage that dask planned (small partials it concatenates).
    barriers = p2p_barriers(dict(y.__dask_graph__()))
    assert ray_oob_sched.last_stats().shuffles == (len(barriers) if p2p == "actors" else 0)
    if shape == (64, 48):
        assert barriers
    # Every output chunk is a separate object with the new chunk's shape.
    (pers,) = dask.persist(y)
    blocks = [pers.blocks[i].compute() for i in np.ndindex(pers.numblocks)]
    assert [b.shape for b in blocks] == [
        tuple(c[i] for c, i in zip(y.chunks, index, strict=True))
        for index in np.ndindex(y.numblocks)
    ]


def test_structured_and_datetime_dtypes(p2p):
    s = np.zeros((16, 6), dtype=[("a", "<i4"), ("b", ">f8", (2,)), ("c", "U2")])
    s["a"] = np.arange(96).reshape(16, 6)
    s["b"][..., 1] = 0.5
    s["c"] = "xy"
    np.testing.assert_array_equal(da.from_array(s, chunks=(2, 6)).rechunk((16, 1)).compute(), s)
    t = np.arange(120).astype("M8[s]").reshape(12, 10)
    np.testing.assert_array_equal(da.from_array(t, chunks=(12, 1)).rechunk((1, 10)).compute(), t)


def test_rechunk_inside_a_larger_graph_and_selected_blocks(p2p):
    a = np.arange(40 * 30, dtype="f4").reshape(40, 30)
    x = da.from_array(a, chunks=(4, 30))
    y = (x.rechunk((40, 3)) * 2).sum(axis=0)
    np.testing.assert_allclose(y.compute(), (a * 2).sum(axis=0))
    # Selecting one output block still rechunks (a p2p rechunk is all-or-nothing
    # over its inputs), and gives the right block.
    block = x.rechunk((40, 3)).blocks[0, 4].compute()
    np.testing.assert_array_equal(block, a[:, 12:15])


@settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(st.data())
def test_random_rechunks_match_numpy(p2p, data):
    ndim = data.draw(st.integers(1, 3))
    shape = tuple(data.draw(st.lists(st.integers(1, 9), min_size=ndim, max_size=ndim)))
    old = tuple(data.draw(st.integers(1, n)) for n in shape)
    new = tuple(data.draw(st.integers(1, n)) for n in shape)
    dtype = data.draw(st.sampled_from(["f8", "i2", "u1", "c8", "?"]))
    a = (np.arange(int(np.prod(shape))) % 7).astype(dtype).reshape(shape)
    got = da.from_array(a, chunks=old).rechunk(new).compute()
    np.testing.assert_array_equal(got, a)


def test_axes_of_unknown_length_are_carried_through(p2p):
    # Boolean indexing leaves the rows' chunk lengths unknown (NaN); dask rechunks the
    # other axes and keeps those, as distributed's p2p rechunk does.
    a = np.random.default_rng(1).random((40, 8, 2))
    keep = a[:, 0, 0] > 0.3
    x = da.from_array(a, chunks=(7, 8, 2))[da.from_array(keep, chunks=7)]
    y = x.rechunk({1: 4, 2: 1})
    assert all(np.isnan(c) for c in y.chunks[0]) and y.chunks[1:] == ((4, 4), (1, 1))
    (pers,) = dask.persist(y)
    barriers = p2p_barriers(dict(y.__dask_graph__()))
    assert barriers
    shuffles = len(barriers) if p2p == "actors" else 0
    assert ray_oob_sched.last_stats().shuffles == shuffles
    np.testing.assert_array_equal(pers.compute(), a[keep])
    lengths = [int(keep[i : i + 7].sum()) for i in range(0, 40, 7)]
    blocks = [pers.blocks[i, j, 0].compute() for i in range(len(lengths)) for j in range(2)]
    assert [b.shape for b in blocks] == [(n, 4, 1) for n in lengths for _ in range(2)]


def test_both_paths_give_identical_chunks(ray_get, ray_session):
    a = np.random.default_rng(1).random((96, 80))
    y = da.from_array(a, chunks=(4, 80)).rechunk((96, (10,) * 7 + (5, 5)), method="p2p")
    got = {}
    for path, max_pieces in (("actors", 0), ("tasks", 4096)):
        with dask.config.set({"ray-oob-sched.shuffle.rechunk-tasks-max-pieces": max_pieces}):
            (pers,) = dask.persist(y)
            got[path] = [pers.blocks[i].compute() for i in np.ndindex(pers.numblocks)]
            y.compute()
            got[path + " shuffles"] = ray_oob_sched.last_stats().shuffles
    assert got["actors shuffles"] >= 1 and got["tasks shuffles"] == 0
    assert len(got["actors"]) == len(got["tasks"]) == 9
    for x, t in zip(got["actors"], got["tasks"], strict=True):
        assert x.shape == t.shape and x.dtype == t.dtype
        np.testing.assert_array_equal(x, t)
    np.testing.assert_array_equal(np.concatenate(got["tasks"], axis=1), a)
