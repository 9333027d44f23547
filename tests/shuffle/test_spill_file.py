from __future__ import annotations

import errno
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import shuffle._spill_file as spill_file
from shuffle._spill_file import ALIGN, SpillFile


def _takes_direct_io(directory: Path) -> bool:
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return False
    probe = directory / "probe"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | flag, 0o600))
    except OSError:
        return False
    finally:
        probe.unlink(missing_ok=True)
    return True


def _buffers(seed: int, sizes: list[int]) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in sizes]


@pytest.fixture
def small_stage(monkeypatch: pytest.MonkeyPatch) -> None:
    """A staging buffer of two blocks, so that appends cross it several times."""
    monkeypatch.setattr(spill_file, "_STAGE_BYTES", 2 * ALIGN)


@pytest.mark.usefixtures("small_stage")
@pytest.mark.parametrize("direct", [None, False])
def test_appends_read_back_at_their_offsets(tmp_path: Path, direct: bool | None) -> None:
    files = SpillFile(direct=direct)
    path = tmp_path / "0.bin"
    first = _buffers(0, [10, 0, 3 * ALIGN + 5, ALIGN])
    second = _buffers(1, [7, 2 * ALIGN])
    offsets, end = files.append(path, first, 0)
    more, end = files.append(path, second, end)
    expect_direct = direct is None and _takes_direct_io(tmp_path)
    assert files.direct is expect_direct
    if expect_direct:  # every append starts on a block: the second after padding
        assert more[0] % ALIGN == 0 and end % ALIGN == 0
        assert more[0] >= offsets[-1] + len(first[-1])
    else:  # through the page cache: packed
        assert more[0] == offsets[-1] + len(first[-1]) and end == os.path.getsize(path)
    data = files.read(path, end)
    for buffer, offset in zip(first + second, offsets + more, strict=True):
        assert bytes(data[offset : offset + len(buffer)]) == buffer
    files.close()
    files.append(path, [b"after close"], end)  # a new staging buffer
    files.close()


def test_a_file_system_without_direct_io_is_written_through_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        pytest.skip("no O_DIRECT on this platform")
    real_open = os.open

    def refuse_direct(path: Any, flags: int, *args: Any) -> int:
        if flags & flag:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refuse_direct)
    files = SpillFile()
    path = tmp_path / "0.bin"
    (buffer,) = _buffers(2, [ALIGN + 3])
    offsets, end = files.append(path, [buffer], 0)
    assert files.direct is False and (offsets, end) == ([0], ALIGN + 3)
    assert bytes(files.read(path, end)) == buffer


@pytest.mark.usefixtures("small_stage")
@pytest.mark.parametrize("direct", [None, False])
def test_a_failed_append_leaves_the_file_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct: bool | None
) -> None:
    files = SpillFile(direct=direct)
    path = tmp_path / "0.bin"
    (kept,) = _buffers(3, [100])
    _, end = files.append(path, [kept], 0)
    size = os.path.getsize(path)
    real_pwrite = os.pwrite

    def pwrite_then_full(fd: int, data: Any, offset: int) -> int:
        real_pwrite(fd, data, offset)  # a partial write landed before the disk filled
        raise OSError(errno.ENOSPC, "No space left on device")

    class FullFile(io.FileIO):
        def write(self, data: Any) -> int:
            super().write(data)
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", pwrite_then_full)
    monkeypatch.setattr(spill_file, "open", FullFile, raising=False)
    with pytest.raises(OSError, match="No space left"):
        files.append(path, _buffers(4, [3 * ALIGN]), end)
    assert os.path.getsize(path) == size
    monkeypatch.undo()
    (later,) = _buffers(5, [50])
    (offset,), end = files.append(path, [later], end)
    data = files.read(path, end)
    assert bytes(data[:100]) == kept and bytes(data[offset : offset + 50]) == later


@pytest.mark.parametrize("direct", [None, False])
def test_a_file_shorter_than_its_records_is_an_error(tmp_path: Path, direct: bool | None) -> None:
    files = SpillFile(direct=direct)
    path = tmp_path / "0.bin"
    _, end = files.append(path, _buffers(6, [3 * ALIGN]), 0)
    os.truncate(path, ALIGN)  # lost under the store's feet
    with pytest.raises(OSError, match="bytes expected"):
        files.read(path, end)


def test_a_read_reuses_a_buffer_only_once_nothing_references_it(tmp_path: Path) -> None:
    if not _takes_direct_io(tmp_path):
        pytest.skip("read buffers are kept for direct reads only")
    files = SpillFile()
    contents = _buffers(2, [3 * ALIGN + 1, 2 * ALIGN, 5 * ALIGN, ALIGN])
    ends = []
    for i, data in enumerate(contents):
        _, end = files.append(tmp_path / f"{i}.bin", [data], 0)
        ends.append(end)

    def read(i: int) -> memoryview:
        return files.read(tmp_path / f"{i}.bin", ends[i])

    first, second = read(0), read(1)
    a, b = id(first.obj), id(second.obj)  # ids: a reference would keep them in use
    assert a != b  # both held: two buffers
    held = first[2:10]  # a slice keeps the whole buffer in use
    del first
    third = read(2)
    assert id(third.obj) not in (a, b)  # neither is free: a new one
    del second
    fourth = read(3)
    assert id(fourth.obj) == b  # free again: read into, not allocated anew
    assert bytes(fourth) == contents[3] and bytes(third) == contents[2]
    assert bytes(held) == contents[0][2:10]  # never overwritten while in use
    files.close()


def test_read_buffers_hand_out_the_smallest_free_one_and_keep_few_and_small() -> None:
    step = spill_file._READ_STEP
    buffers = spill_file._ReadBuffers(2, max_bytes=3 * step)
    a = buffers.take(2 * step)  # kept
    b = buffers.take(step)  # kept
    a_id, b_id = id(a), id(b)
    del a, b
    assert id(buffers.take(step // 2)) == b_id  # the smallest that fits
    assert id(buffers.take(step + 1)) == a_id  # b would not fit
    held = buffers.take(step)  # b, now in use
    c = buffers.take(step)  # a is free and fits
    assert id(c) == a_id and id(held) == b_id
    d = buffers.take(step)  # both in use: a new one, not kept (no room)
    assert id(d) not in (a_id, b_id)
    del c
    big = buffers.take(3 * step)  # a is free but too small: replaced by this one
    big_id = id(big)
    del big, d
    assert id(buffers.take(3 * step)) == big_id
    huge = buffers.take(4 * step)  # over max_bytes: never kept
    assert len(huge) >= 4 * step and all(kept is not huge for kept in buffers._kept)
    buffers.clear()
    assert buffers._kept == []
