"""Array rechunks without Ray: the geometry, the piece codec, and runs wired in memory.

Property-based: random shapes (1-d to 4-d, zero-length chunks included), random old
and new chunkings, random dtypes (structured and sub-array ones too). Every input chunk
is cut by ``split_chunk``, its pieces cross a simulated wire (bytes copied, meta
through a real message header), and ``assemble_chunk`` must rebuild exactly numpy's
slice of every output chunk.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shuffle._exceptions import FrameError
from shuffle._ids import RunId, ShardKey, ShuffleId
from shuffle._options import RunOptions
from shuffle._rechunk import RechunkLayout
from shuffle._run import ArrayRechunkRun, assemble_chunk
from shuffle._spec import ShuffleRunSpec
from shuffle._split import split_chunk
from shuffle.wire._message import decode_message, encode_message
from shuffle.wire._ndarray import decode_piece, encode_piece
from tests.shuffle.support import Network

DTYPES = [
    np.dtype("f8"),
    np.dtype(">i2"),
    np.dtype("u1"),
    np.dtype("?"),
    np.dtype("c16"),
    np.dtype("M8[ns]"),
    np.dtype("m8[s]"),
    np.dtype("U3"),
    np.dtype("S2"),
    np.dtype([("a", "<i4"), ("b", ">f8", (2,))]),
    np.dtype([("x", "f4"), ("y", "i1")], align=True),
    np.dtype([("n", [("p", "u2"), ("q", "f2")])]),
]


def chunking(length: int) -> st.SearchStrategy[tuple[int, ...]]:
    """Random chunk lengths summing to ``length``, zero-length chunks allowed."""

    @st.composite
    def build(draw: st.DrawFn) -> tuple[int, ...]:
        cuts = draw(st.lists(st.integers(0, length), max_size=5))
        bounds = sorted([0, length, *cuts])
        chunks = [b - a for a, b in itertools.pairwise(bounds)]
        return tuple(chunks)

    return build()


@st.composite
def rechunks(draw: st.DrawFn) -> tuple[np.ndarray, RechunkLayout]:
    ndim = draw(st.integers(1, 4))
    shape = tuple(draw(st.lists(st.integers(0, 7), min_size=ndim, max_size=ndim)))
    old = tuple(draw(chunking(n)) for n in shape)
    new = tuple(draw(chunking(n)) for n in shape)
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**16))
    raw = np.random.default_rng(seed).integers(0, 256, size=int(np.prod(shape)) * dtype.itemsize)
    array = np.frombuffer(raw.astype(np.uint8).tobytes(), dtype=dtype).reshape(shape)
    return array, RechunkLayout(old, new)


def blocks(array: np.ndarray, chunks: Sequence[Sequence[int]]) -> dict[tuple[int, ...], Any]:
    """numpy's own cut of ``array`` into ``chunks``, by block index."""
    bounds = [np.cumsum((0, *axis)) for axis in chunks]
    return {
        index: array[tuple(slice(b[i], b[i + 1]) for b, i in zip(bounds, index, strict=True))]
        for index in itertools.product(*(range(len(axis)) for axis in chunks))
    }


def over_the_wire(pieces: dict[str, list[tuple[int, Any]]], input_chunk: int) -> list[Any]:
    """Encode every piece into a real message, copy the frames, decode them."""
    out = []
    for items in pieces.values():
        message = encode_message(
            shuffle_id=ShuffleId("r"),
            run_id=RunId(1),
            sender="t",
            shards=[(ShardKey(p, input_chunk), piece) for p, piece in items],
        )
        wire = [bytearray(frame) for frame in message.frames()]
        decoded = decode_message(wire)
        for entry, buffer in zip(decoded.header.entries, decoded.buffers, strict=True):
            out.append((entry.output_partition, decode_piece(entry.meta, buffer)))
    return out


def same(a: np.ndarray, b: np.ndarray) -> bool:
    """Bytewise equality (NaT and NaN payloads compare equal this way), field by field
    for structured dtypes, whose padding bytes mean nothing."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.names:
        return all(same(a[name], b[name]) for name in a.dtype.names)
    return np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rechunks(), st.integers(1, 4))
def test_split_then_assemble_matches_numpy(
    case: tuple[np.ndarray, RechunkLayout], nowners: int
) -> None:
    array, layout = case
    owners = [f"o{i}" for i in range(nowners)]

    def owner_of(p: int) -> str:
        return owners[nowners * p // layout.npartitions_out]

    received: dict[int, list[tuple[int, Any]]] = {p: [] for p in range(layout.npartitions_out)}
    inputs = blocks(array, layout.old)
    for index, chunk in inputs.items():
        i = layout.flat_input(index)
        pieces = split_chunk(chunk, layout, i, owner_of=owner_of)
        for owner, items in pieces.items():
            assert all(owner_of(p) == owner for p, _ in items)
        for p, piece in over_the_wire(pieces, i):
            received[p].append((i, piece))
    expected = blocks(array, layout.new)
    for index, want in expected.items():
        p = layout.flat_output(index)
        assert len(received[p]) == layout.inputs_of_output(p) >= 1
        got = assemble_chunk(received[p], layout, p, where="test")
        assert same(got, want), (index, got, want)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_axes_of_unknown_length_are_carried_through(data: st.DataObject) -> None:
    # What dask plans for an array with NaN chunks: those axes keep their chunks, the
    # others change. The layout knows only that the lengths are unknown (NaN); the
    # pieces must still rebuild numpy's blocks, whatever the real lengths are.
    array, layout = data.draw(rechunks())
    unknown = data.draw(st.lists(st.booleans(), min_size=layout.ndim, max_size=layout.ndim))
    new = tuple(o if u else n for o, n, u in zip(layout.old, layout.new, unknown, strict=True))
    nan = float("nan")

    def hidden(chunks: Sequence[Sequence[int]]) -> tuple[tuple[float, ...], ...]:
        return tuple(
            tuple(nan if u else c for c in axis) for axis, u in zip(chunks, unknown, strict=True)
        )

    blind = RechunkLayout(hidden(layout.old), hidden(new))
    received: dict[int, list[tuple[int, Any]]] = {p: [] for p in range(blind.npartitions_out)}
    for index, chunk in blocks(array, layout.old).items():
        i = blind.flat_input(index)
        for p, piece in over_the_wire(split_chunk(chunk, blind, i, owner_of=str), i):
            received[p].append((i, piece))
    for index, want in blocks(array, new).items():
        p = blind.flat_output(index)
        assert same(assemble_chunk(received[p], blind, p, where="test"), want), index


def test_unknown_lengths_are_none_and_must_not_change() -> None:
    nan = float("nan")
    layout = RechunkLayout(((nan, nan), (4, 4)), ((nan, nan), (8,)))
    assert layout.old == ((None, None), (4, 4)) and layout.input_shape(1) == (None, 4)
    assert list(layout.pieces_of_output(1)) == [
        (2, (slice(None), slice(0, 4))),
        (3, (slice(None), slice(4, 8))),
    ]
    with pytest.raises(ValueError, match=r"chunk \(0, 1\) has shape \(3, 5\), .* \(None, 4\)"):
        split_chunk(np.zeros((3, 5)), layout, 1, owner_of=str)
    import pickle

    assert pickle.loads(pickle.dumps(layout)) is pickle.loads(pickle.dumps(layout))
    with pytest.raises(ValueError, match=r"axis 0 has unknown chunk sizes \(NaN\) and would"):
        RechunkLayout(((nan, nan),), ((nan,),))


@given(rechunks())
@settings(max_examples=100, deadline=None)
def test_every_input_byte_lands_exactly_once(case: tuple[np.ndarray, RechunkLayout]) -> None:
    _, layout = case
    for i in range(layout.npartitions_in):
        pieces = list(layout.pieces_of_input(i))
        assert len({p for p, _ in pieces}) == len(pieces)  # one piece per output chunk
        volume = sum(
            int(np.prod([s.stop - s.start for s in slices], dtype=np.int64)) for _, slices in pieces
        )
        assert volume == int(np.prod(layout.input_shape(i), dtype=np.int64))
    # Both directions describe the same pieces.
    forward = {(p, i) for i in range(layout.npartitions_in) for p, _ in layout.pieces_of_input(i)}
    backward = {
        (p, i) for p in range(layout.npartitions_out) for i, _ in layout.pieces_of_output(p)
    }
    assert forward == backward


def test_flat_numbers_are_row_major_block_indices() -> None:
    layout = RechunkLayout(((2, 2), (1, 1, 1)), ((4,), (3,)))
    assert [layout.input_index(i) for i in range(6)] == [
        (0, 0),
        (0, 1),
        (0, 2),
        (1, 0),
        (1, 1),
        (1, 2),
    ]
    assert all(layout.flat_input(layout.input_index(i)) == i for i in range(6))
    assert layout.npartitions_in == 6 and layout.npartitions_out == 1
    with pytest.raises(ValueError, match=r"input chunk 6 is out of range for a grid of \[2, 3\]"):
        layout.input_index(6)
    with pytest.raises(ValueError, match=r"output chunk index \(0, 1\) is not in a grid"):
        layout.flat_output((0, 1))


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (((2, 2),), ((3,),), "sum to 4, new chunks"),
        (((2,),), ((2,), (1,)), "1-d chunks"),
        (((float("nan"),),), ((2,),), r"unknown chunk sizes \(NaN\) and would change"),
        (((1.5,),), ((1.5,),), "not integers or NaN"),
        (((-1, 3),), ((2,),), ">= 0"),
        (((),), ((),), "no chunks"),
    ],
)
def test_bad_layouts_are_refused(old: Any, new: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RechunkLayout(old, new)


def test_layout_pickles_small_and_compares_by_chunks() -> None:
    import pickle

    layout = RechunkLayout(((1000,) * 100,), ((10,) * 10_000,))
    clone = pickle.loads(pickle.dumps(layout))
    assert clone == layout and list(clone.pieces_of_output(7)) == list(layout.pieces_of_output(7))


def test_a_process_unpickles_one_layout_once() -> None:
    # Every transfer task of a rechunk unpickles the run's layout: the tables (one
    # entry per chunk along every axis) are built once per process, not per task.
    import pickle

    import cloudpickle

    layout = RechunkLayout(((1,) * 500, (7, 3)), ((500,), (2, 8)))
    first = pickle.loads(pickle.dumps(layout))
    assert pickle.loads(pickle.dumps(layout)) is first
    assert cloudpickle.loads(cloudpickle.dumps(layout)) is first
    other = pickle.loads(pickle.dumps(RechunkLayout(((1,) * 500, (7, 3)), ((500,), (5, 5)))))
    assert other is not first and other != first


def test_piece_codec_refuses_what_it_cannot_send() -> None:
    with pytest.raises(TypeError, match=r"dtype object .* method='tasks'"):
        encode_piece(np.array([None, 1]))
    with pytest.raises(TypeError, match=r"MaskedArray .* method='tasks'"):
        encode_piece(np.ma.masked_array([1, 2], mask=[0, 1]))
    with pytest.raises(TypeError, match="list"):
        encode_piece([1, 2])
    piece = encode_piece(np.arange(4, dtype="i4"))
    with pytest.raises(ValueError, match="needs 16 bytes, got 12"):
        decode_piece(piece.meta, bytes(piece.data)[:12])
    with pytest.raises(ValueError, match="unknown kind tag"):
        decode_piece(b"pickle\0...", b"")
    with pytest.raises(ValueError, match="invalid array piece description"):
        decode_piece(b'array\0{"dtype": {"descr": "|O"}, "shape": [1]}', bytes(8))
    with pytest.raises(ValueError, match="invalid array piece description"):
        decode_piece(b"array\0{not json", b"")


def test_non_contiguous_pieces_are_copied_once_and_contiguous_ones_not() -> None:
    base = np.arange(24, dtype="f8").reshape(4, 6)
    strided = encode_piece(base[:, 1:3])
    assert np.shares_memory(np.asarray(strided.data), base) is False
    whole = encode_piece(base[1:3])  # rows of a C-order array are contiguous
    assert np.shares_memory(np.asarray(whole.data), base)


def test_assemble_names_missing_pieces_and_wrong_shapes() -> None:
    layout = RechunkLayout(((2, 2),), ((4,),))
    with pytest.raises(RuntimeError, match=r"missing the pieces of input chunks \[\(1,\)\]"):
        assemble_chunk([(0, np.zeros(2))], layout, 0, where="run x")
    with pytest.raises(ValueError, match=r"has shape \(3,\), the rechunk expects \(2,\)"):
        split_chunk(np.zeros(3), layout, 0, owner_of=lambda p: "a")


# ------------------------------------------------------------- runs wired in memory


@pytest.mark.parametrize("memory_limit", [None, 0])
@pytest.mark.parametrize("nparticipants", [1, 3])
async def test_rechunk_runs_over_an_in_memory_wire(
    tmp_path: Path, memory_limit: int | None, nparticipants: int
) -> None:
    array = np.random.default_rng(1).random((12, 10, 3))
    layout = RechunkLayout(((4, 4, 4), (5, 5), (3,)), ((12,), (2, 2, 2, 2, 2), (1, 2)))
    options = RunOptions(memory_limit=memory_limit, spill_directory=tmp_path, message_bytes=300)
    wire = Network([f"a{i}" for i in range(nparticipants)], options=options)
    spec = ShuffleRunSpec(
        shuffle_id=ShuffleId("r1"),
        run_id=RunId(1),
        npartitions_out=layout.npartitions_out,
        participants=tuple(wire.managers),
    )
    runs = {n: await m.get_or_create(spec, layout) for n, m in wire.managers.items()}
    assert all(isinstance(r, ArrayRechunkRun) for r in runs.values())
    names = list(runs)
    await asyncio.gather(
        *(
            wire.send_input(
                names[i % len(names)], chunk, layout.flat_input(index), spec=spec, meta=layout
            )
            for i, (index, chunk) in enumerate(blocks(array, layout.old).items())
        )
    )
    for run in runs.values():
        run.inputs_done()
    for index, want in blocks(array, layout.new).items():
        p = layout.flat_output(index)
        assert same(runs[spec.owner_of(p)].get_output_partition(p), np.ascontiguousarray(want))
    if memory_limit == 0:
        assert any(r.spill_directory is not None for r in runs.values())
    await asyncio.gather(*(m.close() for m in wire.managers.values()))
    assert all(dict(m.runs) == {} for m in wire.managers.values())
    assert list(tmp_path.iterdir()) == []


async def test_a_message_for_a_partition_owned_elsewhere_is_refused(tmp_path: Path) -> None:
    layout = RechunkLayout(((2, 2),), ((1, 1, 1, 1),))
    wire = Network(["a", "b"], options=RunOptions(spill_directory=tmp_path))
    spec = ShuffleRunSpec(
        shuffle_id=ShuffleId("r2"), run_id=RunId(1), npartitions_out=4, participants=("a", "b")
    )
    await wire.managers["a"].get_or_create(spec, layout)
    message = encode_message(
        shuffle_id=spec.shuffle_id,
        run_id=spec.run_id,
        sender="b",
        shards=[(ShardKey(3, 0), encode_piece(np.zeros(1)))],
    )
    with pytest.raises(FrameError, match=r"output partitions \[3\]"):
        await wire.managers["a"].receive(message.frames())
    await asyncio.gather(*(m.close() for m in wire.managers.values()))
