from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from dask.dataframe.utils import UNKNOWN_CATEGORIES as DASKS_UNKNOWN_CATEGORIES
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from shuffle._ids import RunId, ShuffleId
from shuffle._partition import (
    UNKNOWN_CATEGORIES,
    _contiguous,
    arrow_names,
    concat_partition,
    group_by_owner,
)
from shuffle._spec import ShuffleRunSpec
from tests.shuffle.frames import make_frame
from tests.shuffle.support import split_by_partition


def shuffle_in_memory(
    inputs: list[pd.DataFrame], npartitions_out: int, meta: pd.DataFrame
) -> list[pd.DataFrame]:
    """Split every input, route pieces by output partition, reassemble each output."""
    received: dict[int, list[pa.Table]] = {p: [] for p in range(npartitions_out)}
    for df in inputs:  # input order is the order a receiver sorts shards into
        for partition, table in split_by_partition(
            df, column="_partitions", npartitions=npartitions_out
        ).items():
            received[partition].append(table)
    return [concat_partition(received[p], meta=meta) for p in range(npartitions_out)]


@pytest.mark.parametrize("npartitions_in", [1, 3, 7])
@pytest.mark.parametrize("npartitions_out", [1, 2, 5, 16])
@pytest.mark.parametrize("rows_per_input", [0, 1, 40])
def test_round_trip_matches_pandas(
    npartitions_in: int, npartitions_out: int, rows_per_input: int
) -> None:
    inputs = [
        make_frame(
            rows_per_input, npartitions_out=npartitions_out, seed=i, offset=i * rows_per_input
        )
        for i in range(npartitions_in)
    ]
    whole = pd.concat(inputs)
    meta = whole.iloc[:0].drop(columns="_partitions")
    outputs = shuffle_in_memory(inputs, npartitions_out, meta)
    for partition, got in enumerate(outputs):
        expected = whole[whole["_partitions"] == partition].drop(columns="_partitions")
        pd.testing.assert_frame_equal(got, expected)
    assert sum(map(len, outputs)) == len(whole)


def test_single_skewed_key_lands_in_one_partition() -> None:
    inputs = [
        make_frame(50, npartitions_out=4, seed=i, offset=50 * i, skew_key=2) for i in range(3)
    ]
    meta = inputs[0].iloc[:0].drop(columns="_partitions")
    outputs = shuffle_in_memory(inputs, 4, meta)
    assert [len(o) for o in outputs] == [0, 0, 150, 0]
    pd.testing.assert_frame_equal(outputs[2], pd.concat(inputs).drop(columns="_partitions"))
    for empty in (outputs[0], outputs[1], outputs[3]):
        pd.testing.assert_series_equal(empty.dtypes, meta.dtypes)


@settings(deadline=None, max_examples=60)
@given(
    codes=hnp.arrays(np.int64, st.integers(0, 300), elements=st.integers(0, 20)),
    drop_column=st.booleans(),
)
def test_split_keeps_every_row_once_in_input_order(codes: np.ndarray, drop_column: bool) -> None:
    df = pd.DataFrame({"row": np.arange(len(codes)), "_partitions": codes})
    parts = split_by_partition(df, column="_partitions", drop_column=drop_column)
    assert sorted(parts) == sorted(set(codes.tolist()))
    for partition, table in parts.items():
        rows = table.column("row").to_pylist()
        assert rows == np.flatnonzero(codes == partition).tolist()
        assert ("_partitions" in table.column_names) is not drop_column


# The codes are sorted as 8-bit, 16-bit or their own integers depending on the largest.
_CODE_DTYPES = ["int8", "uint16", "int64", "uint64", "Int64", "int64[pyarrow]"]
_HIGHS = [0, 255, 256, 65_535, 65_536, 10**12]


def _holds(dtype: str, high: int) -> bool:
    return bool(np.iinfo(np.dtype(dtype.split("[")[0].lower())).max >= high)


@pytest.mark.parametrize(
    ("high", "dtype"), [(h, d) for d in _CODE_DTYPES for h in _HIGHS if _holds(d, h)]
)
def test_split_is_stable_for_every_code_width_and_dtype(high: int, dtype: str) -> None:
    rng = np.random.default_rng(high)
    values = rng.choice([0, high // 2, high], 500)
    df = pd.DataFrame({"row": np.arange(500), "p": pd.array(values, dtype=dtype)})
    parts = split_by_partition(df, column="p", npartitions=high + 1)
    assert sorted(parts) == sorted(set(values.tolist()))
    for partition, table in parts.items():
        assert table.column("row").to_pylist() == np.flatnonzero(values == partition).tolist()


@settings(deadline=None, max_examples=40)
@given(
    codes=hnp.arrays(np.int64, st.integers(0, 200), elements=st.integers(0, 9)),
    keep=st.lists(st.integers(0, 9), max_size=10),
)
def test_split_with_keep_drops_the_rows_of_other_partitions(
    codes: np.ndarray, keep: list[int]
) -> None:
    df = pd.DataFrame({"row": np.arange(len(codes)), "_partitions": codes})
    parts = split_by_partition(df, column="_partitions", npartitions=10, keep=keep)
    assert sorted(parts) == sorted(set(codes.tolist()) & set(keep))
    for partition, table in parts.items():
        assert table.column("row").to_pylist() == np.flatnonzero(codes == partition).tolist()


def test_split_keeps_the_index_unless_told_not_to() -> None:
    df = pd.DataFrame({"x": [1, 2, 3], "_partitions": [1, 0, 1]}, index=["a", "b", "c"])
    kept = split_by_partition(df, column="_partitions")
    assert kept[1].to_pandas().index.tolist() == ["a", "c"]
    dropped = split_by_partition(df, column="_partitions", preserve_index=False)
    assert dropped[1].column_names == ["x"]


def test_split_of_empty_frame_is_empty() -> None:
    df = pd.DataFrame({"x": pd.Series([], dtype="float64"), "_partitions": []}).astype(
        {"_partitions": "int64"}
    )
    assert split_by_partition(df, column="_partitions") == {}


def test_split_accepts_nullable_integer_partition_column_without_missing_values() -> None:
    df = pd.DataFrame({"x": [1, 2], "p": pd.array([1, 0], dtype="Int64")})
    assert sorted(split_by_partition(df, column="p")) == [0, 1]


@pytest.mark.parametrize(
    ("column", "npartitions", "error", "message"),
    [
        ("missing", None, KeyError, "partition column 'missing' is missing"),
        ("floats", None, TypeError, "must hold integers, got float64"),
        ("with_na", None, ValueError, "holds missing values"),
        ("negative", None, ValueError, r"at or above 0; found values in \[-1, 1\]"),
        ("ok", 2, ValueError, r"and below 2; found values in \[0, 2\]"),
    ],
)
def test_split_rejects_bad_partition_columns(
    column: str, npartitions: int | None, error: type[Exception], message: str
) -> None:
    df = pd.DataFrame(
        {
            "floats": [0.0, 1.0, 1.0],
            "with_na": pd.array([0, None, 1], dtype="Int64"),
            "negative": [0, -1, 1],
            "ok": [0, 2, 1],
        }
    )
    with pytest.raises(error, match=message):
        split_by_partition(df, column=column, npartitions=npartitions)


def test_group_by_owner_routes_each_partition_to_its_owner() -> None:
    spec = ShuffleRunSpec(
        shuffle_id=ShuffleId("s"),
        run_id=RunId(1),
        npartitions_out=7,
        participants=("a", "b", "c"),
    )
    shards = {p: f"shard-{p}" for p in (0, 2, 3, 6)}
    grouped = group_by_owner(shards, owner_of=spec.owner_of)
    assert grouped == {
        "a": [(0, "shard-0"), (2, "shard-2")],
        "b": [(3, "shard-3")],
        "c": [(6, "shard-6")],
    }


def tables_of(*frames: pd.DataFrame) -> list[pa.Table]:
    return [pa.Table.from_pandas(f, preserve_index=False) for f in frames]


@pytest.mark.parametrize("nempty", [0, 2], ids=["no-tables", "all-empty"])
def test_concat_of_nothing_is_meta_shaped(nempty: int) -> None:
    meta = make_frame(0, npartitions_out=1, seed=0).drop(columns="_partitions")
    tables = [pa.Table.from_pandas(meta) for _ in range(nempty)]
    got = concat_partition(tables, meta=meta)
    assert got.empty
    pd.testing.assert_series_equal(got.dtypes, meta.dtypes)
    assert list(got.columns) == list(meta.columns)


def test_concat_unions_unknown_categories() -> None:
    meta = pd.DataFrame({"c": pd.Categorical([UNKNOWN_CATEGORIES])}).iloc[:0]
    left = pd.DataFrame({"c": pd.Categorical(["x", "y"])})
    right = pd.DataFrame({"c": pd.Categorical(["z", "x"], categories=["z", "x", "w"])})
    got = concat_partition(tables_of(left, right), meta=meta)
    assert got["c"].tolist() == ["x", "y", "z", "x"]
    assert set(got["c"].cat.categories) == {"x", "y", "z", "w"}


@pytest.mark.parametrize("ordered", [False, True])
def test_concat_keeps_known_categories_and_never_drops_values(ordered: bool) -> None:
    dtype = pd.CategoricalDtype(["b", "a", "c"], ordered=ordered)
    meta = pd.DataFrame({"c": pd.Series([], dtype=dtype)})
    within = pd.DataFrame({"c": pd.Categorical(["a"], categories=["a"])})
    got = concat_partition(tables_of(within), meta=meta)
    assert got["c"].dtype == dtype
    outside = pd.DataFrame({"c": pd.Categorical(["a", "zz"])})
    got = concat_partition(tables_of(within, outside), meta=meta)
    assert got["c"].tolist() == ["a", "a", "zz"]
    assert got["c"].cat.categories.tolist() == ["b", "a", "c", "zz"]
    assert got["c"].cat.ordered is ordered


def test_concat_differing_dictionary_index_widths() -> None:
    many = [f"k{i}" for i in range(300)]  # needs int16 dictionary indices
    meta = pd.DataFrame({"c": pd.Categorical([UNKNOWN_CATEGORIES])}).iloc[:0]
    small = pd.DataFrame({"c": pd.Categorical(["k1"])})
    large = pd.DataFrame({"c": pd.Categorical(["k299"], categories=many)})
    got = concat_partition(tables_of(small, large), meta=meta)
    assert got["c"].tolist() == ["k1", "k299"]


@pytest.mark.parametrize("string_dtype", ["string", "str", pd.StringDtype("python")])
def test_concat_takes_metas_string_dtype(string_dtype: str | pd.StringDtype) -> None:
    meta = pd.DataFrame({"s": pd.Series([], dtype=string_dtype)})
    got = concat_partition(tables_of(pd.DataFrame({"s": ["a", None]})), meta=meta)
    assert got["s"].dtype == meta["s"].dtype
    assert got["s"].iloc[0] == "a" and pd.isna(got["s"].iloc[1])


def test_concat_of_all_missing_object_column_with_strings() -> None:
    meta = pd.DataFrame({"s": pd.Series([], dtype="str")})
    nulls = pd.DataFrame({"s": pd.Series([None, None], dtype=object)})  # arrow null type
    words = pd.DataFrame({"s": pd.Series(["x"], dtype="str")})
    got = concat_partition(tables_of(nulls, words), meta=meta)
    assert got["s"].dtype == meta["s"].dtype
    assert got["s"].isna().tolist() == [True, True, False]


def test_concat_widens_instead_of_truncating() -> None:
    meta = pd.DataFrame({"x": pd.Series([], dtype="int64")})
    got = concat_partition(tables_of(pd.DataFrame({"x": [1.5, np.nan]})), meta=meta)
    assert got["x"].dtype == "float64"
    assert got["x"].iloc[0] == 1.5


def test_concat_reorders_columns_like_meta() -> None:
    meta = pd.DataFrame({"b": pd.Series([], dtype="int64"), "a": pd.Series([], dtype="int64")})
    got = concat_partition(tables_of(pd.DataFrame({"a": [1], "b": [2]})), meta=meta)
    assert list(got.columns) == ["b", "a"]


def test_concat_rejects_foreign_columns() -> None:
    meta = pd.DataFrame({"a": pd.Series([], dtype="int64")})
    with pytest.raises(ValueError, match=r"received columns \['b'\] do not match meta"):
        concat_partition(tables_of(pd.DataFrame({"b": [1]})), meta=meta)


def test_arrow_names_keep_distinct_strings_and_tell_types_apart() -> None:
    assert arrow_names(["a", "b"]) == ["a", "b"]
    assert arrow_names([0, "0", 0.0, ("0",)]) == ["0", "'0'", "0.0", "('0',)"]
    assert arrow_names(["a", 1, "a"]) == ["0:'a'", "1:1", "2:'a'"]


def test_concat_error_shows_label_types() -> None:
    meta = pd.DataFrame({0: pd.Series([], dtype="int64"), "0": pd.Series([], dtype="int64")})
    with pytest.raises(
        ValueError,
        match=r"received columns \['0', 'x'\] do not match meta's columns \[0, '0'\] "
        r"\(Arrow names \['0', \"'0'\"\]\)",
    ):
        concat_partition(tables_of(pd.DataFrame({"0": [1], "x": [2]})), meta=meta)


def test_unknown_categories_marker_matches_dask() -> None:
    assert UNKNOWN_CATEGORIES == DASKS_UNKNOWN_CATEGORIES


def test_fixed_width_columns_are_joined_into_one_chunk_and_strings_keep_theirs() -> None:
    parts = [
        pd.DataFrame({"x": [1, 2], "s": ["a", "b"]}, index=pd.Index([5, 6], name="i")),
        pd.DataFrame({"x": [3], "s": ["c"]}, index=pd.Index([7], name="i")),
    ]
    table = pa.concat_tables([pa.Table.from_pandas(p) for p in parts])
    joined = _contiguous(table)
    assert joined.schema.equals(table.schema, check_metadata=True)  # the index survives
    assert [joined.column(n).num_chunks for n in ("x", "s", "i")] == [1, 2, 1]
    pd.testing.assert_frame_equal(joined.to_pandas(), pd.concat(parts))
