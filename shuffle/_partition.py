"""Split dataframes into per-output-partition Arrow tables, and put them back together.

Dask's P2P graphs hand every input partition a precomputed integer column (by default
``_partitions``) naming each row's output partition. The sender sorts by it once, gathers
the table once, and cuts zero-copy slices at the boundaries; it never builds one boolean
mask per partition. The sort is a stable argsort of the codes narrowed to 8 or 16 bits
where they fit, which numpy sorts by radix in O(n) (8x faster than an int64 argsort
on 512k rows). The receiver concatenates the tables it got for one output partition
and conforms the result to dask's ``meta``.

Arrow field names are strings, and ``Table.from_pandas`` turns other column labels
(ints, floats, tuples, mixed or duplicated ones) into strings that do not round-trip.
So the sender names the fields ``arrow_names(labels)``: the labels themselves when
they are distinct strings (the usual case, no cost), else one derived name per label.
The receiver derives the same names from ``meta``'s columns, checks them, and takes
the labels from ``meta``, positionally: ``meta`` is the truth about the labels.
Index names that Arrow cannot carry (not strings, or clashing with a field) are
dropped by the sender and taken from ``meta`` too.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import TypeVar

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from pandas.core.dtypes.cast import find_common_type  # what distributed.shuffle uses

from shuffle._malloc import sender_pool

__all__ = [
    "arrow_names",
    "concat_partition",
    "group_by_owner",
    "sort_by_partition",
]

T = TypeVar("T")

# dask.dataframe.utils.UNKNOWN_CATEGORIES, copied to keep dask.dataframe's import cost out
# of this module; a test pins it to dask's value.
UNKNOWN_CATEGORIES = "__UNKNOWN_CATEGORIES__"


def sort_by_partition(
    df: pd.DataFrame,
    *,
    column: str,
    npartitions: int | None = None,
    drop_column: bool = True,
    preserve_index: bool = True,
    keep: Sequence[int] | None = None,
) -> tuple[pa.Table, dict[int, tuple[int, int]]]:
    """``df`` as one Arrow table sorted by ``column``, and each partition's row range.

    Senders encode zero-copy slices of the one table (one schema). ``bounds`` maps each
    partition with rows to ``(start, stop)``; rows keep their input order inside each
    range, so the slices are deterministic. With ``npartitions``, values outside
    ``[0, npartitions)`` are rejected instead of silently creating extra partitions.
    With ``keep``, the rows of every other partition are dropped (nobody asked for them);
    the table is empty and ``bounds`` too if no row is kept.
    """
    codes = _partition_codes(df, column, npartitions)
    if keep is not None:
        wanted = np.isin(codes, np.asarray(keep, dtype=np.int64))
        if not wanted.all():
            df, codes = df[wanted], codes[wanted]
    # Selecting columns here is cheaper than df.drop; one thread, because pyarrow
    # otherwise starts a thread pool per call, which costs more than it saves (0.7 ms
    # instead of 0.26 ms of CPU for a 1 MiB frame) and a transfer task has one CPU.
    table = _to_arrow(df, drop=column if drop_column else None, preserve_index=preserve_index)
    if not len(codes):
        return table, {}
    order = np.argsort(codes, kind="stable")
    codes = codes[order]
    starts = np.flatnonzero(codes[1:] != codes[:-1]) + 1
    edges = np.concatenate(([0], starts, [len(codes)])).tolist()
    bounds = {int(codes[start]): (start, stop) for start, stop in itertools.pairwise(edges)}
    # The sort order is in bounds by construction (its check was 3.5 % of a transfer
    # worker's CPU); the copy goes to the heap the next input reuses.
    return pc.take(table, order, boundscheck=False, memory_pool=sender_pool()), bounds


def arrow_names(labels: Sequence[Hashable]) -> list[str]:
    """The Arrow field names of frame columns ``labels`` (module docstring).

    Distinct strings name themselves; otherwise each label's ``repr`` (types stay
    apart: ``0``, ``'0'`` and ``0.0`` differ), prefixed by its position where reprs
    repeat (duplicated labels).
    """
    labels = list(labels)
    if all(type(label) is str for label in labels) and len(set(labels)) == len(labels):
        return labels  # type: ignore[return-value]  # all str, checked above
    reprs = [repr(label) for label in labels]
    if len(set(reprs)) == len(reprs):
        return reprs
    return [f"{i}:{r}" for i, r in enumerate(reprs)]


def _to_arrow(df: pd.DataFrame, *, drop: Hashable | None, preserve_index: bool) -> pa.Table:
    """``df`` without column ``drop`` as an Arrow table named by ``arrow_names``."""
    labels = list(df.columns)
    positions = [i for i, label in enumerate(labels) if drop is None or label != drop]
    kept = [labels[i] for i in positions]
    names = arrow_names(kept)
    index_ok = not preserve_index or _index_names_fit(df.index, names)
    if names == kept and index_ok:  # the usual case: nothing renamed, no copy
        columns = names if drop is not None else None
        return pa.Table.from_pandas(df, columns=columns, preserve_index=preserve_index, nthreads=1)
    frame = df.iloc[:, positions].set_axis(names, axis=1)
    if not index_ok:  # Arrow calls them __index_level_<i>__; the receiver restores them
        frame = frame.rename_axis(index=[None] * frame.index.nlevels)
    return pa.Table.from_pandas(frame, preserve_index=preserve_index, nthreads=1)


def _index_names_fit(index: pd.Index, fields: Sequence[str]) -> bool:
    """Whether Arrow keeps ``index``'s names: strings or None, distinct, not a field's."""
    named = [n for n in index.names if n is not None]
    return (
        all(type(n) is str for n in named)
        and len(set(named)) == len(named)
        and not set(named) & set(fields)
    )


def group_by_owner(
    shards: Mapping[int, T], *, owner_of: Callable[[int], str]
) -> dict[str, list[tuple[int, T]]]:
    """Group ``{output_partition: shard}`` into ``{owner: [(output_partition, shard)]}``."""
    out: defaultdict[str, list[tuple[int, T]]] = defaultdict(list)
    for partition, shard in shards.items():
        out[owner_of(partition)].append((partition, shard))
    return dict(out)


def concat_partition(tables: Sequence[pa.Table], *, meta: pd.DataFrame) -> pd.DataFrame:
    """Concatenate the tables received for one output partition into a frame like ``meta``.

    ``meta`` is the empty frame dask expects for this output (without the partition
    column if the sender dropped it). Columns come out in ``meta``'s order with
    ``meta``'s dtypes; categoricals keep every category seen in any table.
    """
    if sum(t.num_rows for t in tables) == 0:
        return meta.iloc[:0].copy()
    # "permissive" unifies e.g. a null-typed all-None column with a string one; pieces
    # with one schema (the usual case) skip the unification, 6x cheaper for 256 pieces.
    schema = tables[0].schema
    same = all(t.schema.equals(schema, check_metadata=True) for t in tables)
    table = pa.concat_tables(tables, promote_options="none" if same else "permissive")
    # One block per column: consolidating the columns of many pieces into 2-D blocks
    # took 3-6x longer (84 MB of 128 pieces: 76-205 ms against 30 ms).
    return _conform(_contiguous(table).to_pandas(split_blocks=True), meta)


def _contiguous(table: pa.Table) -> pa.Table:
    """``table`` with its fixed-width columns in one chunk each (one copy), which
    ``to_pandas`` then takes as they are: 20% less time than converting the pieces'
    chunks (20 MiB of 64 pieces: 4.8 against 6.1 ms). Other columns keep their
    chunks: a string column joined past 2 GiB would overflow its offsets."""
    columns = [
        c.combine_chunks() if c.num_chunks > 1 and pa.types.is_primitive(c.type) else c
        for c in table.columns
    ]
    return pa.Table.from_arrays(columns, schema=table.schema)


def _partition_codes(df: pd.DataFrame, column: str, npartitions: int | None) -> np.ndarray:
    if column not in df.columns:
        raise KeyError(f"partition column {column!r} is missing; columns are {list(df.columns)}")
    series = df[column]
    if not pd.api.types.is_integer_dtype(series.dtype):
        raise TypeError(f"partition column {column!r} must hold integers, got {series.dtype}")
    if series.hasnans:
        raise ValueError(f"partition column {column!r} holds missing values")
    codes: np.ndarray = series.to_numpy()
    if codes.dtype.kind not in "iu":  # an extension dtype that did not map to numpy's
        codes = series.to_numpy(dtype=np.int64)
    if not len(codes):
        return codes
    low, high = int(codes.min()), int(codes.max())
    if low < 0 or (npartitions is not None and high >= npartitions):
        bound = "" if npartitions is None else f" and below {npartitions}"
        raise ValueError(
            f"partition column {column!r} must lie at or above 0{bound}; "
            f"found values in [{low}, {high}]"
        )
    # numpy sorts 8- and 16-bit integers by radix (stable, linear): narrow when they fit.
    if high <= 0xFFFF:
        codes = codes.astype(np.uint8 if high <= 0xFF else np.uint16, copy=False)
    return codes


def _conform(df: pd.DataFrame, meta: pd.DataFrame) -> pd.DataFrame:
    labels = list(meta.columns)
    expected = arrow_names(labels)
    got = list(df.columns)
    if got != expected:
        if len(set(got)) != len(got) or sorted(got) != sorted(expected):
            derived = "" if expected == labels else f" (Arrow names {expected!r})"
            raise ValueError(
                f"received columns {got!r} do not match meta's columns {labels!r}{derived}"
            )
        df = df[expected]
    df = df.copy(deep=False)  # our own frame to assign into; column data stays shared
    if expected != labels:
        df.columns = meta.columns  # positionally: the names were derived from these
    names = meta.index.names
    if (
        df.index.nlevels == len(names)
        and any(n is not None for n in names)
        and all(n is None for n in df.index.names)
    ):
        df.index = df.index.set_names(names)  # names the sender could not send
    for i, expected_dtype in enumerate(meta.dtypes):
        column = df.iloc[:, i]
        if column.dtype == expected_dtype:
            continue
        if isinstance(expected_dtype, pd.CategoricalDtype) and isinstance(
            column.dtype, pd.CategoricalDtype
        ):
            df.isetitem(i, _union_categories(column, expected_dtype))
        elif isinstance(expected_dtype, pd.StringDtype):
            df.isetitem(i, column.astype(expected_dtype))
        else:
            # Widen instead of forcing meta's dtype: meta may say int64 where the data
            # holds floats, and a cast to int64 would fail or truncate.
            df.isetitem(i, column.astype(find_common_type([column.dtype, expected_dtype])))
    return df


def _union_categories(column: pd.Series, expected: pd.CategoricalDtype) -> pd.Series:
    seen = column.cat.categories
    if UNKNOWN_CATEGORIES in expected.categories:
        categories = seen
    else:
        # Known categories keep meta's order; anything extra is kept, never turned to NaN.
        extra = seen.difference(expected.categories, sort=False)
        categories = expected.categories.append(extra) if len(extra) else expected.categories
    return column.cat.set_categories(categories, ordered=expected.ordered)
