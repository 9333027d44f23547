"""Receiver-side shard store: memory up to a byte budget, the rest spilled to disk.

Shards arrive keyed by ``ShardKey``. A key seen before is dropped, because a retried
transfer task resends pieces that may already have arrived. Appending never touches
the disk: once memory comes within ``headroom`` of the budget, ``spill()`` (run by the
owner in a thread, one at a time) appends the partitions holding the most memory to
their own files in a private temporary directory (large sequential writes, one file
per output partition) until memory is ``headroom`` below that mark, without holding
the lock while it writes. So the receiver keeps storing messages while the disk
writes, and waits for the disk only when memory passes the budget (``over_limit``).
Reads return the shards of one partition ordered by input partition, so the output
does not depend on arrival order; a releasing read (how outputs are unpacked) reads
back only that partition's file and drops its shards, so unpacking stays within the
budget. Device shards (objects exposing
``__cuda_array_interface__``) are held as they are and never spilled: the budget is
for host memory, and device memory is the device allocator's (RMM's) to manage.
``cleanup()`` deletes the directory; a ``weakref.finalize`` does the same if an owner
forgets.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shuffle._exceptions import BufferClosedError
from shuffle._ids import ShardKey
from shuffle._spill_file import SpillFile
from shuffle.device._cai import cai_nbytes
from shuffle.wire._memory import host_nbytes

__all__ = ["DiskShardStore", "remove_spill_directories", "spill_prefix"]

#: The most memory between the mark where spilling starts and the budget, and between
#: that mark and where a spill stops: the disk writes in steps of at least this much
#: (or an eighth of the budget), while messages keep arriving into the rest.
MAX_HEADROOM = 128 * 2**20


def spill_prefix(owner: str) -> str:
    """The name prefix of ``owner``'s spill directories, so that a successor on the same
    node can find what a dead owner left (``remove_spill_directories``)."""
    return f"shuffle-{re.sub(r'[^A-Za-z0-9_.-]', '_', owner)}@"


def remove_spill_directories(parent: str | os.PathLike[str] | None, owner: str) -> int:
    """Delete the spill directories of ``owner`` (a dead process) under ``parent``
    (default: the system's temp dir); returns how many there were."""
    base = Path(parent) if parent is not None else Path(tempfile.gettempdir())
    found = [p for p in base.glob(glob.escape(spill_prefix(owner)) + "*") if p.is_dir()]
    for path in found:
        shutil.rmtree(path, ignore_errors=True)
    return len(found)


class DiskShardStore:
    """Hold host shards per output partition within ``memory_limit`` bytes of memory.

    ``memory_limit=None`` never spills; ``0`` spills every shard. Appends only store;
    the owner calls ``spill()`` when ``spill_due`` says so (in a thread: it writes) and
    waits for it while ``over_limit``. ``directory`` is where the private temporary
    directory is created (default: the system's temp dir); it is created on the first
    spill only. Thread-safe, so I/O can run in an executor.
    """

    def __init__(
        self,
        *,
        memory_limit: int | None,
        directory: str | os.PathLike[str] | None = None,
        name: str = "shard-store",
        prefix: str = "shuffle-",
    ) -> None:
        if memory_limit is not None and memory_limit < 0:
            raise ValueError(f"store {name!r}: memory_limit must be >= 0, got {memory_limit}")
        self.name = name
        self._memory_limit = memory_limit
        self._parent = directory
        self._prefix = prefix
        self._directory: Path | None = None
        self._remove_directory: weakref.finalize[Any, Any] | None = None
        self._headroom = 0 if memory_limit is None else min(memory_limit // 8, MAX_HEADROOM)
        self._lock = threading.Lock()
        self._written = threading.Condition(self._lock)  # a partition's write finished
        self._spill_lock = threading.Lock()  # one writer: a file's appends stay in order
        self._writing: dict[int, int] = {}  # partition being written -> its bytes
        self._closed = False
        self._keys: set[ShardKey] = set()
        self._memory: dict[int, list[tuple[int, Any]]] = {}  # partition -> [(input, payload)]
        self._device: dict[int, list[tuple[int, Any]]] = {}  # the same, device memory
        self._memory_by_partition: dict[int, int] = {}
        self._disk: dict[int, list[tuple[int, int, int]]] = {}  # -> [(input, offset, nbytes)]
        self._file_sizes: dict[int, int] = {}  # bytes of shards in each file
        self._file_ends: dict[int, int] = {}  # where its next append starts (padding)
        self._files = SpillFile()
        self.nbytes_memory = 0
        self.nbytes_disk = 0
        self.nbytes_device = 0
        # Cumulative, kept by cleanup(): what monitoring reads (shuffle._usage).
        self.bytes_spilled = 0
        self.bytes_read_back = 0
        # Seconds spent writing spills and reading them back: the disk's share of a run.
        self.seconds_spilling = 0.0
        self.seconds_reading_back = 0.0

    def __repr__(self) -> str:
        return (
            f"<DiskShardStore {self.name!r} memory={self.nbytes_memory} "
            f"disk={self.nbytes_disk} closed={self._closed}>"
        )

    @property
    def directory(self) -> Path | None:
        """The spill directory, or ``None`` before the first spill and after cleanup."""
        return self._directory

    @property
    def partitions(self) -> list[int]:
        """Output partitions holding at least one shard, ascending."""
        with self._lock:
            keys = self._memory.keys() | self._disk.keys() | self._device.keys()
            return sorted(keys | self._writing.keys())

    @property
    def spill_due(self) -> bool:
        """Whether memory not already being written is within ``headroom`` of the budget."""
        limit = self._memory_limit
        if limit is None:
            return False
        with self._lock:
            writing = sum(self._writing.values())
            return self.nbytes_memory - writing > limit - self._headroom

    @property
    def over_limit(self) -> bool:
        """Whether memory is above the budget: the receiver waits for ``spill()``."""
        limit = self._memory_limit
        return limit is not None and self.nbytes_memory > limit

    def append(self, key: ShardKey, payload: Any) -> bool:
        """Store ``payload`` (kept by reference, never copied); ``False`` if ``key`` is known."""
        device = hasattr(payload, "__cuda_array_interface__")
        nbytes = cai_nbytes(payload.__cuda_array_interface__) if device else host_nbytes(payload)
        return self.append_many([(key, payload, nbytes)])[0]

    def append_many(self, shards: Sequence[tuple[ShardKey, Any, int]]) -> list[bool]:
        """``append`` for ``(key, payload, nbytes)`` triples under one lock: the receive
        path of a message of 256 small pieces. ``nbytes`` is the payload's size,
        already checked by the caller (the message decoder)."""
        added = []
        with self._lock:
            self._raise_if_closed()
            keys, memory, by_partition = self._keys, self._memory, self._memory_by_partition
            for key, payload, nbytes in shards:
                if key in keys:
                    added.append(False)
                    continue
                keys.add(key)
                added.append(True)
                partition = key.output_partition
                if hasattr(payload, "__cuda_array_interface__"):
                    self._device.setdefault(partition, []).append((key.input_partition, payload))
                    self.nbytes_device += nbytes
                    continue
                memory.setdefault(partition, []).append((key.input_partition, payload))
                by_partition[partition] = by_partition.get(partition, 0) + nbytes
                self.nbytes_memory += nbytes
        return added

    def spill(self) -> None:
        """Write the partitions holding the most memory to disk until memory not being
        written is ``headroom`` below the mark where spilling starts (``spill_due``).

        Blocks on disk I/O (run it in a thread); the lock is not held while writing,
        so appends and reads of other partitions go on. Concurrent calls take turns.
        A failed write leaves its shards in memory and its file as it was, and raises.
        """
        limit = self._memory_limit
        if limit is None:
            return
        target = max(limit - 2 * self._headroom, 0)
        with self._spill_lock:
            while True:
                with self._lock:
                    if self._closed or self.nbytes_memory <= target or not self._memory:
                        return
                    by_partition = self._memory_by_partition
                    partition = max(by_partition, key=by_partition.__getitem__)
                    shards = self._memory.pop(partition)
                    nbytes = by_partition.pop(partition)
                    self._writing[partition] = nbytes
                    path = self._spill_directory() / f"{partition}.bin"
                    end = self._file_ends.get(partition, 0)
                self._write(partition, shards, nbytes, path, end)

    def _write(
        self, partition: int, shards: list[tuple[int, Any]], nbytes: int, path: Path, end: int
    ) -> None:
        started = time.perf_counter()
        try:
            # A failed append leaves the file as it was; the shards stay in memory.
            offsets, end = self._files.append(path, [payload for _, payload in shards], end)
        except BaseException:
            with self._lock:
                del self._writing[partition]
                if not self._closed:
                    self._memory[partition] = shards + self._memory.get(partition, [])
                    by_partition = self._memory_by_partition
                    by_partition[partition] = by_partition.get(partition, 0) + nbytes
                self._written.notify_all()
            if self._closed:
                return  # cleanup removed the directory under the write: nothing to keep
            raise
        with self._lock:
            del self._writing[partition]
            self._written.notify_all()
            if self._closed:
                return
            records = self._disk.setdefault(partition, [])
            for (source, payload), offset in zip(shards, offsets, strict=True):
                records.append((source, offset, host_nbytes(payload)))
            self._file_sizes[partition] = self._file_sizes.get(partition, 0) + nbytes
            self._file_ends[partition] = end
            self.nbytes_memory -= nbytes
            self.nbytes_disk += nbytes
            self.bytes_spilled += nbytes
            self.seconds_spilling += time.perf_counter() - started

    def read(self, partition: int) -> list[Any]:
        """The shards of ``partition``, ordered by input partition; ``[]`` if none arrived."""
        return [payload for _, payload in self.read_items(partition)]

    def read_items(self, partition: int, *, release: bool = False) -> list[tuple[int, Any]]:
        """``(input partition, shard)`` of ``partition``, ordered by input partition.

        Only this partition's spill file is read back. ``release``: the store forgets
        the partition's shards in the same step (its memory is the caller's from then
        on, its spill file is deleted), so a store being unpacked holds at most its
        budget plus what its readers hold. Keys are kept: a late duplicate is still
        dropped rather than stored again.
        """
        with self._lock:
            while partition in self._writing and not self._closed:
                self._written.wait()  # its file is being appended to: read it whole
            self._raise_if_closed()
            shards: list[tuple[int, Any]] = list(self._memory.get(partition, ()))
            shards += self._device.get(partition, ())
            records = self._disk.get(partition)
            if records:
                assert self._directory is not None
                started = time.perf_counter()
                data = self._files.read(
                    self._directory / f"{partition}.bin", self._file_ends[partition]
                )
                # Read, not memory-mapped: a mapped spill file's pages stayed with the
                # actor while its output lived (8 GiB shuffle: 10.7 GB of actor memory
                # against 2.4 GB read).
                self.seconds_reading_back += time.perf_counter() - started
                self.bytes_read_back += sum(n for _, _, n in records)
                shards += [(source, data[start : start + n]) for source, start, n in records]
            if release:
                self._release(partition)
        shards.sort(key=lambda shard: shard[0])  # keys are unique, so this order is total
        return shards

    def nbytes_of(self, partition: int) -> int:
        """Host bytes ``partition`` holds, in memory and on disk: what reading it
        (``read_items``) hands to its reader."""
        with self._lock:
            held = self._memory_by_partition.get(partition, 0) + self._file_sizes.get(partition, 0)
            return held + self._writing.get(partition, 0)

    def _release(self, partition: int) -> None:
        self._memory.pop(partition, None)
        self.nbytes_memory -= self._memory_by_partition.pop(partition, 0)
        device = self._device.pop(partition, ())
        self.nbytes_device -= sum(cai_nbytes(p.__cuda_array_interface__) for _, p in device)
        if self._disk.pop(partition, None) is not None:
            assert self._directory is not None
            self.nbytes_disk -= self._file_sizes.pop(partition)
            del self._file_ends[partition]
            (self._directory / f"{partition}.bin").unlink(missing_ok=True)

    def cleanup(self) -> None:
        """Forget every shard and delete the spill directory; idempotent.

        Waits for a spill's write in progress (one partition's), so that no file is
        created in the directory while it is removed.
        """
        with self._lock:
            self._closed = True
            self._keys.clear()
            self._memory.clear()
            self._device.clear()
            self._memory_by_partition.clear()
            self._disk.clear()
            self._file_sizes.clear()
            self._file_ends.clear()
            self.nbytes_memory = self.nbytes_disk = self.nbytes_device = 0
            self._written.notify_all()  # readers waiting for a write raise "closed"
        with self._spill_lock, self._lock:  # the writer stops at its next step: closed
            self._files.close()
            if self._remove_directory is not None:
                self._remove_directory()
            self._directory = None

    def __enter__(self) -> DiskShardStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def _spill_directory(self) -> Path:
        if self._directory is None:
            if self._parent is not None:  # a configured spill directory may not exist yet
                Path(self._parent).mkdir(parents=True, exist_ok=True)
            self._directory = Path(tempfile.mkdtemp(prefix=self._prefix, dir=self._parent))
            self._remove_directory = weakref.finalize(
                self, shutil.rmtree, self._directory, ignore_errors=True
            )
        return self._directory

    def _raise_if_closed(self) -> None:
        if self._closed:
            raise BufferClosedError(self.name)
