from __future__ import annotations

import errno
import gc
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import shuffle._store
from shuffle._exceptions import BufferClosedError
from shuffle._ids import ShardKey
from shuffle._spill_file import SpillFile
from shuffle._store import DiskShardStore
from tests.shuffle.support import FakeDeviceArray, SlowDisk


def payload(key: ShardKey, nbytes: int) -> bytes:
    return bytes([key.output_partition % 256, key.input_partition % 256]) * (nbytes // 2)


def put(store: DiskShardStore, key: ShardKey, data: Any) -> bool:
    """Append as a receiving run does: then spill, if due, in this thread."""
    added = store.append(key, data)
    if store.spill_due:
        store.spill()
    return added


@pytest.mark.parametrize("memory_limit", [None, 0, 10, 1000])
def test_reads_return_shards_ordered_by_input_partition(
    spill_root: Path, memory_limit: int | None
) -> None:
    with DiskShardStore(memory_limit=memory_limit, directory=spill_root) as store:
        for source in (2, 0, 3, 1):  # arrival order differs from input order
            for partition in (0, 5):
                assert put(
                    store, ShardKey(partition, source), payload(ShardKey(partition, source), 8)
                )
        for partition in (0, 5):
            assert [bytes(p) for p in store.read(partition)] == [
                payload(ShardKey(partition, source), 8) for source in range(4)
            ]
        assert store.read(3) == []
        assert store.partitions == [0, 5]
        assert store.nbytes_memory + store.nbytes_disk == 64
        assert (store.directory is None) is (memory_limit in (None, 1000))


def test_spills_the_partition_holding_most_memory(spill_root: Path) -> None:
    # Budget 100, headroom 12: spilling starts above 88 and stops at 76 or below.
    with DiskShardStore(memory_limit=100, directory=spill_root) as store:
        put(store, ShardKey(0, 0), b"a" * 30)
        put(store, ShardKey(1, 0), b"b" * 55)
        assert store.directory is None and not store.spill_due
        put(store, ShardKey(0, 1), b"c" * 20)  # 105 bytes: partition 1 goes to disk
        assert (store.nbytes_memory, store.nbytes_disk) == (50, 55)
        assert store.directory is not None
        assert sorted(p.name for p in store.directory.iterdir()) == ["1.bin"]
        put(store, ShardKey(1, 1), b"d" * 70)  # 120 bytes: partition 1 again, appended
        assert (store.nbytes_memory, store.nbytes_disk) == (50, 125)
        assert [bytes(p) for p in store.read(1)] == [b"b" * 55, b"d" * 70]
        assert [bytes(p) for p in store.read(0)] == [b"a" * 30, b"c" * 20]
        # Cumulative counters for monitoring: spilled, read back from disk (partition 0
        # was read from memory), and kept after cleanup.
        assert (store.bytes_spilled, store.bytes_read_back) == (125, 125)
        store.cleanup()
        assert (store.nbytes_disk, store.bytes_spilled, store.bytes_read_back) == (0, 125, 125)


def test_appends_never_write_and_over_limit_says_when_to_wait(spill_root: Path) -> None:
    with DiskShardStore(memory_limit=100, directory=spill_root) as store:
        store.append(ShardKey(0, 0), b"a" * 80)
        assert not store.spill_due and not store.over_limit
        store.append(ShardKey(1, 0), b"b" * 30)  # 110: past the budget, still in memory
        assert store.spill_due and store.over_limit
        assert (store.nbytes_memory, store.directory) == (110, None)
        store.spill()
        assert (store.nbytes_memory, store.nbytes_disk) == (30, 80)
        assert not store.spill_due and not store.over_limit
    with DiskShardStore(memory_limit=None, directory=spill_root) as unlimited:
        unlimited.append(ShardKey(0, 0), b"a" * 10**6)
        unlimited.spill()
        assert not unlimited.spill_due and not unlimited.over_limit
        assert unlimited.directory is None


class _WaitSignalled(threading.Condition):
    """A condition that says when somebody waits on it."""

    def __init__(self, lock: Any) -> None:
        super().__init__(lock)
        self.waiting = threading.Event()

    def wait(self, timeout: float | None = None) -> bool:
        self.waiting.set()
        return super().wait(timeout)


def test_a_write_holds_no_lock_and_a_read_of_its_partition_waits_for_it(
    spill_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = SlowDisk(monkeypatch)
    with DiskShardStore(memory_limit=100, directory=spill_root) as store:
        written = store._written = _WaitSignalled(store._lock)
        store.append(ShardKey(1, 0), b"b" * 90)
        with ThreadPoolExecutor(2) as pool:
            spill = pool.submit(store.spill)
            assert disk.writing.wait(30)
            # Partition 1 is being written: appends and its size go on meanwhile.
            assert not store.spill_due  # what is being written does not count again
            assert store.append(ShardKey(0, 0), b"a" * 30)
            assert store.over_limit and store.nbytes_of(1) == 90
            assert store.partitions == [0, 1]
            read = pool.submit(store.read_items, 1, release=True)
            assert written.waiting.wait(30)  # the reader waits for the write
            disk.release.set()
            spill.result(30)
            assert [bytes(p) for _, p in read.result(30)] == [b"b" * 90]
        assert (store.nbytes_memory, store.nbytes_disk, store.bytes_read_back) == (30, 0, 90)


def test_a_missing_spill_directory_is_created(spill_root: Path) -> None:
    parent = spill_root / "not" / "there"
    with DiskShardStore(memory_limit=0, directory=parent) as store:
        put(store, ShardKey(0, 0), b"piece")
        assert [bytes(p) for p in store.read(0)] == [b"piece"]
        assert len(list(parent.iterdir())) == 1  # the store's own folder, in it
    assert list(parent.iterdir()) == []
    for folder in (parent, parent.parent):  # what the store created, the test removes
        folder.rmdir()


def test_duplicate_keys_are_dropped(spill_root: Path) -> None:
    with DiskShardStore(memory_limit=0, directory=spill_root) as store:
        assert put(store, ShardKey(1, 4), b"first")
        assert not put(store, ShardKey(1, 4), b"retried")  # a retried transfer task
        assert [bytes(p) for p in store.read(1)] == [b"first"]
        assert store.nbytes_disk == 5


@pytest.mark.parametrize("memory_limit", [None, 0, 25, 1000])
def test_append_many_matches_one_append_per_shard(
    spill_root: Path, memory_limit: int | None
) -> None:
    keys = [ShardKey(p, i) for i in (1, 0) for p in (0, 3, 5)] + [ShardKey(3, 1)]  # one repeat
    with (
        DiskShardStore(memory_limit=memory_limit, directory=spill_root) as batched,
        DiskShardStore(memory_limit=memory_limit, directory=spill_root) as single,
    ):
        added = batched.append_many([(k, payload(k, 8), 8) for k in keys])
        if batched.spill_due:
            batched.spill()
        assert added == [put(single, k, payload(k, 8)) for k in keys]
        assert added == [True] * 6 + [False]
        for p in (0, 3, 5):
            assert [bytes(b) for b in batched.read(p)] == [bytes(b) for b in single.read(p)]
        assert (batched.nbytes_memory, batched.nbytes_disk) == (
            single.nbytes_memory,
            single.nbytes_disk,
        )
        assert batched.nbytes_memory <= (memory_limit if memory_limit is not None else 48)
    batched.cleanup()
    with pytest.raises(BufferClosedError):
        batched.append_many([(ShardKey(0, 9), b"x", 1)])


def test_memory_shards_are_kept_by_reference() -> None:
    data = bytearray(b"zero-copy")
    with DiskShardStore(memory_limit=None) as store:
        store.append(ShardKey(0, 0), data)
        assert store.read(0)[0] is data


def test_cleanup_is_idempotent_and_final(spill_root: Path) -> None:
    store = DiskShardStore(memory_limit=0, directory=spill_root, name="run-7")
    put(store, ShardKey(0, 0), b"x" * 10)
    directory = store.directory
    assert directory is not None and directory.parent == spill_root
    store.cleanup()
    store.cleanup()
    assert not directory.exists() and store.directory is None
    assert (store.nbytes_memory, store.nbytes_disk) == (0, 0)
    with pytest.raises(BufferClosedError, match="'run-7' is closed"):
        store.append(ShardKey(0, 1), b"y")
    with pytest.raises(BufferClosedError):
        store.read(0)


def test_forgotten_store_removes_its_directory(spill_root: Path) -> None:
    store = DiskShardStore(memory_limit=0, directory=spill_root)
    put(store, ShardKey(0, 0), b"x")
    directory = store.directory
    del store
    gc.collect()
    assert directory is not None and not directory.exists()


def test_a_failed_spill_keeps_its_shards_in_memory(
    spill_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(*args: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device")

    with DiskShardStore(memory_limit=0, directory=spill_root) as store:
        put(store, ShardKey(0, 0), b"a" * 4)
        monkeypatch.setattr(SpillFile, "append", disk_full)
        with pytest.raises(OSError, match="No space left"):
            put(store, ShardKey(0, 1), b"b" * 4)
        assert (store.nbytes_memory, store.nbytes_disk, store.nbytes_of(0)) == (4, 4, 8)
        monkeypatch.undo()
        put(store, ShardKey(0, 2), b"c" * 4)  # space again: the backlog spills
        assert (store.nbytes_memory, store.nbytes_disk) == (0, 12)
        assert [bytes(p) for p in store.read(0)] == [b"a" * 4, b"b" * 4, b"c" * 4]


def test_concurrent_appends_from_threads(spill_root: Path) -> None:
    keys = [ShardKey(p, s) for p in range(8) for s in range(50)]
    with DiskShardStore(memory_limit=500, directory=spill_root) as store:
        with ThreadPoolExecutor(4) as pool:
            added = list(pool.map(lambda k: put(store, k, payload(k, 16)), keys))
        assert all(added)
        for p in range(8):
            assert [bytes(x) for x in store.read(p)] == [
                payload(ShardKey(p, s), 16) for s in range(50)
            ]


def test_rejects_negative_memory_limit() -> None:
    with pytest.raises(ValueError, match="memory_limit must be >= 0, got -1"):
        DiskShardStore(memory_limit=-1)


@settings(
    deadline=None, max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    appends=st.lists(
        st.tuples(st.integers(0, 5), st.integers(0, 9), st.integers(0, 64)), max_size=60
    ),
    memory_limit=st.one_of(st.none(), st.integers(0, 300)),
)
def test_store_behaves_like_a_dict_of_sorted_lists(
    tmp_path: Path, appends: list[tuple[int, int, int]], memory_limit: int | None
) -> None:
    expected: dict[ShardKey, bytes] = {}
    store = DiskShardStore(memory_limit=memory_limit, directory=tmp_path)
    try:
        for out, inp, nbytes in appends:
            key = ShardKey(out, inp)
            data = payload(key, nbytes)
            assert put(store, key, data) is (key not in expected)
            expected.setdefault(key, data)
            assert memory_limit is None or store.nbytes_memory <= memory_limit
        for partition in range(6):
            want = [expected[k] for k in sorted(expected) if k.output_partition == partition]
            assert [bytes(p) for p in store.read(partition)] == want
        assert store.nbytes_memory + store.nbytes_disk == sum(map(len, expected.values()))
    finally:
        store.cleanup()
    assert list(tmp_path.iterdir()) == []


def test_device_shards_are_held_as_they_are_and_never_spilled(tmp_path: Path) -> None:
    store = DiskShardStore(memory_limit=0, directory=tmp_path)  # host shards spill at once
    gpu = FakeDeviceArray(np.zeros(1000, np.uint8))
    assert put(store, ShardKey(0, 1), gpu)
    assert put(store, ShardKey(0, 0), b"host")
    assert not put(store, ShardKey(0, 1), FakeDeviceArray(np.zeros(5, np.uint8)))  # a duplicate
    assert store.nbytes_device == 1000 and store.nbytes_memory == 0 and store.nbytes_disk == 4
    first, second = store.read(0)
    assert bytes(first) == b"host" and second is gpu  # input order, device buffer untouched
    assert store.partitions == [0]
    store.cleanup()
    assert store.nbytes_device == 0 and list(tmp_path.iterdir()) == []


def test_a_released_read_reads_back_only_its_partition_and_forgets_it(spill_root: Path) -> None:
    with DiskShardStore(memory_limit=100, directory=spill_root) as store:
        put(store, ShardKey(0, 0), b"a" * 30)
        put(store, ShardKey(1, 0), b"b" * 55)
        put(store, ShardKey(0, 1), b"c" * 20)  # partition 1 spills
        put(store, ShardKey(2, 0), b"d" * 10)
        put(store, ShardKey(1, 1), b"e" * 70)  # partition 1 again: 2 shards on disk
        assert (store.nbytes_memory, store.nbytes_disk) == (60, 125)
        read = [bytes(p) for _, p in store.read_items(1, release=True)]
        assert read == [b"b" * 55, b"e" * 70]
        assert store.bytes_read_back == 125  # partition 1's file, nothing else
        assert (store.nbytes_memory, store.nbytes_disk) == (60, 0)
        assert store.partitions == [0, 2]
        assert list(store.directory.iterdir()) == []  # its spill file is gone
        assert [bytes(p) for _, p in store.read_items(0, release=True)] == [b"a" * 30, b"c" * 20]
        assert (store.nbytes_memory, store.nbytes_disk) == (10, 0)
        # Keys stay known: a late duplicate of a released shard is not stored again.
        assert not store.append(ShardKey(0, 0), b"a" * 30)
        assert store.read(0) == []
        assert store.read(2) == [b"d" * 10]  # a plain read keeps the shards
        assert store.nbytes_memory == 10


class _Clock:
    """A perf_counter that advances one second per call."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        self.now += 1.0
        return self.now


def test_spill_writes_and_read_backs_are_timed(
    spill_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shuffle._store, "time", _Clock())
    with DiskShardStore(memory_limit=50, directory=spill_root) as store:
        put(store, ShardKey(0, 0), b"a" * 40)
        assert (store.seconds_spilling, store.seconds_reading_back) == (0.0, 0.0)
        put(store, ShardKey(1, 0), b"b" * 20)  # 60 bytes: one spill, one clock tick
        assert store.seconds_spilling == 1.0
        store.read_items(1, release=True)  # from memory: not timed
        store.read_items(0, release=True)  # from its spill file
        assert (store.seconds_spilling, store.seconds_reading_back) == (1.0, 1.0)
