"""The Arrow codec of dataframe shuffle pieces: record batches that share one schema.

A transfer task cuts one Arrow table (one schema) into a piece per output partition.
Writing each piece as its own IPC stream repeats the schema, ~1 KB with pandas'
metadata, in every piece, and parsing it again per piece was most of what a receiver
spent on small pieces (65,536 pieces of ~4 KB in a 256 x 256 shuffle of 1 MiB
partitions). So a piece is a ``Piece``: its data is one IPC record batch message
(``RecordBatch.serialize``, no schema), its meta ``ARROW_TAG`` + the serialized
schema. The meta is the same bytes object for every piece of one table, so a message
carries it once (``shuffle.wire._message``), and the receiver parses each distinct
schema once (``schema_of``, cached) and reads a batch in ~2 us instead of ~8.

Tables with dictionary (categorical) columns stay whole IPC streams with an empty
meta: a bare record batch does not carry its dictionaries. ``pieces_to_table``
rebuilds one output partition's tables from pieces of either kind, in the order given.
``table_to_buffer``/``buffer_to_table`` write and read whole IPC streams.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa

from shuffle._exceptions import FrameError
from shuffle._malloc import sender_pool
from shuffle.wire._message import Piece

__all__ = [
    "ARROW_TAG",
    "buffer_to_table",
    "encode_slices",
    "pieces_to_tables",
    "schema_of",
    "table_to_buffer",
]

#: Leads the meta of a record-batch piece; whole IPC streams carry no meta.
ARROW_TAG = b"arrow\0"


def encode_slices(table: pa.Table, bounds: Mapping[int, tuple[int, int]]) -> dict[int, Any]:
    """``{partition: (start, stop)}`` row ranges of ``table`` as ``{partition: payload}``:
    record-batch ``Piece``s sharing one meta, or IPC stream buffers if the schema has
    dictionary columns."""
    meta = _batch_meta(table.schema)
    batches = table.to_batches()
    if meta is not None and len(batches) > 1:
        # ArrowInvalid: e.g. more than 2 GiB of text in a 32-bit-offset column.
        with contextlib.suppress(pa.ArrowInvalid):
            batches = table.combine_chunks().to_batches()
    if meta is None or len(batches) != 1:
        return {p: table_to_buffer(table.slice(a, b - a)) for p, (a, b) in bounds.items()}
    batch = batches[0]
    out: dict[int, Any] = {}
    pool = sender_pool()
    for partition, (start, stop) in bounds.items():
        data = batch.slice(start, stop - start).serialize(memory_pool=pool)
        out[partition] = Piece(data, meta, data.size)
    return out


def pieces_to_tables(pieces: Sequence[tuple[bytes, Any]]) -> list[pa.Table]:
    """``(meta, payload)`` pieces, in order, as tables; one table when they share a schema.

    Validates every batch fully, so corrupt offsets from the network raise
    ``FrameError`` here rather than crash whatever reads the table later.
    """
    if not pieces:
        return []
    first = pieces[0][0]
    if first and all(meta is first or meta == first for meta, _ in pieces):
        schema = schema_of(first)
        return [pa.Table.from_batches([_read_batch(p, schema) for _, p in pieces], schema)]
    return [
        pa.Table.from_batches([_read_batch(payload, schema_of(meta))])
        if meta
        else buffer_to_table(payload)
        for meta, payload in pieces
    ]


@functools.lru_cache(maxsize=256)
def schema_of(meta: bytes) -> pa.Schema:
    """The schema a record-batch piece's meta carries; parsed once per distinct meta."""
    if not meta.startswith(ARROW_TAG):
        raise FrameError(f"a dataframe piece has meta {meta[:8]!r}, expected an Arrow schema")
    try:
        schema = pa.ipc.read_schema(pa.py_buffer(meta[len(ARROW_TAG) :]))
        if schema.metadata and b"pandas" in schema.metadata:
            json.loads(schema.metadata[b"pandas"])
    except (pa.ArrowException, OSError, ValueError) as e:
        raise FrameError(f"a dataframe piece's schema is not valid Arrow IPC ({e})") from None
    if _has_dictionary(schema):
        raise FrameError("a record-batch piece may not have dictionary columns")
    return schema


def _batch_meta(schema: pa.Schema) -> bytes | None:
    if _has_dictionary(schema):
        return None
    serialized: bytes = schema.serialize().to_pybytes()
    return ARROW_TAG + serialized


def _has_dictionary(schema: pa.Schema) -> bool:
    return any(_type_has_dictionary(field.type) for field in schema)


def _type_has_dictionary(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        return True
    return any(_type_has_dictionary(t.field(i).type) for i in range(t.num_fields))


def _read_batch(payload: Any, schema: pa.Schema) -> pa.RecordBatch:
    try:
        batch = pa.ipc.read_record_batch(pa.py_buffer(payload), schema)
        batch.validate(full=True)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise FrameError(f"payload is not a valid Arrow record batch ({e})") from None
    return batch


# Built once: without options pyarrow reads two environment variables per stream,
# a third of the cost of encoding a small piece.
_WRITE_OPTIONS = pa.ipc.IpcWriteOptions()


def table_to_buffer(table: pa.Table) -> pa.Buffer:
    """Arrow IPC stream bytes for ``table``; the one copy is the write into the stream."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema, options=_WRITE_OPTIONS) as writer:
        writer.write_table(table)
    return sink.getvalue()


def buffer_to_table(data: Any, *, validate: bool = True) -> pa.Table:
    """Read an Arrow IPC stream; the table aliases ``data``, which must stay unmodified.

    ``validate`` runs Arrow's full validation, so corrupt offsets from the network raise
    ``FrameError`` here instead of crashing whatever reads the table later.
    """
    try:
        with pa.ipc.open_stream(pa.py_buffer(data)) as reader:
            table = reader.read_all()
        if validate:
            table.validate(full=True)
            metadata = table.schema.metadata
            if metadata and b"pandas" in metadata:
                _check_json(metadata[b"pandas"])
    # Arrow reports some bad streams as OSError; corrupt metadata fails as ValueError.
    except (pa.ArrowException, OSError, ValueError) as e:
        raise FrameError(f"payload is not a valid Arrow IPC stream ({e})") from None
    return table


@functools.lru_cache(maxsize=64)
def _check_json(raw: bytes) -> None:
    """Raise ``ValueError`` unless ``raw`` is JSON (what pandas' metadata must be).

    Every piece of one shuffle carries the same pandas metadata, so it is parsed once
    per distinct value instead of once per piece (5 us each, a third of decoding a
    small piece); failures are not cached.
    """
    json.loads(raw)
