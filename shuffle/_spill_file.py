"""Spill files: append shards to one and read it back, past the page cache if possible.

A spill exists because the data do not fit in memory, so caching it in the page cache
only delays the disk: buffered writes ran at 0.2-0.35 GB/s on a VM whose disk takes
1.5 GB/s with ``O_DIRECT`` (a 4 GiB ``dd``, and 8 GiB shuffles through this module).
So where the file system accepts ``O_DIRECT`` (Linux; not tmpfs), ``SpillFile``
copies shards into a page-aligned staging buffer and writes it in aligned blocks,
each append starting at an aligned offset (at most one block of padding per append),
and reads a file back into page-aligned anonymous memory. Elsewhere, or if the file
system refuses, it writes and reads through the page cache. Blocking I/O: call it
from a thread.

A read-back buffer becomes the memory of the shards read into it: their Arrow
buffers, and through zero-copy conversions even an output's columns, point into it.
A fresh buffer per read made the kernel fault in and zero every page of every read
(an 8 GiB shuffle read 8.9 GB back: 2.2 million page faults in the actor), so a
``SpillFile`` keeps up to two read buffers of at most 256 MiB (``_ReadBuffers``)
and reads into one that nothing references any more, which the two outputs built at
a time past the budget leave free most of the time. They are memory outside the
store's budget until the store is cleaned up.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["ALIGN", "SpillFile"]

#: Offsets and lengths of direct I/O are multiples of this (the usual page and the
#: largest common logical block size).
ALIGN = 4096
_STAGE_BYTES = 8 * 2**20
#: Read buffers a ``SpillFile`` keeps for reuse: the outputs built at a time.
_KEPT_READ_BUFFERS = 2
#: A larger read buffer is not kept: what a store keeps is memory outside its budget.
_MAX_KEPT_BYTES = 256 * 2**20
#: Read buffers are sized in these steps, so that partitions of similar size share them.
_READ_STEP = 8 * 2**20
_DIRECT = getattr(os, "O_DIRECT", 0)


class SpillFile:
    """Appends and reads of a store's spill files; one writer at a time.

    ``direct``: ``None`` until the first append tried ``O_DIRECT``, then whether the
    file system took it. ``direct=False`` never tries.
    """

    def __init__(self, *, direct: bool | None = None) -> None:
        self.direct = direct if _DIRECT else False
        self._stage: mmap.mmap | None = None
        self._reads = _ReadBuffers(_KEPT_READ_BUFFERS, max_bytes=_MAX_KEPT_BYTES)

    def append(self, path: Path, buffers: Sequence[Any], end: int) -> tuple[list[int], int]:
        """Write ``buffers`` at offset ``end`` of ``path`` (the end a previous append
        returned, 0 for a new file); returns each buffer's offset and the new end.

        A failed append truncates the file back to ``end`` and raises.
        """
        try:
            if self.direct is not False:
                try:
                    return self._append_direct(path, buffers, end)
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise
                    self.direct = False  # this file system takes no O_DIRECT
                    with contextlib.suppress(FileNotFoundError):
                        os.truncate(path, end)  # what a refused write may have left
            return _append_buffered(path, buffers, end)
        except BaseException:
            with contextlib.suppress(OSError):
                os.truncate(path, end)
            raise

    def read(self, path: Path, end: int) -> memoryview:
        """The first ``end`` bytes of ``path`` (offsets from ``append`` index it)."""
        if self.direct:
            try:
                size = -(-end // ALIGN) * ALIGN
                return _read_direct(path, end, size, self._reads.take(size))
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
        with open(path, "rb") as f:
            data = f.read(end)
        if len(data) < end:
            raise OSError(errno.EIO, f"{path}: {end} bytes expected, the file has {len(data)}")
        return memoryview(data)

    def close(self) -> None:
        """Free the staging buffer and the kept read buffers that nothing references
        (a later append or read allocates others)."""
        if self._stage is not None:
            self._stage.close()
            self._stage = None
        self._reads.clear()

    def _append_direct(self, path: Path, buffers: Sequence[Any], end: int) -> tuple[list[int], int]:
        if end % ALIGN:
            raise ValueError(f"{path}: direct appends start at a multiple of {ALIGN}, got {end}")
        import numpy as np  # here: the driver imports the store, not the spill path

        fd = os.open(path, os.O_WRONLY | os.O_CREAT | _DIRECT, 0o600)
        self.direct = True
        try:
            if self._stage is None:
                self._stage = _anonymous(_STAGE_BYTES)  # page-aligned, as O_DIRECT needs
            stage = np.frombuffer(self._stage, np.uint8)
            offsets, fill, at = [], 0, end
            for buffer in buffers:
                offsets.append(at + fill)
                # numpy's copy releases the GIL: the receiving loop goes on meanwhile.
                src = np.frombuffer(buffer, np.uint8)
                pos = 0
                while pos < len(src):
                    n = min(len(src) - pos, _STAGE_BYTES - fill)
                    stage[fill : fill + n] = src[pos : pos + n]
                    fill, pos = fill + n, pos + n
                    if fill == _STAGE_BYTES:
                        _write_all(fd, self._stage, _STAGE_BYTES, at)
                        at, fill = at + _STAGE_BYTES, 0
            if fill:
                padded = -(-fill // ALIGN) * ALIGN
                stage[fill:padded] = 0
                _write_all(fd, self._stage, padded, at)
                at += padded
            return offsets, at
        finally:
            os.close(fd)


def _append_buffered(path: Path, buffers: Sequence[Any], end: int) -> tuple[list[int], int]:
    offsets = []
    with open(path, "r+b" if end else "wb") as f:
        f.seek(end)
        for buffer in buffers:
            offsets.append(f.tell())
            f.write(buffer)
        return offsets, f.tell()


def _write_all(fd: int, stage: mmap.mmap, nbytes: int, offset: int) -> None:
    view = memoryview(stage)
    done = 0
    while done < nbytes:
        n = os.pwrite(fd, view[done:nbytes], offset + done)
        if n <= 0:
            raise OSError(errno.EIO, f"short write at offset {offset + done}")
        done += n


def _anonymous(nbytes: int) -> mmap.mmap:
    """Page-aligned private memory. Python's default for ``mmap(-1, ...)`` is shared
    memory, which the kernel backs like a tmpfs file: a 64 MiB direct read into it
    took 42 ms of system time against 26 ms into private memory."""
    return mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE)


class _ReadBuffers:
    """Page-aligned read buffers, reused once nothing references them (module doc).

    Every view of a buffer, and so every Arrow buffer or array made from one, holds a
    reference to it; a kept buffer whose only reference is this list is free (CPython
    reference counts, exact and immediate; a new reference can only come from an
    existing one, so a free buffer stays free until handed out).
    """

    def __init__(self, keep: int, *, max_bytes: int) -> None:
        self._keep = keep
        self._max_bytes = max_bytes
        self._kept: list[mmap.mmap] = []
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> mmap.mmap:
        """A buffer of at least ``nbytes``: the smallest free kept one that fits, else
        a new one, kept if there is room or in place of a free one too small."""
        with self._lock:
            fits, small = None, None
            for i in range(len(self._kept)):
                if sys.getrefcount(self._kept[i]) != 2:  # this list's and the argument's
                    continue  # in use
                if len(self._kept[i]) < nbytes:
                    small = i
                elif fits is None or len(self._kept[i]) < len(self._kept[fits]):
                    fits = i
            if fits is not None:
                return self._kept[fits]
            buffer = _anonymous(max(-(-nbytes // _READ_STEP) * _READ_STEP, _READ_STEP))
            if len(buffer) <= self._max_bytes:
                if len(self._kept) < self._keep:
                    self._kept.append(buffer)
                elif small is not None:
                    self._kept[small] = buffer
            return buffer

    def clear(self) -> None:
        """Forget the kept buffers; one still referenced lives until its last view."""
        with self._lock:
            self._kept.clear()


def _read_direct(path: Path, end: int, size: int, buffer: mmap.mmap) -> memoryview:
    view = memoryview(buffer)
    fd = os.open(path, os.O_RDONLY | _DIRECT)
    try:
        got = 0
        while got < end:
            n = os.preadv(fd, [view[got:size]], got)
            if n <= 0:
                raise OSError(errno.EIO, f"{path}: {end} bytes expected, the file has {got}")
            got += n
    finally:
        os.close(fd)
    return view[:end]
