"""The shuffle wire format: one small binary header frame, then one buffer per shard.

Frames arrive from the network, so nothing here unpickles: the header is a fixed
``struct`` layout, and ``decode_header`` checks every count against the bytes actually
present before it trusts it. Layout (little endian)::

    magic "RSHF" | version u16 | run_id u64 | n_entries u32 | len(shuffle_id) u16
    | len(sender) u16 | shuffle_id utf-8 | sender utf-8
    | n_entries x (output_partition u32 | input_partition u32 | nbytes u64 | memory u8
                   | meta u32)
    | n_metas u32 | n_metas x len(meta) u32 | the distinct metas' bytes, concatenated

``meta`` is a shard's small host-side description: empty for Arrow IPC streams
(which describe themselves), the schema for Arrow record batches (``shuffle.wire._arrow``),
dtype and shape for array shards, whose payload is raw memory that may live on a
device. Each distinct meta travels once per message and entries refer to it by
number (0: none, k: the k-th), because the pieces of one sender share one schema:
256 pieces of one message would otherwise repeat ~1 KB of schema each. Buffers travel
as separate frames so that a transport can receive each one straight into memory of
the right kind; which kinds exist is a ``MemoryRegistry`` of hooks
(``shuffle.wire._memory``).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import pyarrow as pa

from shuffle._exceptions import FrameError
from shuffle._ids import RunId, ShardKey, ShuffleId
from shuffle.wire._memory import (
    HOST_HOOKS,
    HOST_REGISTRY,
    MemoryHooks,
    MemoryRegistry,
    MemoryType,
    host_nbytes,
)

__all__ = [
    "Entry",
    "Header",
    "Message",
    "Piece",
    "allocate_buffers",
    "decode_header",
    "decode_message",
    "encode_header",
    "encode_message",
    "payload_nbytes",
]

MAGIC = b"RSHF"
PROTOCOL_VERSION = 3
DEFAULT_MAX_MESSAGE_NBYTES = 1 << 31
#: Bound on the meta bytes of one message, so a hostile header cannot announce absurd ones.
MAX_META_NBYTES = 16 << 20

_START = struct.Struct("<4sH")  # magic, version: read first, before trusting the rest
_COUNTS = struct.Struct("<QIHH")  # run_id, n_entries, len(shuffle_id), len(sender)
_ENTRY = struct.Struct("<IIQBI")  # output, input, nbytes, memory type, meta number
_U32_ARRAY = struct.Struct("<I")
_FIXED = _START.size + _COUNTS.size
_U16, _U32, _U64 = (1 << 16) - 1, (1 << 32) - 1, (1 << 64) - 1

# Memory types as the header spells them (u8).
_CODES = {MemoryType.HOST: 0, MemoryType.CUDA: 1}
_TYPES = {code: memory_type for memory_type, code in _CODES.items()}


@dataclass(frozen=True, slots=True)
class Piece:
    """A shard payload that needs a description to be rebuilt: ``data`` plus ``meta``.

    ``data`` is a host or device buffer (sent as its own frame, never copied);
    ``meta`` small host bytes that travel in the header. ``nbytes`` is ``data``'s size.
    """

    data: Any
    meta: bytes
    nbytes: int


def payload_nbytes(payload: Any) -> int:
    """Size of a shard payload: a ``Piece``'s data, or a host buffer."""
    if isinstance(payload, Piece):
        return payload.nbytes
    return host_nbytes(payload)


class Entry(NamedTuple):
    """Header entry describing the buffer at the same position in the message.

    A named tuple, not a dataclass: a message of 256 pieces builds 256 of them on
    each end, and a frozen dataclass costs ~1 us more per instance.
    """

    output_partition: int
    input_partition: int
    nbytes: int
    memory_type: MemoryType = MemoryType.HOST
    meta: bytes = b""

    @property
    def key(self) -> ShardKey:
        return ShardKey(self.output_partition, self.input_partition)


@dataclass(frozen=True)
class Header:
    shuffle_id: ShuffleId
    run_id: RunId
    sender: str
    entries: tuple[Entry, ...]

    @property
    def nbytes(self) -> int:
        """Total payload bytes that follow the header."""
        return sum(e.nbytes for e in self.entries)


@dataclass(frozen=True, eq=False)
class Message:
    header: Header
    buffers: tuple[Any, ...]

    def frames(self) -> list[Any]:
        """What a transport sends: the encoded header, then each buffer."""
        return [encode_header(self.header), *self.buffers]

    def shards(self) -> Iterator[tuple[ShardKey, Any]]:
        return zip((e.key for e in self.header.entries), self.buffers, strict=True)


def encode_message(
    *,
    shuffle_id: ShuffleId,
    run_id: RunId,
    sender: str,
    shards: Iterable[tuple[ShardKey, Any]],
    registry: MemoryRegistry = HOST_REGISTRY,
) -> Message:
    """Describe ``shards`` in a header; each payload is wrapped, never copied.

    A payload is a buffer, or a ``Piece`` whose ``meta`` goes into the header.
    """
    entries = []
    buffers = []
    for key, payload in shards:
        meta = b""
        if isinstance(payload, Piece):
            payload, meta = payload.data, payload.meta
        if type(payload) is pa.Buffer and payload.is_cpu:
            # What dataframe pieces are: host memory for sure, no hooks to ask.
            buffer = memoryview(payload).cast("B")
            entries.append(Entry(*key, payload.size, MemoryType.HOST, bytes(meta)))
        else:
            memory_type = registry.memory_type_of(payload)
            hooks = registry.hooks(memory_type)
            buffer = hooks.wrap(payload)
            entries.append(Entry(*key, hooks.nbytes(buffer), memory_type, bytes(meta)))
        buffers.append(buffer)
    header = Header(shuffle_id, run_id, sender, tuple(entries))
    return Message(header, tuple(buffers))


def encode_header(header: Header) -> bytes:
    shuffle_id = header.shuffle_id.encode()
    sender = header.sender.encode()
    if not shuffle_id or len(shuffle_id) > _U16 or len(sender) > _U16:
        raise ValueError(
            f"shuffle_id and sender must encode to 1..{_U16} bytes, got "
            f"{len(shuffle_id)} and {len(sender)}"
        )
    if not 1 <= header.run_id <= _U64:
        raise ValueError(f"run_id must lie in [1, 2**64), got {header.run_id}")
    parts = [
        _START.pack(MAGIC, PROTOCOL_VERSION),
        _COUNTS.pack(header.run_id, len(header.entries), len(shuffle_id), len(sender)),
        shuffle_id,
        sender,
    ]
    numbers: dict[bytes, int] = {}  # distinct meta -> its number (1-based)
    for e in header.entries:
        if not (0 <= e.output_partition <= _U32 and 0 <= e.input_partition <= _U32):
            raise ValueError(f"partitions must lie in [0, 2**32), got {e}")
        number = numbers.setdefault(e.meta, len(numbers) + 1) if e.meta else 0
        parts.append(
            _ENTRY.pack(
                e.output_partition,
                e.input_partition,
                e.nbytes,
                _CODES[MemoryType(e.memory_type)],
                number,
            )
        )
    metas = list(numbers)
    meta_nbytes = sum(map(len, metas))
    if meta_nbytes > MAX_META_NBYTES:
        raise ValueError(f"shard meta of {meta_nbytes} bytes exceeds {MAX_META_NBYTES}")
    parts.append(_U32_ARRAY.pack(len(metas)))
    parts += [_U32_ARRAY.pack(len(m)) for m in metas]
    parts += metas
    return b"".join(parts)


def decode_header(
    frame: Any,
    *,
    max_message_nbytes: int = DEFAULT_MAX_MESSAGE_NBYTES,
    npartitions_out: int | None = None,
) -> Header:
    """Parse and validate a header frame; any defect raises ``FrameError``.

    ``max_message_nbytes`` bounds the payload a peer may announce, so a corrupt or
    hostile header cannot make the receiver allocate absurd buffers.
    """
    try:
        view = memoryview(frame).cast("B")
    except (TypeError, ValueError) as e:
        raise FrameError(f"header is not a contiguous byte buffer ({e})") from None
    size = len(view)
    if size < _START.size:
        raise FrameError(f"header is truncated: {size} bytes, the prefix alone is {_START.size}")
    magic, version = _START.unpack_from(view)
    if magic != MAGIC:
        raise FrameError(f"bad magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version != PROTOCOL_VERSION:
        raise FrameError(f"protocol version {version}, this process speaks {PROTOCOL_VERSION}")
    if size < _FIXED:
        raise FrameError(f"header is truncated: {size} bytes, the fixed part is {_FIXED}")
    run_id, n_entries, id_len, sender_len = _COUNTS.unpack_from(view, _START.size)
    strings_end = _FIXED + id_len + sender_len
    entries_end = strings_end + n_entries * _ENTRY.size
    if size < entries_end:
        raise FrameError(
            f"lengths do not add up: the header is {size} bytes, its counts "
            f"({n_entries} entries, {id_len}+{sender_len} name bytes) say at least {entries_end}"
        )
    if run_id < 1:
        raise FrameError("run_id 0 is not a valid run id")
    shuffle_id = _utf8(view[_FIXED : _FIXED + id_len], "shuffle_id")
    sender = _utf8(view[_FIXED + id_len : strings_end], "sender")
    if not shuffle_id:
        raise FrameError("shuffle_id is empty")
    entries = _decode_entries(
        view[strings_end:entries_end], view[entries_end:], max_message_nbytes, npartitions_out
    )
    return Header(ShuffleId(shuffle_id), RunId(run_id), sender, entries)


def _utf8(raw: memoryview, what: str) -> str:
    try:
        return str(raw, "utf-8")
    except UnicodeDecodeError as e:
        raise FrameError(f"{what} is not valid UTF-8 ({e.reason})") from None


def _decode_entries(
    raw: memoryview, tail: memoryview, max_message_nbytes: int, npartitions_out: int | None
) -> tuple[Entry, ...]:
    metas = _decode_metas(tail)
    entries = []
    seen: set[tuple[int, int]] = set()
    total = 0
    for i, (out, inp, nbytes, code, number) in enumerate(_ENTRY.iter_unpack(raw)):
        if code not in _TYPES:
            raise FrameError(f"entry {i} has unknown memory type code {code}")
        if number > len(metas):
            raise FrameError(f"entry {i} refers to meta {number}, the header carries {len(metas)}")
        if npartitions_out is not None and out >= npartitions_out:
            raise FrameError(
                f"entry {i} targets output partition {out}, but the run has {npartitions_out}"
            )
        if (out, inp) in seen:
            raise FrameError(f"entry {i} repeats shard (output {out}, input {inp})")
        seen.add((out, inp))
        total += nbytes
        if total > max_message_nbytes:
            raise FrameError(
                f"payload of at least {total} bytes exceeds the limit of {max_message_nbytes}"
            )
        # Entries that share a meta share one bytes object (and its cached hash).
        entries.append(Entry(out, inp, nbytes, _TYPES[code], metas[number - 1] if number else b""))
    return tuple(entries)


def _decode_metas(tail: memoryview) -> list[bytes]:
    """The distinct metas after the entries: a count, their lengths, their bytes."""
    size = _U32_ARRAY.size
    if len(tail) < size:
        raise FrameError("header is truncated: the meta count is missing")
    (count,) = _U32_ARRAY.unpack_from(tail)
    if len(tail) < size * (1 + count):
        raise FrameError(
            f"lengths do not add up: {count} metas announced, the header has room for "
            f"{len(tail) // size - 1} lengths"
        )
    lengths = [n for (n,) in _U32_ARRAY.iter_unpack(tail[size : size * (1 + count)])]
    data = tail[size * (1 + count) :]
    meta_nbytes = sum(lengths)
    if meta_nbytes != len(data):
        raise FrameError(
            f"lengths do not add up: the header announces {meta_nbytes} meta bytes, it "
            f"carries {len(data)}"
        )
    if meta_nbytes > MAX_META_NBYTES:
        raise FrameError(f"shard meta of {meta_nbytes} bytes exceeds {MAX_META_NBYTES}")
    metas = []
    offset = 0
    for n in lengths:
        metas.append(bytes(data[offset : offset + n]))
        offset += n
    return metas


def allocate_buffers(header: Header, registry: MemoryRegistry = HOST_REGISTRY) -> list[Any]:
    """Receive buffers for every entry, each of the announced kind and size."""
    return [_hooks_for(registry, e, i).allocate(e.nbytes) for i, e in enumerate(header.entries)]


def decode_message(
    frames: Sequence[Any],
    *,
    registry: MemoryRegistry = HOST_REGISTRY,
    max_message_nbytes: int = DEFAULT_MAX_MESSAGE_NBYTES,
    npartitions_out: int | None = None,
) -> Message:
    """Validate received ``[header, *buffers]`` frames against each other."""
    if not frames:
        raise FrameError("message has no header frame")
    header = decode_header(
        frames[0], max_message_nbytes=max_message_nbytes, npartitions_out=npartitions_out
    )
    buffers = tuple(frames[1:])
    if len(buffers) != len(header.entries):
        raise FrameError(
            f"header announces {len(header.entries)} buffers, the message carries {len(buffers)}"
        )
    builtin_host = registry.hooks(MemoryType.HOST) is HOST_HOOKS
    for i, (entry, buffer) in enumerate(zip(header.entries, buffers, strict=True)):
        if builtin_host and entry.memory_type is MemoryType.HOST:
            try:
                nbytes = host_nbytes(buffer)  # owns + nbytes with one memoryview
            except TypeError:
                raise FrameError(
                    f"buffer {i} is a {type(buffer).__name__}, not host memory"
                ) from None
        else:
            hooks = _hooks_for(registry, entry, i)
            if not hooks.owns(buffer):
                raise FrameError(
                    f"buffer {i} is a {type(buffer).__name__}, not {entry.memory_type.value} memory"
                )
            nbytes = hooks.nbytes(buffer)
        if nbytes != entry.nbytes:
            raise FrameError(f"buffer {i} holds {nbytes} bytes, its entry says {entry.nbytes}")
    return Message(header, buffers)


def _hooks_for(registry: MemoryRegistry, entry: Entry, i: int) -> MemoryHooks:
    try:
        return registry.hooks(entry.memory_type)
    except LookupError as e:
        raise FrameError(f"entry {i}: {e}") from None
