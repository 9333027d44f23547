"""What a Ray transfer task runs: send input partitions out of band.

It runs synchronously inside an ordinary Ray worker process (the scheduler calls it
from its grouped tasks). ``transfer`` sends one input partition: the process's
``ShuffleClient`` does the work and returns once every owner acknowledged every
piece, so the returned marker, on which the barrier depends, means "this input
partition is stored at its owners".

``InputBatch`` is for a task that computes several inputs of one run: it stages
dataframe inputs and sends them joined into one frame (``shuffle._combine``) once
``RunOptions.combine_bytes`` are staged, and the rest at ``flush``. Its markers
hold the same promise only once ``flush`` returned, so whoever uses it must not let
them out before (the scheduler's group runner flushes before a group returns).
"""

from __future__ import annotations

from typing import Any

from shuffle._combine import combine, frame_nbytes, runs_to_combine
from shuffle._rechunk import is_rechunk
from shuffle._split import check_input
from shuffle.shell._client import ShuffleClient
from shuffle.shell._handle import RunHandle
from shuffle.shell._process import get_client

__all__ = ["InputBatch", "transfer", "warm_imports", "warm_sender"]


def warm_imports(transport: str) -> None:
    """Import what sending needs (this module, by now) and the transport's library
    (``transport``: a name of ``get_transport``), as this process's first transfer
    would; needs no actor, so it can run while the actors start."""
    if transport in ("ucx", "auto"):
        from shuffle._transport import ucx

        ucx.is_available()  # imports ucxx; a failure is the first transfer's to report
    else:
        from shuffle._transport import tcp  # noqa: F401


def warm_sender(addresses: list[str], *, transport: str, secret: bytes) -> None:
    """Ready this process to send to the actors at ``addresses``: its client, transport
    (UCX context) and authenticated connections, as the first transfer would."""
    get_client().connect(addresses, transport=transport, secret=secret)


def transfer(data: Any, handle: RunHandle, input_partition: int | tuple[int, ...]) -> int:
    """Send ``data``, input partition ``input_partition`` of ``handle``'s run, to its
    owners; return the (flat) input partition number.

    ``data`` is a dataframe partition, or for a rechunk an array chunk, whose
    ``input_partition`` may be dask's block index (a tuple) within the rechunk.
    """
    if isinstance(input_partition, tuple):
        if not is_rechunk(handle.meta):
            raise TypeError(
                f"shuffle {handle.spec.shuffle_id!r}: a block index {input_partition} names "
                "an array chunk, but this run shuffles dataframes"
            )
        input_partition = handle.meta.flat_input(input_partition)
    get_client().shuffle(data, handle, input_partition)
    return input_partition


class InputBatch:
    """Dataframe input partitions of one run, sent combined (module docstring)."""

    def __init__(self, handle: RunHandle, *, client: ShuffleClient | None = None) -> None:
        if is_rechunk(handle.meta):
            raise TypeError(
                f"shuffle {handle.spec.shuffle_id!r}: an InputBatch combines dataframe "
                "inputs; send array chunks with transfer()"
            )
        self.handle = handle
        self._client = client
        self._limit = handle.options.combine_bytes
        self._staged: list[tuple[int, Any]] = []
        self._nbytes = 0

    def __repr__(self) -> str:
        spec = self.handle.spec
        return f"<InputBatch {spec.shuffle_id!r}[{spec.run_id}] staged={len(self._staged)}>"

    @property
    def staged(self) -> list[int]:
        """The input partitions staged and not sent yet."""
        return [i for i, _ in self._staged]

    def add(self, df: Any, input_partition: int) -> int:
        """Stage input ``input_partition`` (checked now); send what is staged once it
        reaches the run's ``combine_bytes``. Returns the marker, as ``transfer``."""
        check_input(
            df, spec=self.handle.spec, meta=self.handle.meta, input_partition=input_partition
        )
        self._staged.append((input_partition, df))
        self._nbytes += frame_nbytes(df)
        if self._nbytes >= self._limit:
            self.flush()
        return input_partition

    def finish(self) -> None:
        """``flush``, by the name a scheduler's group runner calls at a group's end."""
        self.flush()

    def flush(self) -> None:
        """Send every staged input; return once all are acknowledged."""
        staged, self._staged, self._nbytes = self._staged, [], 0
        if staged:
            client = self._client if self._client is not None else get_client()
            parts = [combine(run) for run in runs_to_combine(staged)]
            client.shuffle_many(parts, self.handle, checked=True)
