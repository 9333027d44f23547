"""One participant's share of one run of a dataframe shuffle or an array rechunk.

Modelled on ``distributed.shuffle._core.ShuffleRun`` and ``_shuffle.DataFrameShuffleRun``.
A run lives on one participant (one actor) for one ``(shuffle_id, run_id)``:

* **transfer**: ``add_partition(df, i)`` splits input partition ``i`` by the partition
  column, keeps the pieces of partitions this participant owns (straight into its
  store, no message and no send), and queues the rest per owner in a ``ShardsBuffer``,
  which batches them into messages and applies back-pressure.
* **receive**: ``receive(frames)`` takes one message from a peer, checks that it belongs
  to this run and only names partitions this participant owns, and stores its shards.
  Shards are keyed by ``ShardKey``, so a piece resent by a retried transfer is dropped.
  With ``accept_any_sender`` the sender need not be a participant: in the Ray service,
  transfer tasks (not actors) send, and the transport has already authenticated them;
  dedupe by ``ShardKey`` does not depend on who sent a shard.
* **barrier**: ``flush()`` returns once every message this participant queued has been
  accepted by its peer. When every participant's ``flush`` has returned, every shard is
  in its owner's store; coordinating that is the caller's job (the driver's barrier).
* **unpack**: ``get_output_partition(p)`` concatenates the shards of ``p`` in
  input-partition order, so the result does not depend on arrival order.

``ShuffleRun`` holds all of that; its two kinds differ only in splitting and
rebuilding: ``DataFrameShuffleRun`` cuts rows by dask's partition column into Arrow
IPC shards, ``ArrayRechunkRun`` cuts array chunks by the new chunking
(``shuffle._rechunk``) into raw-memory ``Piece``s and places them into output chunks.

Failure semantics follow ``distributed``: the first failure (a failed send, or
``fail(exc)``) is kept, and from then on every public method raises it; after a plain
``close()`` they raise ``ShuffleClosedError``. ``close()`` is idempotent and immediate
(queued shards are dropped, sends cancelled, spill files deleted), like ucxx's
``abort()``: by the time a run is closed, either its data was consumed or it is void.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa

from shuffle._buffer import ShardsBuffer
from shuffle._combine import Coverage, split_joined
from shuffle._arrow import encode_slices, pieces_to_tables
from shuffle._cudf import CUDF_TAG, concat_cudf, is_cudf_frame, split_cudf
from shuffle._exceptions import BufferClosedError, FrameError, ShuffleClosedError
from shuffle._ids import RunId, ShardKey, ShuffleId
from shuffle._limiter import ResourceLimiter
from shuffle._ndarray import decode_piece, encode_piece
from shuffle._partition import concat_partition, group_by_owner, sort_by_partition
from shuffle._rechunk import RechunkLayout
from shuffle._serialize import (
    HOST_REGISTRY,
    MemoryRegistry,
    Piece,
    decode_message,
    encode_message,
    payload_nbytes,
)
from shuffle._spec import ShuffleRunSpec
from shuffle._store import DiskShardStore, spill_prefix

__all__ = [
    "DEFAULT_OPTIONS",
    "ArrayRechunkRun",
    "DataFrameShuffleRun",
    "RunOptions",
    "RunStats",
    "SendFn",
    "ShuffleRun",
    "assemble_chunk",
    "check_frame",
    "check_input_partition",
    "shard_frame",
    "split_chunk",
]

logger = logging.getLogger(__name__)

#: Delivers one encoded message (``[header, *buffers]``) to a participant and returns
#: once that participant has accepted it; raises if it did not.
SendFn = Callable[[str, list[Any]], Awaitable[None]]

_MAX_PARTITION = (1 << 32) - 1  # the wire header stores partitions as u32


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """Per-participant knobs of a run; one value is shared by all runs of a manager."""

    #: Bytes of received shards held in memory before spilling to disk; ``None`` never
    #: spills, ``0`` spills everything, ``"auto"`` is a share of the memory of the
    #: machine the run lives on (``auto_memory_limit``), resolved there.
    memory_limit: int | None | Literal["auto"] = 256 * 2**20
    #: Where spill directories are created (default: the system's temporary directory).
    spill_directory: str | os.PathLike[str] | None = None
    #: Target size of one message; a single larger shard still travels alone.
    message_bytes: int = 16 * 2**20
    #: Bytes queued or in flight for sending before ``add_partition`` waits
    #: (back-pressure); ``None`` never waits. Shared by all runs of one manager.
    send_buffer_bytes: int | None = 512 * 2**20
    #: Seconds ``add_partition`` waits for send budget before raising
    #: ``LimiterTimeoutError``; ``None`` waits indefinitely.
    limiter_timeout: float | None = 300.0
    #: Messages in flight at once, over all destinations of one run.
    concurrency: int = 4
    #: A transfer task sends the dataframe inputs it computes in a row as one
    #: combined input once they reach this many bytes (``shuffle._combine``); ``0``
    #: sends every input on its own.
    combine_bytes: int = 16 * 2**20

    def __post_init__(self) -> None:
        limit = self.memory_limit
        if limit != "auto" and limit is not None and (not isinstance(limit, int) or limit < 0):
            raise ValueError(f"memory_limit must be >= 0, None or 'auto', got {limit!r}")
        if self.message_bytes < 1 or self.concurrency < 1:
            raise ValueError(
                f"message_bytes and concurrency must be >= 1, got {self.message_bytes} "
                f"and {self.concurrency}"
            )
        if self.send_buffer_bytes is not None and self.send_buffer_bytes < 1:
            raise ValueError(
                f"send_buffer_bytes must be >= 1 or None, got {self.send_buffer_bytes}"
            )
        if self.limiter_timeout is not None and self.limiter_timeout <= 0:
            raise ValueError(f"limiter_timeout must be > 0 or None, got {self.limiter_timeout}")
        if isinstance(self.combine_bytes, bool) or self.combine_bytes < 0:
            raise ValueError(f"combine_bytes must be >= 0, got {self.combine_bytes!r}")


DEFAULT_OPTIONS = RunOptions()

#: ``memory_limit="auto"``: this fraction of the machine's physical memory, per run
#: (the shuffle actors of one node split it: ``_actor.resolve_memory_limit``).
AUTO_MEMORY_FRACTION = 1 / 16
_AUTO_MEMORY_FLOOR = 64 * 2**20


def auto_memory_limit(fraction: float = AUTO_MEMORY_FRACTION) -> int:
    """``fraction`` of this machine's physical memory, at least 64 MiB.

    A share, not all of it: Ray's object store (30% by default), the workers and
    other runs live on the same machine, and a run beyond its budget spills rather
    than fails.
    """
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system
        return 256 * 2**20
    return max(_AUTO_MEMORY_FLOOR, int(total * fraction))


@dataclass
class RunStats:
    """Counters of one run on one participant; payload bytes, headers not counted."""

    inputs_added: int = 0  # add_partition calls, retries included
    shards_local: int = 0  # own partitions' shards stored without a send
    bytes_local: int = 0
    messages_sent: int = 0  # accepted by their peer
    shards_sent: int = 0
    bytes_sent: int = 0
    messages_received: int = 0
    shards_received: int = 0  # new shards stored from peers' messages
    bytes_received: int = 0
    duplicates_ignored: int = 0  # shards (local or received) already stored
    outputs_read: int = 0


class ShuffleRun(abc.ABC):
    """This participant's state for one run: send buffer, receive store, first failure.

    The base of the two kinds of run, which differ in how an input is split and how an
    output is rebuilt: ``DataFrameShuffleRun`` (rows by a partition column) and
    ``ArrayRechunkRun`` (array chunks by the new chunking). ``send_limiter`` lets several
    runs share one send budget (the manager passes its own); without one the run gets a
    private limiter of ``options.send_buffer_bytes``. ``accept_any_sender`` accepts
    messages whose sender is not a participant (see the module docstring). Use from one
    event loop; ``get_output_partition`` may also run in a worker thread.
    """

    kind = "shuffle"

    def __init__(
        self,
        *,
        spec: ShuffleRunSpec,
        local: str,
        send: SendFn,
        options: RunOptions = DEFAULT_OPTIONS,
        send_limiter: ResourceLimiter | None = None,
        accept_any_sender: bool = False,
        registry: MemoryRegistry = HOST_REGISTRY,
    ) -> None:
        self.spec = spec
        self.registry = registry
        self.local = local
        self.options = options
        self.owned = spec.partitions_of(local)  # raises if local is no participant
        self.stats = RunStats()
        self._send = send
        self._accept_any_sender = accept_any_sender
        name = f"{spec.shuffle_id}[{spec.run_id}]@{local}"
        self._name = name
        self._buffer: ShardsBuffer[ShardKey, Any] = ShardsBuffer(
            send=self._send_batch,
            limiter=(
                ResourceLimiter(options.send_buffer_bytes, name=name)
                if send_limiter is None
                else send_limiter
            ),
            message_bytes=options.message_bytes,
            timeout=options.limiter_timeout,
            concurrency=options.concurrency,
            nbytes=payload_nbytes,
            name=f"{name}-send",
        )
        self._store = DiskShardStore(
            memory_limit=auto_memory_limit()
            if options.memory_limit == "auto"
            else options.memory_limit,
            directory=options.spill_directory,
            name=f"{name}-store",
            prefix=spill_prefix(local),  # a successor removes what a dead actor left
        )
        # shards' header meta where not empty: output partition -> input -> meta
        self._metas: dict[int, dict[int, bytes]] = {}
        self._inputs_done = False
        self._exception: Exception | None = None
        self._closed = False
        self._closed_event = asyncio.Event()

    def __repr__(self) -> str:
        state = "failed" if self._exception else "closed" if self._closed else "open"
        return f"<{type(self).__name__} {self._name} {state} inputs_done={self._inputs_done}>"

    def __str__(self) -> str:  # how errors and logs name the run
        return f"{self.kind} run {self._name}"

    @property
    def shuffle_id(self) -> ShuffleId:
        return self.spec.shuffle_id

    @property
    def run_id(self) -> RunId:
        return self.spec.run_id

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def exception(self) -> Exception | None:
        """The first failure, if any."""
        return self._exception

    @property
    def spill_directory(self) -> Path | None:
        """This run's private spill directory while it exists (first spill to close)."""
        return self._store.directory

    def raise_if_closed(self) -> None:
        """Raise the first failure if there was one, else ``ShuffleClosedError`` if closed."""
        if self._exception is not None:
            raise self._exception
        if self._closed:
            raise ShuffleClosedError(self.shuffle_id, self.run_id)

    async def _add_shards(
        self, by_owner: dict[str, list[tuple[int, Any]]], input_partition: int
    ) -> RunId:
        """Store own partitions' shards, queue the rest per owner; wait for budget."""
        self.stats.inputs_added += 1
        # Own partitions skip the message codec and the buffer.
        for partition, payload in by_owner.pop(self.local, ()):
            key = ShardKey(partition, input_partition)
            if self._store_shard(key, payload):
                self.stats.shards_local += 1
                self.stats.bytes_local += payload_nbytes(payload)
            else:
                self.stats.duplicates_ignored += 1
        await self._buffer.write(
            {
                owner: [(ShardKey(p, input_partition), payload) for p, payload in items]
                for owner, items in by_owner.items()
            }
        )
        self.raise_if_closed()  # closed or failed while this call waited for budget
        return self.run_id

    def _check_add(self, input_partition: int) -> None:
        self.raise_if_closed()
        if self._inputs_done:
            raise RuntimeError(
                f"{self}: input partition {input_partition} arrived after flush(); a "
                "late input needs a new run"
            )
        check_input_partition(input_partition, where=str(self))

    def _store_shard(self, key: ShardKey, payload: Any, meta: bytes = b"") -> bool:
        if isinstance(payload, Piece):
            payload, meta = payload.data, payload.meta
        if not self._store.append(key, payload):
            return False
        if meta:
            self._metas.setdefault(key.output_partition, {})[key.input_partition] = meta
        return True

    async def receive(self, frames: Sequence[Any]) -> None:
        """Store the shards of one message from a peer.

        Rejects, without storing anything: malformed frames, another shuffle, a peer
        that is not a participant (unless ``accept_any_sender``), or partitions this
        participant does not own
        (``FrameError``), and another run of this shuffle (``StaleRunError``). A
        rejected message does not fail the run; the sender gets the error.
        """
        self.raise_if_closed()
        message = decode_message(
            frames, registry=self.registry, npartitions_out=self.spec.npartitions_out
        )
        header = message.header
        if header.shuffle_id != self.shuffle_id:
            raise FrameError(
                f"{self} received a message of shuffle {header.shuffle_id!r} from "
                f"{header.sender!r}"
            )
        self.spec.check_run_id(header.run_id)
        if not self._accept_any_sender and header.sender not in self.spec.participants:
            raise FrameError(f"{self}: sender {header.sender!r} is not a participant")
        foreign = sorted(
            {e.output_partition for e in header.entries if e.output_partition not in self.owned}
        )
        if foreign:
            raise FrameError(
                f"{self} received shards of output partitions {foreign} from "
                f"{header.sender!r}, but owns only {self.owned}"
            )
        entries = header.entries
        self._admit(entries)
        self.stats.messages_received += 1
        # One batch, one lock; sizes come from the header, which decoding checked.
        added = self._store.append_many(
            [(e.key, b, e.nbytes) for e, b in zip(entries, message.buffers, strict=True)]
        )
        metas = self._metas
        for entry, new in zip(entries, added, strict=True):
            if not new:
                self.stats.duplicates_ignored += 1
                continue
            if entry.meta:
                metas.setdefault(entry.output_partition, {})[entry.input_partition] = entry.meta
            self.stats.shards_received += 1
            self.stats.bytes_received += entry.nbytes
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "%s: %d shards (%d bytes) from %s",
                self,
                len(header.entries),
                header.nbytes,
                header.sender,
            )

    async def flush(self) -> None:
        """Declare the inputs done and wait until every queued shard was accepted.

        Raises the first send failure. Idempotent; ``add_partition`` fails afterwards.
        """
        self.raise_if_closed()
        self._inputs_done = True
        await self._buffer.flush()
        self.raise_if_closed()

    def _admit(self, entries: Sequence[Any]) -> None:
        """Refuse (raise) a message whose entries contradict what is stored; the
        dataframe run checks joined pieces' coverage."""

    @abc.abstractmethod
    def get_output_partition(self, partition: int) -> Any:
        """Output ``partition`` (owned here), rebuilt from its shards in input order.

        Valid once every participant's ``flush`` has returned; the run cannot check the
        others, it checks only its own. May be called again (a retried unpack task).
        """

    def _read(self, partition: int) -> list[tuple[int, Any, bytes]]:
        """``(input partition, payload, meta)`` of every shard of owned ``partition``."""
        self.raise_if_closed()
        if partition not in self.owned:
            raise ValueError(
                f"{self}: output partition {partition} belongs to "
                f"{self.spec.owner_of(partition)!r}, not here"
            )
        if not self._inputs_done:
            raise RuntimeError(f"{self}: get_output_partition called before flush()")
        try:
            items = self._store.read_items(partition)
        except BufferClosedError:
            self.raise_if_closed()  # closed from the event loop while a thread read
            raise
        metas = self._metas.get(partition, {})
        return [(i, p, metas.get(i, b"")) for i, p in items]

    async def fail(self, exc: Exception) -> None:
        """Record ``exc`` as the failure, unless one came first, and close."""
        self._record_failure(exc)
        await self.close()

    async def close(self) -> None:
        """Drop queued shards, cancel sends, delete spill files; idempotent.

        A second caller waits until the first caller's close has finished.
        """
        if self._closed:
            await self._closed_event.wait()
            return
        self._closed = True
        try:
            await self._buffer.abort()
        finally:
            self._store.cleanup()
            self._closed_event.set()
            logger.debug("%s closed: %s", self, self.stats)

    async def _send_batch(self, destination: str, batch: list[tuple[ShardKey, pa.Buffer]]) -> None:
        message = encode_message(
            shuffle_id=self.shuffle_id,
            run_id=self.run_id,
            sender=self.local,
            shards=batch,
            registry=self.registry,
        )
        try:
            await self._send(destination, message.frames())
        except Exception as e:
            # The buffer keeps the failure too, but the run must refuse every method.
            self._record_failure(e)
            raise
        self.stats.messages_sent += 1
        self.stats.shards_sent += len(batch)
        self.stats.bytes_sent += message.header.nbytes

    def _record_failure(self, exc: Exception) -> None:
        # A failure after a plain close changes nothing: callers already see "closed".
        if self._exception is None and not self._closed:
            self._exception = exc
            logger.info("%s failed: %r", self, exc)


class DataFrameShuffleRun(ShuffleRun):
    """A dataframe shuffle: rows move by dask's partition column.

    ``meta`` is dask's empty frame for the input partitions, partition column included.
    Shards are Arrow record batches, or IPC streams for dictionary columns (``_arrow``).
    """

    kind = "shuffle"

    def __init__(self, *, meta: pd.DataFrame, **common: Any) -> None:
        """``common``: ``ShuffleRun``'s keywords (spec, local, send, options, ...)."""
        spec: ShuffleRunSpec = common["spec"]
        if spec.column not in meta.columns:
            raise ValueError(
                f"shuffle {spec.shuffle_id!r}: partition column {spec.column!r} is not in "
                f"meta's columns {list(meta.columns)}"
            )
        super().__init__(**common)
        self.meta = meta
        self.output_meta = meta.drop(columns=spec.column) if spec.drop_column else meta
        self._coverage = Coverage()

    def _admit(self, entries: Sequence[Any]) -> None:
        # Joined pieces (shuffle._combine) must not overlap: a name-based dedupe
        # would lose or double rows of a retry that computed different inputs.
        self._coverage.admit((e.output_partition, e.input_partition, e.meta) for e in entries)

    async def add_partition(self, df: pd.DataFrame, input_partition: int) -> RunId:
        """Shard input partition ``input_partition`` to the owners of its rows.

        Returns once the shards are stored (own partitions) or queued for sending and
        the send budget has room again. A retried call resends everything; receivers
        drop the pieces they already hold.
        """
        self._check_add(input_partition)
        check_frame(df, self.meta, input_partition, where=str(self))
        # Own partitions are encoded too: the store measures and spills bytes.
        return await self._add_shards(shard_frame(df, self.spec), input_partition)

    def get_output_partition(self, partition: int) -> Any:
        """Output ``partition`` as a frame like ``meta``, pieces in input partition order
        (a joined piece, ``shuffle._combine``, sorts by its smallest input).

        Arrow pieces give a pandas frame; cuDF pieces (``_cudf``) a cuDF one.
        """
        shards = [(i, payload, split_joined(meta)[1]) for i, payload, meta in self._read(partition)]
        if any(meta.startswith(CUDF_TAG) for _, _, meta in shards):
            out = concat_cudf([(meta, payload) for _, payload, meta in shards], meta=self.output_meta)
        else:
            tables = pieces_to_tables([(meta, payload) for _, payload, meta in shards])
            out = concat_partition(tables, meta=self.output_meta)
        self.stats.outputs_read += 1
        return out


class ArrayRechunkRun(ShuffleRun):
    """An array rechunk: pieces of input chunks move to the owners of output chunks.

    Partitions are flat chunk numbers of ``layout`` (``shuffle._rechunk``); the spec's
    ``npartitions_out`` must be the layout's. Shards are ``Piece``s: raw array memory
    with dtype and shape in the header (``shuffle._ndarray``).
    """

    kind = "rechunk"

    def __init__(self, *, layout: RechunkLayout, **common: Any) -> None:
        """``common``: ``ShuffleRun``'s keywords (spec, local, send, options, ...)."""
        spec: ShuffleRunSpec = common["spec"]
        if spec.npartitions_out != layout.npartitions_out:
            raise ValueError(
                f"rechunk {spec.shuffle_id!r}: the spec has {spec.npartitions_out} output "
                f"partitions, the layout {layout.npartitions_out} output chunks"
            )
        super().__init__(**common)
        self.layout = layout

    async def add_partition(self, array: Any, input_partition: int) -> RunId:
        """Cut input chunk ``input_partition`` by the output chunks; send the pieces."""
        self._check_add(input_partition)
        by_owner = split_chunk(array, self.layout, input_partition, owner_of=self.spec.owner_of)
        return await self._add_shards(by_owner, input_partition)

    def get_output_partition(self, partition: int) -> Any:
        """Output chunk ``partition``, assembled from its pieces."""
        pieces = [(i, decode_piece(meta, payload)) for i, payload, meta in self._read(partition)]
        out = assemble_chunk(pieces, self.layout, partition, where=str(self))
        self.stats.outputs_read += 1
        return out


def check_frame(df: Any, meta: Any, input_partition: int, *, where: str) -> None:
    """A dataframe input partition must be a pandas or cuDF frame with meta's columns."""
    if not isinstance(df, pd.DataFrame) and not is_cudf_frame(df):
        raise TypeError(f"{where}: expected a pandas or cuDF DataFrame, got {type(df).__name__}")
    if len(df.columns) != len(meta.columns) or set(df.columns) != set(meta.columns):
        raise ValueError(
            f"{where}: input partition {input_partition} has columns "
            f"{list(df.columns)!r}, meta has {list(meta.columns)!r}"
        )


def shard_frame(df: Any, spec: ShuffleRunSpec) -> dict[str, list[tuple[int, Any]]]:
    """A dataframe partition as ``{owner: [(output partition, payload)]}``.

    Payloads are Arrow record-batch ``Piece``s sharing one schema (``shuffle._arrow``),
    or for a cuDF frame device ``Piece``s split on the GPU; only the partitions in
    ``spec.needed`` (if set) are made.
    """
    options = dict(
        column=spec.column,
        npartitions=spec.npartitions_out,
        drop_column=spec.drop_column,
        keep=spec.needed,
    )
    shards: dict[int, Any]
    if is_cudf_frame(df):
        shards = split_cudf(df, **options)
    else:
        shards = encode_slices(*sort_by_partition(df, **options))
    return group_by_owner(shards, owner_of=spec.owner_of)


def check_input_partition(input_partition: Any, *, where: str) -> None:
    """Input partitions travel as u32 in the wire header."""
    if (
        isinstance(input_partition, bool)
        or not isinstance(input_partition, int)
        or not 0 <= input_partition <= _MAX_PARTITION
    ):
        raise ValueError(
            f"{where}: input partition must be an int in [0, 2**32), got {input_partition!r}"
        )


def split_chunk(
    array: Any, layout: RechunkLayout, input_partition: int, *, owner_of: Callable[[int], str]
) -> dict[str, list[tuple[int, Piece]]]:
    """Input chunk ``input_partition`` as ``{owner: [(output chunk, Piece)]}``."""
    shape = layout.input_shape(input_partition)
    got = tuple(getattr(array, "shape", ()))
    if len(got) != len(shape) or any(
        e is not None and e != g for e, g in zip(shape, got, strict=True)
    ):
        raise ValueError(
            f"input chunk {layout.input_index(input_partition)} has shape "
            f"{getattr(array, 'shape', None)}, the rechunk expects {shape}"
        )
    out: dict[str, list[tuple[int, Piece]]] = {}
    for partition, slices in layout.pieces_of_input(input_partition):
        out.setdefault(owner_of(partition), []).append((partition, encode_piece(array[slices])))
    return out


def assemble_chunk(
    pieces: Sequence[tuple[int, Any]], layout: RechunkLayout, partition: int, *, where: str
) -> Any:
    """Output chunk ``partition`` from ``(input chunk, piece)`` pairs; checks completeness."""
    placement = dict(layout.pieces_of_output(partition))
    got = [i for i, _ in pieces]
    if sorted(got) != sorted(placement):
        missing = sorted(set(placement) - set(got))
        raise RuntimeError(
            f"{where}: output chunk {layout.output_index(partition)} is missing the pieces "
            f"of input chunks {[layout.input_index(i) for i in missing][:10]}"
            if missing
            else f"{where}: output chunk {layout.output_index(partition)} got unexpected pieces"
        )
    first = pieces[0][1]
    # Along an axis of unknown length every piece is a whole input chunk (_rechunk).
    shape = tuple(
        first.shape[axis] if n is None else n
        for axis, n in enumerate(layout.output_shape(partition))
    )
    if len(pieces) == 1 and tuple(first.shape) == shape:
        return first  # one input covers the chunk: no copy
    dtypes = {piece.dtype for _, piece in pieces}
    if len(dtypes) != 1:
        raise ValueError(f"{where}: pieces of output chunk {partition} disagree on dtype: {dtypes}")
    # empty_like keeps the array library (numpy or CuPy) of the pieces.
    out = _empty_like(first, shape)
    for i, piece in pieces:
        out[placement[i]] = piece
    return out


def _empty_like(prototype: Any, shape: tuple[int, ...]) -> Any:
    return np.empty_like(prototype, shape=shape)
