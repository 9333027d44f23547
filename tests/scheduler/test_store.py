"""da.store graphs: driver targets found in (nested) store calls and rewritten (no Ray)."""

from __future__ import annotations

import pickle
import threading

import dask
import dask.array as da
import numpy as np
import pytest
from dask.base import collections_to_expr

from ray_oob_sched import _graph
from ray_oob_sched._store import DriverTarget, UnsupportedStoreTargetError, rewrite
from ray_oob_sched._worker import GroupSpec, run_group


def nodes_of(collection):
    nodes, _ = _graph.materialize(collections_to_expr([collection]).__dask_graph__())
    return nodes


def run_here(nodes, stores):
    """Run every node in one group, then write what it staged, as the driver does."""
    graph = _graph.build(nodes, list(nodes), resolve=lambda k: None)
    keys = tuple(graph.order)
    status, *outs = run_group(GroupSpec(keys, tuple(graph.nodes[k] for k in keys), (), keys), ())
    stores.write(status.writes)
    return status, dict(zip(keys, outs, strict=False))


@pytest.mark.parametrize("lock", [True, threading.Lock()])
def test_a_numpy_target_in_a_fused_store_call_is_written_by_the_driver(lock):
    x = da.arange(12, chunks=4) + 1
    target = np.zeros(12)
    nodes, stores = rewrite(nodes_of(da.store(x, target, lock=lock, compute=False)))
    blob = pickle.dumps(nodes)  # neither the target nor a threading.Lock travels
    assert len(blob) < 20_000 and b"threading" not in blob
    status, _ = run_here(pickle.loads(blob), stores)
    assert len(status.writes) == 3
    np.testing.assert_array_equal(target, np.arange(12) + 1)


def test_return_stored_reads_back_the_written_chunk_with_the_target_dtype():
    x = da.arange(12, chunks=4) * 1.5
    target = np.zeros(12, dtype="i8")
    stored = da.store(x, target, return_stored=True, compute=False, lock=False)
    nodes, stores = rewrite(nodes_of(stored + 1))
    _, values = run_here(nodes, stores)
    np.testing.assert_array_equal(target, (np.arange(12) * 1.5).astype("i8"))
    added = [v for k, v in values.items() if isinstance(k, tuple) and k[0].startswith("add")]
    assert sorted(np.concatenate(added)) == sorted((np.arange(12) * 1.5).astype("i8") + 1)


def test_graphs_without_driver_targets_are_left_alone():
    x = da.ones(8, chunks=4)
    nodes = nodes_of(x + 1)
    new, stores = rewrite(nodes)
    assert not stores and all(new[k] is nodes[k] for k in nodes)


def test_worker_openable_targets_stay_in_the_graph():
    class ZarrLike:
        dtype, shape = np.dtype("f8"), (8,)

        def __setitem__(self, index, value):
            pass

    ZarrLike.__module__ = "zarr.core.array"
    nodes = nodes_of(da.store(da.ones(8, chunks=4), ZarrLike(), compute=False))
    new, stores = rewrite(nodes)
    assert not stores and all(new[k] is nodes[k] for k in nodes)


def test_a_delayed_target_is_refused():
    target = dask.delayed(np.zeros)(8)
    with pytest.raises(UnsupportedStoreTargetError, match="computed by a task"):
        rewrite(nodes_of(da.store(da.ones(8, chunks=4), target, compute=False)))


def test_a_target_of_the_callers_own_class_is_written_on_the_driver():
    class Sink:  # a local class: it cannot be pickled, so it must not travel
        def __init__(self):
            self.writes = []

        def __setitem__(self, index, value):
            self.writes.append(np.asarray(value).tolist())

    sink = Sink()
    nodes, stores = rewrite(nodes_of(da.store(da.arange(8, chunks=4), sink, compute=False)))
    run_here(pickle.loads(pickle.dumps(nodes)), stores)
    assert sorted(sink.writes) == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_a_target_without_a_shape_refuses_reads_back():
    with pytest.raises(UnsupportedStoreTargetError, match="has no shape"):
        DriverTarget(1, None, None)[0:4]


def test_a_zarr_array_in_memory_is_written_on_the_driver():
    zarr = pytest.importorskip("zarr")
    z = zarr.zeros((8,), chunks=(4,), dtype="f8")  # in a MemoryStore of this process
    nodes, stores = rewrite(nodes_of(da.store(da.ones(8, chunks=4), z, compute=False)))
    assert stores  # not left to the workers, who would write into their own copies
    run_here(nodes, stores)
    np.testing.assert_array_equal(z[:], np.ones(8))


def test_the_stand_in_refuses_reads_of_unwritten_chunks():
    stand_in = DriverTarget(1, np.dtype("f8"), (8,))
    with pytest.raises(UnsupportedStoreTargetError, match="before the driver has written it"):
        stand_in[0:4]


def _keys_named(keys, prefix):
    return {k for k in keys if isinstance(k, tuple) and k[0].startswith(prefix)}


def test_stand_ins_returned_and_read_inside_a_task_are_told_apart():
    d = da.ones((4, 4), chunks=2)
    target = np.zeros((4, 4))
    stored = da.store(d + 1, target, compute=False, return_stored=True, load_stored=False)
    # Returned: the storing task's value is the stand-in; its consumers read the target.
    nodes, stores = rewrite(nodes_of(stored))
    assert stores.stand_ins and not stores.readers
    assert set(stores.originals) == stores.stand_ins
    # Read inside: dask fuses the + into the storing task.
    nodes, stores = rewrite(nodes_of(stored + 1))
    assert stores.readers == _keys_named(nodes, "add") and len(stores.readers) == 4
    assert not stores.stand_ins
    for k in stores.readers:  # the original node writes the real target itself
        assert stores.originals[k] is not nodes[k]
    run_here({k: stores.originals.get(k, n) for k, n in nodes.items()}, stores)
    np.testing.assert_array_equal(target, np.full((4, 4), 2.0))


def test_load_stored_keeps_everything_in_the_workers():
    stored = da.store(da.ones(8, chunks=4), np.zeros(8), compute=False, return_stored=True)
    _, stores = rewrite(nodes_of(stored + 1))
    assert not stores.stand_ins and not stores.readers
