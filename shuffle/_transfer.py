"""The function a Ray transfer task runs: send one input partition out of band.

It runs synchronously inside an ordinary Ray worker process (the scheduler calls it
from its grouped tasks). The process's ``ShuffleClient`` does the work and returns
once every owner acknowledged every piece, so the returned marker, on which the
barrier depends, means "this input partition is stored at its owners".
"""

from __future__ import annotations

import pandas as pd

from shuffle._client import get_client
from shuffle._handle import RunHandle

__all__ = ["transfer"]


def transfer(df: pd.DataFrame, handle: RunHandle, input_partition: int) -> int:
    """Shuffle ``df``, input partition ``input_partition`` of ``handle``'s run, to its
    owners; return ``input_partition``."""
    get_client().shuffle(df, handle, input_partition)
    return input_partition
