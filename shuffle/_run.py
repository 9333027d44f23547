"""One participant's share of one run of a dataframe shuffle or an array rechunk.

Modelled on ``distributed.shuffle._core.ShuffleRun`` and ``_shuffle.DataFrameShuffleRun``.
A run lives on one participant (one actor) for one ``(shuffle_id, run_id)`` and only
receives: senders (transfer tasks, ``shuffle._send``) split inputs and send pieces.

* **receive**: ``receive(frames)`` takes one message, checks that it belongs to this
  run and only names partitions this participant owns, and stores its shards. Shards
  are keyed by ``ShardKey``, so a piece resent by a retried transfer is dropped. With
  ``accept_any_sender`` the sender need not be a participant: in the Ray service,
  transfer tasks (not actors) send, and the transport has already authenticated them;
  dedupe by ``ShardKey`` does not depend on who sent a shard.
* **barrier**: ``inputs_done()`` declares that every sender returned (the driver's
  barrier passed), so every shard is stored; from then on outputs may be read.
* **unpack**: ``get_output_partition(p)`` concatenates the shards of ``p`` in
  input-partition order, so the result does not depend on arrival order. It reads
  back only ``p``'s spilled shards and releases ``p``'s shards from the store as it
  reads them, so unpacking holds the memory budget plus the outputs being built; an
  output is read once.

``ShuffleRun`` holds all of that; its two kinds differ only in rebuilding:
``DataFrameShuffleRun`` concatenates Arrow (or cuDF) pieces into a frame,
``ArrayRechunkRun`` places array pieces into output chunks (``shuffle._rechunk``).

Failure semantics follow ``distributed``: the first failure (``fail(exc)``) is kept,
and from then on every public method raises it; after a plain ``close()`` they raise
``ShuffleClosedError``. ``close()`` is idempotent and immediate (spill files deleted),
like ucxx's ``abort()``: by the time a run is closed, either its data was consumed or
it is void.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from shuffle._closable import Closable
from shuffle._combine import Coverage, split_joined
from shuffle._exceptions import BufferClosedError, FrameError, ShuffleClosedError
from shuffle._ids import RunId, ShuffleId
from shuffle._options import DEFAULT_OPTIONS, RunOptions, auto_memory_limit
from shuffle._partition import concat_partition
from shuffle._rechunk import RechunkLayout
from shuffle._spec import ShuffleRunSpec
from shuffle._store import DiskShardStore, spill_prefix
from shuffle._usage import RunUsage
from shuffle.device._cudf import CUDF_TAG, concat_cudf
from shuffle.wire._arrow import pieces_to_tables
from shuffle.wire._memory import HOST_REGISTRY, MemoryRegistry
from shuffle.wire._message import decode_message
from shuffle.wire._ndarray import decode_piece

__all__ = [
    "ArrayRechunkRun",
    "DataFrameShuffleRun",
    "ReceiveStats",
    "ShuffleRun",
    "assemble_chunk",
]

logger = logging.getLogger(__name__)


@dataclass
class ReceiveStats:
    """Counters of one run on one participant; payload bytes, headers not counted."""

    messages_received: int = 0
    shards_received: int = 0  # new shards stored from senders' messages
    bytes_received: int = 0
    duplicates_ignored: int = 0  # shards already stored (a retried transfer's)
    outputs_read: int = 0
    unpack_seconds: float = 0.0  # building outputs, summed over the threads that do it


class ShuffleRun(Closable, abc.ABC):
    """This participant's state for one run: receive store, first failure.

    The base of the two kinds of run, which differ in how an output is rebuilt:
    ``DataFrameShuffleRun`` (rows by a partition column) and ``ArrayRechunkRun`` (array
    chunks by the new chunking). ``accept_any_sender`` accepts messages whose sender is
    not a participant (see the module docstring). Use from one event loop;
    ``get_output_partition`` may also run in a worker thread.
    """

    kind = "shuffle"

    def __init__(
        self,
        *,
        spec: ShuffleRunSpec,
        local: str,
        options: RunOptions = DEFAULT_OPTIONS,
        accept_any_sender: bool = False,
        registry: MemoryRegistry = HOST_REGISTRY,
    ) -> None:
        self.spec = spec
        self.registry = registry
        self.local = local
        self.options = options
        self.owned = spec.partitions_of(local)  # raises if local is no participant
        self.stats = ReceiveStats()
        self._created = time.monotonic()
        self._last_received: float | None = None  # when the last message was stored
        self._accept_any_sender = accept_any_sender
        name = f"{spec.shuffle_id}[{spec.run_id}]@{local}"
        self._name = name
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
        self._outputs_read: set[int] = set()  # handed over, their shards released
        self._exception: Exception | None = None
        self._closed = False
        self._spilling: asyncio.Future[None] | None = None  # the store's spill, in a thread

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
    def exception(self) -> Exception | None:
        """The first failure, if any."""
        return self._exception

    @property
    def spill_directory(self) -> Path | None:
        """This run's private spill directory while it exists (first spill to close)."""
        return self._store.directory

    def usage(self) -> RunUsage:
        """What this run received and holds now (cheap: reads counters, takes no lock)."""
        store, stats = self._store, self.stats
        return RunUsage(
            shuffle_id=str(self.shuffle_id),
            run_id=int(self.run_id),
            kind=self.kind,
            participant=self.local,
            messages_received=stats.messages_received,
            pieces_received=stats.shards_received,
            bytes_received=stats.bytes_received,
            memory_bytes=store.nbytes_memory,
            disk_bytes=store.nbytes_disk,
            device_bytes=store.nbytes_device,
            bytes_spilled=store.bytes_spilled,
            bytes_read_back=store.bytes_read_back,
            seconds=time.monotonic() - self._created,
            spill_seconds=store.seconds_spilling,
            read_back_seconds=store.seconds_reading_back,
            receive_seconds=0.0
            if self._last_received is None
            else self._last_received - self._created,
            unpack_seconds=stats.unpack_seconds,
        )

    def raise_if_closed(self) -> None:
        """Raise the first failure if there was one, else ``ShuffleClosedError`` if closed."""
        if self._exception is not None:
            raise self._exception
        if self._closed:
            raise ShuffleClosedError(self.shuffle_id, self.run_id)

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
                f"{self} received a message of shuffle {header.shuffle_id!r} from {header.sender!r}"
            )
        self.spec.check_run_id(header.run_id)
        if not self._accept_any_sender and header.sender not in self.spec.participants:
            raise FrameError(f"{self}: sender {header.sender!r} is not a participant")
        beyond = self.spec.inputs_out_of_range(e.input_partition for e in header.entries)
        if beyond:
            raise FrameError(
                f"{self} received shards of input partitions {beyond[:8]} from "
                f"{header.sender!r}, but the run has {self.spec.npartitions_in} inputs"
            )
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
        self._last_received = time.monotonic()
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
        await self._keep_within_budget()

    async def _keep_within_budget(self) -> None:
        """Spill in a thread once the store is near its budget, so that messages keep
        arriving while the disk writes; past the budget this sender waits for the disk
        (its ack is its back-pressure), and a failed write is its error."""
        store = self._store
        if store.spill_due:
            self._spill()
        if not store.over_limit:
            return
        while store.over_limit:
            await asyncio.shield(self._spill())
        self.raise_if_closed()  # closed while this sender waited: its pieces are gone

    def _spill(self) -> asyncio.Future[None]:
        spilling = self._spilling
        if spilling is None or spilling.done():
            spilling = self._spilling = asyncio.ensure_future(asyncio.to_thread(self._store.spill))
            spilling.add_done_callback(self._spilled)
        return spilling

    def _spilled(self, spilling: asyncio.Future[None]) -> None:
        if not spilling.cancelled() and spilling.exception() is not None:
            # The shards stay in memory; the next spill tries again, and a sender
            # waiting for one gets the error.
            logger.warning("%s could not spill: %r", self, spilling.exception())

    def inputs_done(self) -> None:
        """Declare every input sent: the driver's barrier passed, so every sender's
        messages were accepted. Outputs may be read from then on. Idempotent."""
        self.raise_if_closed()
        self._inputs_done = True

    def _admit(self, entries: Sequence[Any]) -> None:
        """Refuse (raise) a message whose entries contradict what is stored; the
        dataframe run checks joined pieces' coverage."""

    @abc.abstractmethod
    def get_output_partition(self, partition: int) -> Any:
        """Output ``partition`` (owned here), rebuilt from its shards in input order.

        Valid once ``inputs_done`` was called; the run cannot check that every sender
        returned, the driver's barrier does. Read once: the shards are released as
        they are read, and a second read raises ``ShuffleClosedError`` (an unpack is
        never retried within a run: a lost output restarts the shuffle under a new run).
        """

    def output_nbytes(self, partition: int) -> int:
        """Host bytes of ``partition``'s shards (in memory and spilled): about what
        building it takes on top of its result."""
        return self._store.nbytes_of(partition)

    def _read(self, partition: int) -> list[tuple[int, Any, bytes]]:
        """``(input partition, payload, meta)`` of every shard of owned ``partition``."""
        self.raise_if_closed()
        if partition not in self.owned:
            raise ValueError(
                f"{self}: output partition {partition} belongs to "
                f"{self.spec.owner_of(partition)!r}, not here"
            )
        if not self._inputs_done:
            raise RuntimeError(f"{self}: get_output_partition called before inputs_done()")
        if partition in self._outputs_read:
            raise ShuffleClosedError(
                self.shuffle_id,
                self.run_id,
                f"output partition {partition} was already handed over by {self.local!r} "
                "and its shards released",
            )
        self._outputs_read.add(partition)
        try:
            # Released as read: unpacking holds the budget plus the outputs being built.
            items = self._store.read_items(partition, release=True)
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
        """Delete the stored shards and spill files; idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._store.cleanup()
        finally:
            logger.debug("%s closed: %s", self, self.stats)

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
        """``common``: ``ShuffleRun``'s keywords (spec, local, options, ...)."""
        spec: ShuffleRunSpec = common["spec"]
        if spec.column not in meta.columns:
            raise ValueError(
                f"shuffle {spec.shuffle_id!r}: partition column {spec.column!r} is not in "
                f"meta's columns {list(meta.columns)}"
            )
        super().__init__(**common)
        self.meta = meta
        self.output_meta = meta.drop(columns=spec.column) if spec.drop_column else meta
        self._coverage = Coverage(npartitions_in=spec.npartitions_in)

    def _admit(self, entries: Sequence[Any]) -> None:
        # Joined pieces (shuffle._combine) must not overlap: a name-based dedupe
        # would lose or double rows of a retry that computed different inputs.
        self._coverage.admit((e.output_partition, e.input_partition, e.meta) for e in entries)

    def get_output_partition(self, partition: int) -> Any:
        """Output ``partition`` as a frame like ``meta``, pieces in input partition order
        (a joined piece, ``shuffle._combine``, sorts by its smallest input).

        Arrow pieces give a pandas frame; cuDF pieces (``_cudf``) a cuDF one.
        """
        started = time.perf_counter()
        shards = [(i, payload, split_joined(meta)[1]) for i, payload, meta in self._read(partition)]
        if any(meta.startswith(CUDF_TAG) for _, _, meta in shards):
            pieces = [(meta, payload) for _, payload, meta in shards]
            out = concat_cudf(pieces, meta=self.output_meta)
        else:
            tables = pieces_to_tables([(meta, payload) for _, payload, meta in shards])
            out = concat_partition(tables, meta=self.output_meta)
        self.stats.outputs_read += 1
        self.stats.unpack_seconds += time.perf_counter() - started
        return out


class ArrayRechunkRun(ShuffleRun):
    """An array rechunk: pieces of input chunks move to the owners of output chunks.

    Partitions are flat chunk numbers of ``layout`` (``shuffle._rechunk``); the spec's
    ``npartitions_out`` must be the layout's. Shards are ``Piece``s: raw array memory
    with dtype and shape in the header (``shuffle.wire._ndarray``).
    """

    kind = "rechunk"

    def __init__(self, *, layout: RechunkLayout, **common: Any) -> None:
        """``common``: ``ShuffleRun``'s keywords (spec, local, options, ...)."""
        spec: ShuffleRunSpec = common["spec"]
        if spec.npartitions_out != layout.npartitions_out:
            raise ValueError(
                f"rechunk {spec.shuffle_id!r}: the spec has {spec.npartitions_out} output "
                f"partitions, the layout {layout.npartitions_out} output chunks"
            )
        super().__init__(**common)
        self.layout = layout

    def get_output_partition(self, partition: int) -> Any:
        """Output chunk ``partition``, assembled from its pieces."""
        started = time.perf_counter()
        pieces = [(i, decode_piece(meta, payload)) for i, payload, meta in self._read(partition)]
        out = assemble_chunk(pieces, self.layout, partition, where=str(self))
        self.stats.outputs_read += 1
        self.stats.unpack_seconds += time.perf_counter() - started
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
