"""Tier 1: which staged inputs a transfer task joins into one frame (no Ray)."""

from __future__ import annotations

import struct
import sys

import numpy as np
import pandas as pd
import pytest

from shuffle._combine import (
    JOINED_TAG,
    Coverage,
    combine,
    frame_nbytes,
    joined_meta,
    runs_to_combine,
    split_joined,
)
from shuffle._exceptions import FrameError, InconsistentInputsError


def frame(i: int, n: int = 3, **extra: object) -> pd.DataFrame:
    data = {"x": np.arange(n, dtype=np.int64) + 10 * i, "_partitions": np.zeros(n, np.int64)}
    return pd.DataFrame({**data, **extra}, index=pd.RangeIndex(100 * i, 100 * i + n))


def test_frames_alike_form_one_run_in_input_order_whatever_the_staging_order():
    staged = [(i, frame(i)) for i in (7, 2, 5, 3)]
    (run,) = runs_to_combine(staged)
    assert [i for i, _ in run] == [2, 3, 5, 7]
    first, joined, covers = combine(run)
    assert first == 2 and covers == (2, 3, 5, 7)
    pd.testing.assert_frame_equal(joined, pd.concat([frame(i) for i in (2, 3, 5, 7)]))


def test_different_dtypes_or_columns_or_categories_never_share_a_run():
    cat_a = pd.Categorical(["a"] * 3)
    cat_b = pd.Categorical(["b"] * 3)
    staged = [
        (0, frame(0)),
        (1, frame(1).astype({"x": "float64"})),
        (2, frame(2, c=cat_a)),
        (3, frame(3, c=cat_b)),  # same columns, other categories
        (4, frame(4)),
        (5, frame(5)[["_partitions", "x"]]),  # other column order
    ]
    runs = [[i for i, _ in run] for run in runs_to_combine(staged)]
    assert runs == [[0, 4], [1], [2], [3], [5]]
    # Each run's frames join without changing a dtype.
    for run in runs_to_combine(staged):
        _, joined, _ = combine(run)
        assert list(joined.dtypes) == list(run[0][1].dtypes)


def test_non_pandas_frames_stay_alone():
    class Other:
        pass

    staged = [(0, frame(0)), (1, Other()), (2, Other()), (3, frame(3))]
    runs = [[i for i, _ in run] for run in runs_to_combine(staged)]
    assert runs == [[0, 3], [1], [2]]
    single = runs_to_combine(staged)[1]
    assert combine(single) == (1, single[0][1], (1,))  # a run of one is passed through


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 1, 0), (1, 2, 0)])
def test_runs_are_the_same_for_the_same_staged_set(order):
    # A retried task stages the same inputs: it must cut the same runs (same names).
    staged = [(i, frame(i) if i != 1 else frame(i).astype({"x": "int32"})) for i in order]
    assert [[i for i, _ in r] for r in runs_to_combine(staged)] == [[0, 2], [1]]


def test_frame_nbytes_is_deterministic_and_counts_object_values():
    rng = np.random.default_rng(0)
    values = ["x" * int(n) for n in rng.integers(1, 200, 5000)]
    words = pd.DataFrame({"w": pd.Series(values, dtype=object)})
    assert words.dtypes["w"] == np.dtype(object)
    sizes = {frame_nbytes(words) for _ in range(20)}
    assert len(sizes) == 1  # dask's sizeof samples at random: a retry could cut other sets
    (size,) = sizes
    assert size > words.memory_usage(deep=False).sum() + 5000 * 49  # the strings count
    numbers = frame(0, n=1000)
    assert frame_nbytes(numbers) == numbers.memory_usage(index=True, deep=False).sum()
    assert frame_nbytes(words.iloc[:0]) == words.iloc[:0].memory_usage(deep=False).sum()
    text = words.astype("string[pyarrow]")  # Arrow strings know their bytes
    assert frame_nbytes(text) == text.memory_usage(index=True, deep=False).sum() > 5000 * 49


def test_frame_nbytes_samples_objects_evenly_and_counts_object_indexes():
    # Short values first, long ones after: the first values alone would say 20x less.
    values = ["ab"] * 100 + ["x" * 1000] * 3900
    expected = sum(map(sys.getsizeof, values))
    for frame_ in (
        pd.DataFrame({"w": pd.Series(values, dtype=object)}),
        pd.DataFrame({"w": pd.array(values, dtype="string[python]")}),
        pd.DataFrame({"v": np.zeros(len(values))}, index=pd.Index(values, dtype=object)),
    ):
        assert 0.8 * expected < frame_nbytes(frame_) < 1.3 * expected + frame_.memory_usage().sum()


def test_joined_meta_round_trips_and_plain_metas_pass_through():
    inner = b"arrow\0schema"
    meta = joined_meta((2, 5, 9), inner)
    assert split_joined(meta) == ((2, 5, 9), inner)
    assert split_joined(joined_meta((0, 1), b"")) == ((0, 1), b"")
    assert split_joined(inner) == (None, inner)
    assert split_joined(b"") == (None, b"")


@pytest.mark.parametrize(
    "meta",
    [
        JOINED_TAG,  # no count
        JOINED_TAG + struct.pack("<I", 3) + struct.pack("<2I", 1, 2),  # fewer inputs than said
        JOINED_TAG + struct.pack("<I", 1) + struct.pack("<I", 1),  # one input is no join
        JOINED_TAG + struct.pack("<I", 2) + struct.pack("<2I", 4, 3),  # unsorted
        JOINED_TAG + struct.pack("<I", 2) + struct.pack("<2I", 3, 3),  # repeated
    ],
)
def test_malformed_joined_metas_are_frame_errors(meta):
    with pytest.raises(FrameError, match="joined piece"):
        split_joined(meta)


def test_coverage_accepts_resends_and_refuses_overlapping_sets():
    cov = Coverage()
    a = joined_meta((0, 1, 2), b"m")
    cov.admit([(7, 0, a), (8, 0, a), (7, 3, b"m")])
    cov.admit([(7, 0, a), (7, 3, b"m")])  # a retry that cut the same sets
    cov.admit([(7, 4, joined_meta((4, 5), b"m"))])
    for bad in (
        [(7, 0, joined_meta((0, 1), b"m"))],  # same name, other set: rows of 2 would be lost
        [(7, 2, joined_meta((2, 6), b"m"))],  # covers 2 again: its rows would double
        [(7, 1, b"m")],  # input 1 alone, already inside a joined piece
        [(9, 6, b"m"), (9, 5, joined_meta((5, 6), b"m"))],  # overlap within one message
    ):
        with pytest.raises(InconsistentInputsError, match="overlaps one covering"):
            cov.admit(bad)
    cov.admit([(9, 6, b"m")])  # the refused message recorded nothing
    with pytest.raises(FrameError, match="not by its first input"):
        cov.admit([(7, 9, joined_meta((8, 9), b"m"))])
