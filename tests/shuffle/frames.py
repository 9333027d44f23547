"""Input partitions for shuffle tests (the dtypes users shuffle, missing values included),
and a message carrying some of their rows as one piece."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from shuffle._ids import ShardKey
from shuffle._spec import ShuffleRunSpec
from shuffle.wire._arrow import table_to_buffer
from shuffle.wire._message import encode_message

COLORS = pd.CategoricalDtype(["red", "green", "blue"])
COLUMN = "_partitions"  # each row's output partition


def make_frame(
    nrows: int,
    *,
    npartitions_out: int,
    seed: int,
    offset: int = 0,
    skew_key: int | None = None,
) -> pd.DataFrame:
    """One input partition, indexed from ``offset``; ``skew_key``: every row's partition."""
    rng = np.random.default_rng(seed)
    missing = rng.random(nrows) < 0.2

    def with_missing(values: Any, dtype: str) -> Any:
        array = pd.array(values, dtype=dtype)
        array[missing] = None
        return array

    words = np.array(["alpha", "beta", "gamma", "δέλτα"], dtype=object)
    words = words[rng.integers(0, 4, nrows)]
    if skew_key is None:
        codes = rng.integers(0, npartitions_out, nrows)
    else:
        codes = np.full(nrows, skew_key, dtype=np.int64)
    # unit="ns": pandas 3 infers seconds for an empty array, and meta must match.
    instants = pd.to_datetime(rng.integers(0, 10**18, nrows), unit="ns", utc=True)
    # Arrays, not Series: a Series would be aligned on the (offset) index.
    return pd.DataFrame(
        {
            "i8": rng.integers(-(10**9), 10**9, nrows),
            "f8": with_missing(rng.random(nrows), "float64"),
            "text": with_missing(words, "str"),
            "nullable_text": with_missing(words, "string"),
            "color": pd.Categorical.from_codes(rng.integers(0, 3, nrows), dtype=COLORS),
            "Int64": with_missing(rng.integers(0, 9, nrows), "Int64"),
            "boolean": with_missing(rng.random(nrows) < 0.5, "boolean"),
            "when": instants.tz_convert("Asia/Kolkata").array,
            "naive": instants.tz_localize(None).array,
            COLUMN: codes,
        },
        index=pd.RangeIndex(offset, offset + nrows),
    )


def piece_message(
    spec: ShuffleRunSpec, *, sender: str, key: ShardKey, rows: pd.DataFrame
) -> list[Any]:
    """The frames of a message from ``sender`` to ``spec``'s run: ``rows`` of an input,
    partition column dropped, as the one piece ``key``."""
    table = table_to_buffer(pa.Table.from_pandas(rows.drop(columns=COLUMN)))
    return encode_message(
        shuffle_id=spec.shuffle_id, run_id=spec.run_id, sender=sender, shards=[(key, table)]
    ).frames()
