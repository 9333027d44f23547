"""The Arrow codec of dataframe pieces: record batches sharing one schema meta."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from shuffle._exceptions import FrameError
from shuffle._ids import RunId, ShardKey, ShuffleId
from shuffle._partition import concat_partition, sort_by_partition
from shuffle.wire._arrow import (
    ARROW_TAG,
    encode_slices,
    pieces_to_tables,
    schema_of,
    table_to_buffer,
)
from shuffle.wire._message import Piece, decode_message, encode_message
from tests.shuffle.support import split_by_partition


def frame(rows: int = 1000, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "k": rng.integers(0, 100, rows),
            "x": rng.random(rows),
            "s": pd.array([f"v{i}" if i % 7 else None for i in range(rows)], dtype="string"),
            "_partitions": rng.integers(0, 16, rows),
        },
        index=pd.RangeIndex(5, 5 + rows),
    )


def received(payload: object) -> object:
    """A payload as a receiver holds it: a fresh copy of its bytes (memory off the wire)."""
    data = payload.data if isinstance(payload, Piece) else payload
    return memoryview(bytearray(memoryview(data)))


def test_slices_share_one_meta_and_round_trip() -> None:
    df = frame()
    table, bounds = sort_by_partition(df, column="_partitions", npartitions=16)
    pieces = encode_slices(table, bounds)
    assert set(pieces) == set(bounds)
    metas = {id(p.meta) for p in pieces.values()}
    assert len(metas) == 1  # one bytes object: a message carries it once
    expected = split_by_partition(df, column="_partitions", npartitions=16)
    for partition, piece in pieces.items():
        assert piece.meta.startswith(ARROW_TAG)
        assert piece.nbytes == piece.data.size
        (out,) = pieces_to_tables([(piece.meta, received(piece))])
        assert out.equals(expected[partition])


def test_pieces_are_smaller_than_streams_and_their_schema_travels_once() -> None:
    df = frame(rows=4096)
    table, bounds = sort_by_partition(df, column="_partitions", npartitions=16)
    pieces = encode_slices(table, bounds)
    streams = {p: table_to_buffer(table.slice(a, b - a)) for p, (a, b) in bounds.items()}
    assert sum(p.nbytes for p in pieces.values()) < sum(s.size for s in streams.values())
    message = encode_message(
        shuffle_id=ShuffleId("s"),
        run_id=RunId(1),
        sender="t",
        shards=[(ShardKey(p, 0), piece) for p, piece in pieces.items()],
    )
    header = message.frames()[0]
    meta = next(iter(pieces.values())).meta
    assert len(meta) < len(header) < len(meta) + 64 * len(pieces)


def test_pieces_of_one_schema_make_one_table_in_the_given_order() -> None:
    parts = [frame(rows=50, seed=i).drop(columns="_partitions") for i in range(3)]
    pieces = []
    for part in parts:
        table = pa.Table.from_pandas(part, preserve_index=True)  # as senders do
        (piece,) = encode_slices(table, {0: (0, table.num_rows)}).values()
        pieces.append((piece.meta, received(piece)))
    tables = pieces_to_tables(pieces)
    assert len(tables) == 1
    out = concat_partition(tables, meta=parts[0].iloc[:0])
    pd.testing.assert_frame_equal(out, pd.concat(parts))


def test_pieces_of_different_schemas_and_streams_are_unified_in_order() -> None:
    ints = pd.DataFrame({"a": [1, 2], "b": [None, None]}, index=pd.RangeIndex(0, 2))
    texts = pd.DataFrame({"a": [3], "b": ["x"]}, index=pd.RangeIndex(2, 3))
    cats = pd.DataFrame({"a": [4], "b": ["y"]}, index=pd.RangeIndex(3, 4))
    pieces = []
    for part in (ints, texts):
        table = pa.Table.from_pandas(part, preserve_index=True)
        (piece,) = encode_slices(table, {0: (0, table.num_rows)}).values()
        pieces.append((piece.meta, received(piece)))
    assert pieces[0][0] != pieces[1][0]
    cats_table = pa.Table.from_pandas(cats, preserve_index=True)
    pieces.append((b"", received(table_to_buffer(cats_table))))
    tables = pieces_to_tables(pieces)
    assert len(tables) == 3
    meta = texts.iloc[:0]
    out = concat_partition(tables, meta=meta)
    assert out["a"].tolist() == [1, 2, 3, 4]
    assert out.index.tolist() == [0, 1, 2, 3]
    assert out["b"].tolist()[2:] == ["x", "y"]


def test_dictionary_columns_travel_as_streams() -> None:
    df = frame()
    df["c"] = pd.Categorical(np.where(df["k"] % 2 == 0, "even", "odd"))
    table, bounds = sort_by_partition(df, column="_partitions", npartitions=16)
    pieces = encode_slices(table, bounds)
    assert all(isinstance(p, pa.Buffer) for p in pieces.values())
    expected = split_by_partition(df, column="_partitions", npartitions=16)
    for partition, payload in pieces.items():
        (out,) = pieces_to_tables([(b"", received(payload))])
        assert out.equals(expected[partition])


def test_a_chunked_table_is_combined_into_one_batch() -> None:
    df = frame(rows=100).drop(columns="_partitions")
    table = pa.concat_tables(
        [pa.Table.from_pandas(df.iloc[:40]), pa.Table.from_pandas(df.iloc[40:])]
    )
    assert len(table.to_batches()) == 2
    pieces = encode_slices(table, {0: (30, 60), 1: (0, 30)})
    assert all(isinstance(p, Piece) for p in pieces.values())
    (out,) = pieces_to_tables([(pieces[0].meta, received(pieces[0]))])
    assert out.equals(table.slice(30, 30).combine_chunks())


def test_an_empty_table_has_no_pieces() -> None:
    table, bounds = sort_by_partition(frame().iloc[:0], column="_partitions", npartitions=4)
    assert bounds == {}
    assert encode_slices(table, bounds) == {}
    assert pieces_to_tables([]) == []


def piece_of(df: pd.DataFrame) -> Piece:
    table = pa.Table.from_pandas(df)
    (piece,) = encode_slices(table, {0: (0, table.num_rows)}).values()
    return piece


def test_a_corrupt_batch_is_a_frame_error() -> None:
    piece = piece_of(pd.DataFrame({"s": ["abc", "defg"] * 10}))
    data = bytearray(memoryview(piece.data))
    data[-20:] = b"\xff" * 20  # the string offsets
    with pytest.raises(FrameError, match="not a valid Arrow record batch"):
        pieces_to_tables([(piece.meta, memoryview(data))])
    with pytest.raises(FrameError, match="not a valid Arrow record batch"):
        pieces_to_tables([(piece.meta, memoryview(data[:10]))])


@pytest.mark.parametrize(
    ("meta", "message"),
    [
        (b"cudf\0xyz", "expected an Arrow schema"),
        (ARROW_TAG + b"\x00" * 16, "not valid Arrow IPC"),
        (
            ARROW_TAG
            + pa.schema([("c", pa.dictionary(pa.int8(), pa.string()))]).serialize().to_pybytes(),
            "may not have dictionary columns",
        ),
        (
            ARROW_TAG
            + pa.schema([("x", pa.int64())], metadata={"pandas": "{not json"})
            .serialize()
            .to_pybytes(),
            "not valid Arrow IPC",
        ),
    ],
    ids=["tag", "garbage", "dictionary", "pandas-json"],
)
def test_a_bad_schema_meta_is_a_frame_error(meta: bytes, message: str) -> None:
    piece = piece_of(pd.DataFrame({"x": [1, 2]}))
    with pytest.raises(FrameError, match=message):
        pieces_to_tables([(meta, received(piece))])
    with pytest.raises(FrameError, match=message):  # failures are not cached
        schema_of(meta)


def test_pieces_survive_the_wire_format() -> None:
    df = frame()
    table, bounds = sort_by_partition(df, column="_partitions", npartitions=16)
    pieces = encode_slices(table, bounds)
    message = encode_message(
        shuffle_id=ShuffleId("s"),
        run_id=RunId(1),
        sender="t",
        shards=[(ShardKey(p, 3), piece) for p, piece in pieces.items()],
    )
    frames = [bytes(memoryview(f)) for f in message.frames()]  # as if off the network
    decoded = decode_message(frames, npartitions_out=16)
    expected = split_by_partition(df, column="_partitions", npartitions=16)
    for entry, buffer in zip(decoded.header.entries, decoded.buffers, strict=True):
        (out,) = pieces_to_tables([(entry.meta, buffer)])
        assert out.equals(expected[entry.output_partition])
