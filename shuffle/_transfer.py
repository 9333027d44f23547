"""The function a Ray transfer task runs: send one input partition out of band.

It runs synchronously inside an ordinary Ray worker process (the scheduler calls it
from its grouped tasks). The process's ``ShuffleClient`` does the work and returns
once every owner acknowledged every piece, so the returned marker, on which the
barrier depends, means "this input partition is stored at its owners".
"""

from __future__ import annotations

from typing import Any

from shuffle._client import get_client
from shuffle._handle import RunHandle
from shuffle._rechunk import RechunkLayout

__all__ = ["transfer"]


def transfer(data: Any, handle: RunHandle, input_partition: int | tuple[int, ...]) -> int:
    """Send ``data``, input partition ``input_partition`` of ``handle``'s run, to its
    owners; return the (flat) input partition number.

    ``data`` is a dataframe partition, or for a rechunk an array chunk, whose
    ``input_partition`` may be dask's block index (a tuple) within the rechunk.
    """
    if isinstance(input_partition, tuple):
        if not isinstance(handle.meta, RechunkLayout):
            raise TypeError(
                f"shuffle {handle.spec.shuffle_id!r}: a block index {input_partition} names "
                "an array chunk, but this run shuffles dataframes"
            )
        input_partition = handle.meta.flat_input(input_partition)
    get_client().shuffle(data, handle, input_partition)
    return input_partition
