"""Column labels that are not strings survive p2p shuffles (Arrow names fields by strings).

Every case is compared with dask's sync scheduler running the same expression as a
task-based shuffle; duplicated labels with pandas, because dask's task-based shuffle
multiplies duplicated columns (4 columns named "v" come back for 2). Only what dask
itself supports is tried: it sorts by string labels only, hashes no float or tuple
label, sets no index from a duplicated one, and refuses an explicit p2p ``shuffle()``
of a frame with any non-string or duplicated label (under distributed too).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest

import ray_oob_sched

Op = Callable[[dd.DataFrame, list[Any]], dd.DataFrame]

OPS: dict[str, Op] = {
    "set_index": lambda df, c: df.set_index(c[1]),
    "sort_values": lambda df, c: df.sort_values(c[1], npartitions=3),
    "groupby_split_out": lambda df, c: df.groupby(c[0]).sum(split_out=3),
    "merge": lambda df, c: df.merge(df.rename(columns={c[1]: "w"}), on=c[0], broadcast=False),
}

# labels -> the operations dask supports on a frame labelled so
CASES: dict[str, tuple[list[Any], list[str]]] = {
    "int": ([0, 1, 2], ["set_index", "groupby_split_out", "merge"]),
    "float": ([0.5, 1.5, 2.5], ["set_index", "groupby_split_out"]),
    "tuple": (["k", "s", ("a", 1)], ["set_index", "sort_values", "groupby_split_out", "merge"]),
    "mixed": ([0, "b", 2.5], ["set_index", "sort_values", "groupby_split_out", "merge"]),
    "duplicated": (["k", "v", "v"], ["groupby_split_out"]),
}

# What pandas answers, where dask's task-based shuffle is wrong (module docstring).
PANDAS: dict[str, Callable[[pd.DataFrame, list[Any]], pd.DataFrame]] = {
    "groupby_split_out": lambda df, c: df.groupby(c[0]).sum(),
}


@pytest.fixture
def p2p(ray_get: Any) -> Iterator[None]:
    with dask.config.set({"dataframe.shuffle.method": "p2p"}):
        yield
    service = ray_oob_sched._schedule._shuffle_service
    if service is not None:
        assert not service.open_runs(), "shuffle runs left open after the compute"


def frame(labels: list[Any]) -> dd.DataFrame:
    rng = np.random.default_rng(0)
    pdf = pd.DataFrame(
        {"a": rng.integers(0, 30, 400), "b": rng.random(400), "c": rng.integers(0, 9, 400)},
        index=pd.RangeIndex(400, name=7),  # a name Arrow cannot carry
    )
    return dd.from_pandas(pdf.set_axis(labels, axis=1), npartitions=5)


def rows_sorted(df: pd.DataFrame) -> pd.DataFrame:
    """Row order of a shuffle is not defined: compare rows by value, index included."""
    flat = df.reset_index()
    return flat.iloc[np.lexsort([flat.iloc[:, i] for i in reversed(range(flat.shape[1]))])]


@pytest.mark.parametrize(
    ("labels", "op"),
    [
        pytest.param(labels, op, id=f"{kind}-{op}")
        for kind, (labels, ops) in CASES.items()
        for op in ops
    ],
)
def test_labels_survive(p2p: None, labels: list[Any], op: str) -> None:
    if len(set(labels)) < len(labels):
        expected = PANDAS[op](frame(labels).compute(scheduler="sync"), labels)
    else:
        with dask.config.set({"dataframe.shuffle.method": "tasks"}):
            expected = OPS[op](frame(labels), labels).compute(scheduler="sync")
    # Persisted: compute() alone may let dask sort in one partition (no shuffle).
    (persisted,) = dask.persist(OPS[op](frame(labels), labels))
    assert ray_oob_sched.last_stats().shuffles >= 1
    got = persisted.compute()
    assert [(type(c), c) for c in got.columns] == [(type(c), c) for c in expected.columns]
    assert got.index.names == expected.index.names
    pd.testing.assert_frame_equal(
        rows_sorted(got).reset_index(drop=True), rows_sorted(expected).reset_index(drop=True)
    )
