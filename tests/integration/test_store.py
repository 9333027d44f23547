"""da.store into targets in the caller's memory: written on the driver as chunks arrive."""

from __future__ import annotations

import threading

import dask
import dask.array as da
import numpy as np
import pytest
from dask.utils import SerializableLock

import ray_oob_sched
from ray_oob_sched import UnsupportedStoreTargetError


@pytest.fixture
def source():
    data = np.arange(200 * 300, dtype="f8").reshape(200, 300)  # chunks above ~100 KiB
    return data, da.from_array(data, chunks=(50, 300)) * 2


@pytest.mark.parametrize("lock", [True, False, threading.Lock(), SerializableLock()])
def test_store_into_a_numpy_target(ray_get, source, lock):
    data, x = source
    target = np.zeros(x.shape)
    assert da.store(x, target, lock=lock) is None
    np.testing.assert_array_equal(target, data * 2)


def test_store_into_a_memmap(ray_get, source, tmp_path):
    data, x = source
    path = tmp_path / "out.dat"
    target = np.memmap(path, dtype="f8", mode="w+", shape=x.shape)
    x.store(target)
    target.flush()
    np.testing.assert_array_equal(np.memmap(path, dtype="f8", mode="r", shape=x.shape), data * 2)


def test_store_compute_false_then_compute(ray_get, source):
    data, x = source
    targets = np.zeros(x.shape), np.zeros(x.shape, dtype="f4")
    stored = da.store([x, x + 1], list(targets), compute=False)
    assert not targets[0].any()
    dask.compute(stored)
    np.testing.assert_array_equal(targets[0], data * 2)
    np.testing.assert_array_equal(targets[1], (data * 2 + 1).astype("f4"))


def test_store_regions(ray_get, source):
    data, x = source
    target = np.full((200, 600), -1.0)
    da.store(x, target, regions=(slice(None), slice(300, 600)))
    np.testing.assert_array_equal(target[:, 300:], data * 2)
    assert (target[:, :300] == -1).all()


def test_store_return_stored_without_compute(ray_get, source):
    data, x = source
    target = np.zeros(x.shape, dtype="i8")
    stored = da.store(x, target, return_stored=True, compute=False)
    out = (stored + 1).compute()
    np.testing.assert_array_equal(out, (data * 2).astype("i8") + 1)
    np.testing.assert_array_equal(target, (data * 2).astype("i8"))


def test_store_return_stored(ray_get, source):
    data, x = source
    target = np.zeros(x.shape)
    stored = da.store(x, target, return_stored=True)
    np.testing.assert_array_equal(target, data * 2)  # written at persist
    np.testing.assert_array_equal(stored.compute(), data * 2)
    np.testing.assert_array_equal((stored[10:20] + 1).compute(), data[10:20] * 2 + 1)


def test_store_into_a_delayed_target_fails_before_running(ray_get, source, tmp_path):
    _, x = source
    marker = tmp_path / "ran"

    def make_target():
        marker.touch()
        return np.zeros((200, 300))

    with pytest.raises(UnsupportedStoreTargetError, match="computed by a task"):
        da.store(x, dask.delayed(make_target)())
    assert not marker.exists()


class ListTarget:
    def __init__(self):
        self.items = []

    def __setitem__(self, index, value):
        self.items.append((index, np.array(value)))


def test_store_into_a_target_of_the_callers_own_class(ray_get, source):
    data, x = source
    expected = data * 2
    target = ListTarget()
    da.store(x, target)
    assert len(target.items) == x.npartitions
    out = np.zeros_like(expected)
    for index, value in target.items:
        out[index] = value
    np.testing.assert_array_equal(out, expected)


def test_store_into_a_zarr_array_in_memory(ray_get, source):
    zarr = pytest.importorskip("zarr")
    data, x = source
    expected = data * 2
    z = zarr.zeros(expected.shape, chunks=(50, 300), dtype=expected.dtype)  # a MemoryStore
    x.to_zarr(z)
    np.testing.assert_array_equal(z[:], expected)


def test_store_through_many_small_groups(ray_get):
    """Many groups through a small window: each group's chunks are written as it ends."""
    x = da.ones((400, 400), chunks=(10, 400))  # 40 chunks of 32 KB
    target = np.zeros(x.shape)
    with ray_oob_sched.enable(
        ray_oob_sched__scheduler__max_in_flight=2,
        ray_oob_sched__scheduler__fuse__max_tasks=2,
    ):
        da.store(x, target)
    assert (target == 1).all()
    assert ray_oob_sched.last_stats().ray_tasks > 2


@pytest.mark.parametrize("shards", [(18, 18), (12, 12)])
def test_chunks_smaller_than_the_shards_of_a_zarr_array_on_disk_are_all_written(
    ray_get, tmp_path, shards
):
    """Workers write zarr arrays on disk themselves; chunks that share a shard are
    written one after another (concurrent read-modify-writes of a shard lose data)."""
    zarr = pytest.importorskip("zarr", minversion="3.0.0")
    x = da.arange(3600, chunks=400).reshape(60, 60).rechunk(3) + 1.0
    x.to_zarr(str(tmp_path), mode="w", shards=shards)
    z = zarr.open_array(str(tmp_path))
    assert z.shards == shards
    np.testing.assert_array_equal(z[:], np.arange(1.0, 3601).reshape(60, 60))
