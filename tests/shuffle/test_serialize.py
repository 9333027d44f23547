from __future__ import annotations

import contextlib
import struct
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shuffle._exceptions import FrameError
from shuffle._ids import RunId, ShardKey, ShuffleId
from shuffle.wire._arrow import buffer_to_table, table_to_buffer
from shuffle.wire._memory import HOST_REGISTRY, MemoryHooks, MemoryType
from shuffle.wire._message import (
    MAGIC,
    MAX_META_NBYTES,
    PROTOCOL_VERSION,
    Entry,
    Header,
    Piece,
    allocate_buffers,
    decode_header,
    decode_message,
    encode_header,
    encode_message,
)


class FakeDeviceBuffer:
    """Stands in for device memory: deliberately no buffer protocol, like a CuPy array."""

    def __init__(self, data: bytes | int) -> None:
        self.data = bytearray(data)


FAKE_CUDA = MemoryHooks(
    owns=lambda obj: isinstance(obj, FakeDeviceBuffer),
    wrap=lambda obj: obj,
    nbytes=lambda obj: len(obj.data),
    allocate=FakeDeviceBuffer,
)
CUDA_REGISTRY = HOST_REGISTRY.with_hooks(MemoryType.CUDA, FAKE_CUDA)


def header(*entries: Entry, run_id: int = 7) -> Header:
    return Header(ShuffleId("shuffle-1"), RunId(run_id), "actor-0", tuple(entries))


VALID = encode_header(header(Entry(3, 0, 10), Entry(1, 2, 0), Entry(3, 1, 5, MemoryType.CUDA)))
FIXED = 6 + 16  # magic + version, then run_id, n_entries, two name lengths
NAMES_END = FIXED + len("shuffle-1") + len("actor-0")
ENTRY = 4 + 4 + 8 + 1 + 4  # output, input, nbytes, memory type, meta number


WITH_META = encode_header(header(Entry(0, 0, 4, meta=b"dtype")))


def patched(frame: bytes, offset: int, fmt: str, *values: Any) -> bytes:
    out = bytearray(frame)
    struct.pack_into(fmt, out, offset, *values)
    return bytes(out)


def test_message_round_trip_is_zero_copy_for_host() -> None:
    payloads: list[Any] = [bytearray(b"hello"), b"", np.arange(4, dtype=np.int32)]
    keys = [ShardKey(2, 0), ShardKey(0, 0), ShardKey(2, 1)]
    message = encode_message(
        shuffle_id=ShuffleId("s"),
        run_id=RunId(3),
        sender="actor-9",
        shards=zip(keys, payloads, strict=True),
    )
    assert [e.nbytes for e in message.header.entries] == [5, 0, 16]
    assert {e.memory_type for e in message.header.entries} == {MemoryType.HOST}
    payloads[0][0] = ord("j")  # wrapped, not copied
    frames = message.frames()
    decoded = decode_message(frames, npartitions_out=3)
    assert decoded.header == message.header
    assert [(k, bytes(b)) for k, b in decoded.shards()] == [
        (ShardKey(2, 0), b"jello"),
        (ShardKey(0, 0), b""),
        (ShardKey(2, 1), np.arange(4, dtype=np.int32).tobytes()),
    ]


@settings(max_examples=200)
@given(
    shuffle_id=st.text(min_size=1, max_size=40),
    sender=st.text(max_size=40),
    run_id=st.integers(1, 2**64 - 1),
    entries=st.dictionaries(
        st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
        st.tuples(st.integers(0, 2**20), st.sampled_from(MemoryType)),
        max_size=20,
    ),
)
def test_header_round_trip(
    shuffle_id: str,
    sender: str,
    run_id: int,
    entries: dict[tuple[int, int], tuple[int, MemoryType]],
) -> None:
    original = Header(
        ShuffleId(shuffle_id),
        RunId(run_id),
        sender,
        tuple(Entry(o, i, n, m) for (o, i), (n, m) in entries.items()),
    )
    assert decode_header(encode_header(original)) == original
    assert decode_header(memoryview(encode_header(original))) == original


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (header(Entry(-1, 0, 1)), r"partitions must lie in \[0, 2\*\*32\)"),
        (header(Entry(0, 2**32, 1)), r"partitions must lie in \[0, 2\*\*32\)"),
        (header(run_id=0), r"run_id must lie in \[1, 2\*\*64\)"),
        (Header(ShuffleId(""), RunId(1), "a", ()), "shuffle_id and sender must encode"),
        (Header(ShuffleId("s"), RunId(1), "x" * 70_000, ()), "shuffle_id and sender must"),
    ],
)
def test_encode_header_rejects_what_cannot_be_encoded(bad: Header, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        encode_header(bad)


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (b"", "truncated: 0 bytes"),
        (VALID[:5], "truncated: 5 bytes"),
        (b"XXXX" + VALID[4:], "bad magic b'XXXX'"),
        (
            patched(VALID, 4, "<H", PROTOCOL_VERSION + 1),
            f"protocol version {PROTOCOL_VERSION + 1}",
        ),
        (VALID[: FIXED - 1], f"truncated: {FIXED - 1} bytes, the fixed part"),
        (VALID[:-1], "the meta count is missing"),
        (VALID + b"\0", "announces 0 meta bytes, it carries 1"),
        (patched(VALID, 14, "<I", 4), "lengths do not add up"),
        (patched(VALID, 14, "<I", 2**32 - 1), "lengths do not add up"),
        (patched(VALID, 18, "<H", 2**16 - 1), "lengths do not add up"),
        (patched(VALID, 6, "<Q", 0), "run_id 0"),
        (patched(VALID, FIXED, "<B", 0xFF), "shuffle_id is not valid UTF-8"),
        (patched(VALID, NAMES_END - 1, "<B", 0xC3), "sender is not valid UTF-8"),
        (patched(VALID, NAMES_END + 16, "<B", 9), "entry 0 has unknown memory type code 9"),
        (
            patched(VALID, NAMES_END + ENTRY, "<II", 3, 0),
            r"entry 1 repeats shard \(output 3, input 0\)",
        ),
        (patched(VALID, NAMES_END + 8, "<Q", 2**63), "exceeds the limit"),
        (patched(VALID, NAMES_END + 17, "<I", 1), "entry 0 refers to meta 1, the header carries 0"),
        (patched(WITH_META, NAMES_END + ENTRY, "<I", 2**32 - 1), "4294967295 metas announced"),
        (patched(WITH_META, NAMES_END + ENTRY + 4, "<I", 2**31), "announces 2147483648 meta bytes"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_decode_header_rejects_malformed_frames(frame: bytes, message: str) -> None:
    with pytest.raises(FrameError, match=message):
        decode_header(frame)


def test_decode_header_rejects_empty_shuffle_id() -> None:
    frame = _START_AND(encode_header(header()), id_len=0)
    with pytest.raises(FrameError, match="shuffle_id is empty"):
        decode_header(frame)


def _START_AND(frame: bytes, *, id_len: int) -> bytes:
    """Rewrite the shuffle id length, moving its bytes into the sender name."""
    run_id, n, old_id_len, sender_len = struct.unpack_from("<QIHH", frame, 6)
    return patched(frame, 6, "<QIHH", run_id, n, id_len, sender_len + old_id_len - id_len)


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        ({"max_message_nbytes": 14}, "payload of at least 15 bytes exceeds the limit of 14"),
        ({"npartitions_out": 3}, "entry 0 targets output partition 3, but the run has 3"),
    ],
)
def test_decode_header_applies_limits(limits: dict[str, int], message: str) -> None:
    decode_header(VALID, max_message_nbytes=15, npartitions_out=4)
    with pytest.raises(FrameError, match=message):
        decode_header(VALID, **limits)


def test_decode_header_rejects_non_contiguous_buffers() -> None:
    with pytest.raises(FrameError, match="not a contiguous byte buffer"):
        decode_header(np.zeros((4, 40), dtype=np.uint8)[:, ::2])


@pytest.mark.parametrize(
    ("frames", "message"),
    [
        ([], "no header frame"),
        ([VALID], "announces 3 buffers, the message carries 0"),
        ([VALID, b"x" * 10, b"", FakeDeviceBuffer(4)], "buffer 2 holds 4 bytes, its entry says 5"),
        ([VALID, b"x" * 9, b"", FakeDeviceBuffer(5)], "buffer 0 holds 9 bytes, its entry says 10"),
        (
            [VALID, FakeDeviceBuffer(10), b"", FakeDeviceBuffer(5)],
            "buffer 0 is a FakeDeviceBuffer",
        ),
    ],
)
def test_decode_message_checks_buffers_against_header(frames: list[Any], message: str) -> None:
    with pytest.raises(FrameError, match=message):
        decode_message(frames, registry=CUDA_REGISTRY)


def test_device_memory_dispatches_through_registered_hooks() -> None:
    shards = [(ShardKey(0, 0), FakeDeviceBuffer(b"gpu!")), (ShardKey(1, 0), b"host")]
    message = encode_message(
        shuffle_id=ShuffleId("s"),
        run_id=RunId(1),
        sender="a",
        shards=shards,
        registry=CUDA_REGISTRY,
    )
    assert [(e.memory_type, e.nbytes) for e in message.header.entries] == [
        (MemoryType.CUDA, 4),
        (MemoryType.HOST, 4),
    ]
    assert message.buffers[0] is shards[0][1]  # handed to the transport as is
    # A receiver allocates each buffer in the announced memory, receives into it, decodes.
    received = decode_header(message.frames()[0])
    buffers = allocate_buffers(received, CUDA_REGISTRY)
    assert isinstance(buffers[0], FakeDeviceBuffer) and isinstance(buffers[1], memoryview)
    buffers[0].data[:] = b"gpu!"
    buffers[1][:] = b"host"
    decoded = decode_message([message.frames()[0], *buffers], registry=CUDA_REGISTRY)
    assert [
        bytes(b.data) if isinstance(b, FakeDeviceBuffer) else bytes(b) for b in decoded.buffers
    ] == [
        b"gpu!",
        b"host",
    ]


def test_device_hooks_are_asked_before_host() -> None:
    class HostVisibleDeviceBuffer(bytearray):
        pass

    hooks = MemoryHooks(
        owns=lambda obj: isinstance(obj, HostVisibleDeviceBuffer),
        wrap=memoryview,
        nbytes=len,
        allocate=HostVisibleDeviceBuffer,
    )
    registry = HOST_REGISTRY.with_hooks(MemoryType.CUDA, hooks)
    assert registry.memory_type_of(HostVisibleDeviceBuffer(3)) is MemoryType.CUDA
    assert registry.memory_type_of(bytearray(3)) is MemoryType.HOST


def test_host_registry_is_not_extended_in_place() -> None:
    assert CUDA_REGISTRY.hooks(MemoryType.CUDA) is FAKE_CUDA
    assert CUDA_REGISTRY.hooks("cuda") is FAKE_CUDA  # the transports' spelling
    with pytest.raises(LookupError, match="no hooks registered for 'cuda' memory"):
        HOST_REGISTRY.hooks(MemoryType.CUDA)
    with pytest.raises(TypeError, match="cannot send a FakeDeviceBuffer"):
        HOST_REGISTRY.memory_type_of(FakeDeviceBuffer(1))
    with pytest.raises(TypeError, match="cannot send a str"):
        HOST_REGISTRY.memory_type_of("text")


def test_receiver_without_device_hooks_rejects_device_frames() -> None:
    with pytest.raises(FrameError, match="entry 2: no hooks registered for 'cuda'"):
        allocate_buffers(decode_header(VALID))
    with pytest.raises(FrameError, match="entry 2: no hooks registered for 'cuda'"):
        decode_message([VALID, b"x" * 10, b"", b"y" * 5])


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_fuzz_random_header_bytes_only_raise_frame_error(data: bytes) -> None:
    for frame in (data, MAGIC + struct.pack("<H", PROTOCOL_VERSION) + data):
        try:
            decoded = decode_header(frame, npartitions_out=1000)
        except FrameError:
            continue
        assert encode_header(decoded) == bytes(frame)  # anything accepted is canonical


@settings(max_examples=300)
@given(st.data())
def test_fuzz_corrupted_valid_headers_only_raise_frame_error(data: st.DataObject) -> None:
    frame = bytearray(VALID)
    for _ in range(data.draw(st.integers(1, 4))):
        frame[data.draw(st.integers(0, len(frame) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(frame)))
    for candidate in (bytes(frame), bytes(frame[:cut])):
        with contextlib.suppress(FrameError):
            decode_message([candidate, b"x" * 10, b"", b"y" * 5], registry=CUDA_REGISTRY)


def sample_table(nrows: int = 100) -> pa.Table:
    df = pd.DataFrame(
        {
            "i": np.arange(nrows),
            "s": pd.Series([f"row-{i}" if i % 7 else None for i in range(nrows)], dtype="str"),
            "c": pd.Categorical(["x", "y"] * (nrows // 2)),
            "t": pd.date_range("2024-01-01", periods=nrows, freq="h", tz="UTC"),
        }
    )
    return pa.Table.from_pandas(df)


def test_arrow_round_trip_aliases_received_memory() -> None:
    table = sample_table()
    received = bytearray(table_to_buffer(table).to_pybytes())  # as if off the network
    decoded = buffer_to_table(memoryview(received))
    assert decoded.equals(table)
    start = np.frombuffer(received, dtype=np.uint8).ctypes.data
    values = decoded.column("i").chunk(0).buffers()[1]
    assert start <= values.address < start + len(received)


def test_slices_serialise_only_their_rows() -> None:
    table = sample_table(100_000)
    assert table_to_buffer(table.slice(500, 10)).size < table_to_buffer(table).size / 100
    assert buffer_to_table(table_to_buffer(table.slice(500, 10))).equals(table.slice(500, 10))


def test_corrupt_pandas_metadata_is_a_frame_error_every_time() -> None:
    good = sample_table()
    bad = good.replace_schema_metadata({b"pandas": b'{"index_columns": ['})
    assert buffer_to_table(table_to_buffer(good)).schema.pandas_metadata is not None
    for _ in range(2):  # the check of known-good metadata is cached, failures are not
        with pytest.raises(FrameError, match="not a valid Arrow IPC stream"):
            buffer_to_table(table_to_buffer(bad))


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_fuzz_corrupted_arrow_payloads_only_raise_frame_error(data: st.DataObject) -> None:
    payload = bytearray(table_to_buffer(sample_table(8)).to_pybytes())
    for _ in range(data.draw(st.integers(1, 6))):
        payload[data.draw(st.integers(0, len(payload) - 1))] = data.draw(st.integers(0, 255))
    payload = payload[: data.draw(st.integers(0, len(payload)))]
    try:
        table = buffer_to_table(payload)
    except FrameError:
        return
    # Whatever validation lets through is structurally sound: every buffer can be read.
    assert buffer_to_table(table_to_buffer(table.combine_chunks())).equals(table)


@given(st.binary(max_size=200))
def test_fuzz_random_arrow_payloads_only_raise_frame_error(data: bytes) -> None:
    with contextlib.suppress(FrameError):
        buffer_to_table(data)


def test_pieces_carry_their_meta_through_the_header() -> None:
    data = bytearray(b"\1\2\3\4\5\6")
    message = encode_message(
        shuffle_id=ShuffleId("s"),
        run_id=RunId(1),
        sender="t",
        shards=[
            (ShardKey(0, 1), Piece(data, b'{"dtype": "<i2"}', 6)),
            (ShardKey(1, 1), b"plain"),
            (ShardKey(2, 1), Piece(bytearray(), b"x" * 300, 0)),
        ],
    )
    decoded = decode_message(message.frames())
    assert [e.meta for e in decoded.header.entries] == [b'{"dtype": "<i2"}', b"", b"x" * 300]
    assert [bytes(b) for b in decoded.buffers] == [bytes(data), b"plain", b""]
    assert decoded.buffers[0].obj is data  # the payload travels unwrapped, not copied


def test_a_meta_shared_by_entries_travels_once() -> None:
    schema = b"s" * 1000
    entries = [Entry(p, 0, 1, meta=schema) for p in range(50)] + [Entry(50, 0, 1, meta=b"x")]
    frame = encode_header(header(*entries))
    assert len(frame) < NAMES_END + 51 * ENTRY + 4 + 2 * 4 + 1001 + 1
    decoded = decode_header(frame)
    assert [e.meta for e in decoded.entries] == [e.meta for e in entries]
    assert len({id(e.meta) for e in decoded.entries[:50]}) == 1  # one object, one hash


def test_too_much_meta_is_refused_on_both_ends() -> None:
    big = Entry(0, 0, 0, meta=b"x" * (MAX_META_NBYTES + 1))
    with pytest.raises(ValueError, match="exceeds"):
        encode_header(header(big))
