"""Every p2p dataframe operation through ``ray_oob_sched.enable()``, against pandas.

shuffle, set_index, sort_values, hash merge and join, groupby with ``split_out``,
each over frames with string, categorical, nullable (Int64, boolean) and tz-aware
datetime columns, in layouts with empty input partitions or one heavily skewed key,
into fewer and more output partitions than input partitions; and ``.partitions[...]``
selections, which must not move the rows of the partitions nobody asked for.

The module's shuffle service has a small memory limit, so most runs also spill;
every test ends with ``cleanup_checked``: no open run, no spill file, no driver ref.
"""

from __future__ import annotations

from collections.abc import Callable

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest

import ray_oob_sched
from tests.integration.p2p_support import (
    OOB,
    RunsAtFinish,
    oob_fixtures,
)

pytestmark = pytest.mark.ray

NIN = 6  # input partitions of the left frame
ROWS = 1_800


# 24 KiB per run and actor: a 1,800-row frame is ~100 KiB of Arrow, so runs spill.
# One actor: the tests read each run's statistics as the only participant's.
module_oob, oob = oob_fixtures(
    "p2p-cases", memory_limit=24 * 2**10, message_bytes=8 * 2**10, actors_per_node=1
)


# ---------------------------------------------------------------------------- data


def make_frame(layout: str, *, rows: int = ROWS, seed: int = 0) -> pd.DataFrame:
    """Keys 0..39 (or 90 % of them 7 when skewed) and one column of each awkward dtype."""
    rng = np.random.default_rng(seed)
    k = rng.integers(0, 40, rows)
    if layout == "skewed":
        k[rng.random(rows) < 0.9] = 7
    na = rng.random(rows) < 0.15
    words = np.array(["alpha", "beta", "gamma", "δέλτα", ""], dtype=object)[
        rng.integers(0, 5, rows)
    ]
    words[na] = None
    return pd.DataFrame(
        {
            "k": k,
            "v": rng.permutation(rows) / rows,  # unique: a total order for comparisons
            "s": pd.array(words, dtype="string[pyarrow]"),
            "c": pd.Categorical.from_codes(rng.integers(0, 3, rows), categories=["x", "y", "z"]),
            "i": pd.array(np.where(na, None, rng.integers(-5, 5, rows)), dtype="Int64"),
            "b": pd.array(np.where(rng.random(rows) < 0.1, None, k % 2 == 0), dtype="boolean"),
            "t": pd.date_range("2026-01-05", periods=rows, freq="37s", tz="Europe/Berlin"),
        }
    )


def as_dask(pdf: pd.DataFrame, layout: str, nparts: int = NIN) -> dd.DataFrame:
    """``pdf`` in ``nparts`` partitions; for ``empty-parts`` the 1st and 4th are empty."""
    ddf = dd.from_pandas(pdf, npartitions=nparts, sort=True)
    if layout == "empty-parts":
        step = len(pdf) // nparts
        ddf = ddf.map_partitions(lambda df: df[~gone(df.index, step)], meta=ddf._meta)
    return ddf


def gone(index, step: int):
    """Rows of the 1st and 4th of partitions of ``step`` rows."""
    return (index < step) | ((index >= 3 * step) & (index < 4 * step))


def kept(pdf: pd.DataFrame, layout: str, nparts: int = NIN) -> pd.DataFrame:
    """What ``as_dask`` keeps of ``pdf``."""
    if layout != "empty-parts":
        return pdf
    return pdf[~gone(pdf.index, len(pdf) // nparts)]


def right_frame(seed: int = 1) -> pd.DataFrame:
    """Keys 0..49 (some unmatched on either side), two of them duplicated."""
    rng = np.random.default_rng(seed)
    keys = np.concatenate([np.arange(50), [7, 7, 12]])
    return pd.DataFrame(
        {
            "k": keys,
            "w": rng.permutation(len(keys)).astype("float64"),
            "label": pd.array([f"r{x}" if x % 5 else None for x in keys], dtype="string[pyarrow]"),
            "grade": pd.Categorical(rng.choice(["lo", "hi"], len(keys))),
        }
    )


# Fewer and more outputs than the 6 inputs, one case each with empty input partitions
# and with one key holding 90 % of the rows (each case costs ~0.2 s per operation).
CASES = [
    pytest.param("empty-parts", 3, id="empty-parts-fewer"),
    pytest.param("skewed", 11, id="skewed-more"),
]


def by_all(df: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    return df.sort_values(by, kind="stable").reset_index(drop=True)


# ---------------------------------------------------------------------------- shuffle


@pytest.mark.parametrize("on", ["k", "s", ["c", "b"]], ids=["int", "str", "cat+bool"])
@pytest.mark.parametrize(("layout", "nout"), CASES)
def test_shuffle(oob: OOB, layout: str, nout: int, on: str | list[str]) -> None:
    pdf = make_frame(layout)
    if layout == "empty-parts":
        sizes = as_dask(pdf, layout).map_partitions(len).compute(scheduler="sync")
        assert sizes.tolist() == [0, 300, 300, 0, 300, 300]
    shuffled = as_dask(pdf, layout).shuffle(on, npartitions=nout)
    (pers,) = dask.persist(shuffled)
    assert ray_oob_sched.last_stats().shuffles == 1
    parts = [pers.partitions[p].compute() for p in range(nout)]
    del pers
    cols = [on] if isinstance(on, str) else on
    owner: dict[tuple, int] = {}
    for p, part in enumerate(parts):
        for row in part[cols].drop_duplicates().itertuples(index=False):
            assert owner.setdefault(tuple(row), p) == p, f"key {tuple(row)} in two partitions"
    pd.testing.assert_frame_equal(pd.concat(parts).sort_index(), kept(pdf, layout))


def test_shuffle_of_only_empty_partitions(oob: OOB) -> None:
    pdf = make_frame("uniform")
    ddf = as_dask(pdf, "uniform")
    got = ddf[ddf.v > 2].shuffle("k", npartitions=4).compute()
    assert ray_oob_sched.last_stats().shuffles == 1
    pd.testing.assert_frame_equal(got, pdf.iloc[:0])


# ------------------------------------------------------------------- set_index, sort


@pytest.mark.parametrize("column", ["k", "t"])
@pytest.mark.parametrize(("layout", "nout"), CASES)
def test_set_index(oob: OOB, layout: str, nout: int, column: str) -> None:
    pdf = make_frame(layout)
    result = as_dask(pdf, layout).set_index(column, npartitions=nout)
    got = result.compute()
    assert ray_oob_sched.last_stats().shuffles == 1
    assert got.index.is_monotonic_increasing
    expected = kept(pdf, layout).set_index(column)
    pd.testing.assert_frame_equal(
        by_all(got.reset_index(), [column, "v"]), by_all(expected.reset_index(), [column, "v"])
    )


@pytest.mark.parametrize(
    ("by", "ascending"),
    [("v", True), (["k", "v"], False), (["s", "v"], True)],
    ids=["float", "int+float-descending", "str"],
)
@pytest.mark.parametrize(("layout", "nout"), CASES)
def test_sort_values(
    oob: OOB, layout: str, nout: int, by: str | list[str], ascending: bool
) -> None:
    pdf = make_frame(layout)
    if "s" in by:  # dask cannot compute divisions over nulls (it says so)
        pdf = pdf.dropna(subset=["s"])
    # Persisted: compute() alone lets dask sort in one partition (no shuffle at all).
    lazy = as_dask(pdf, layout).sort_values(by, npartitions=nout, ascending=ascending)
    (pers,) = dask.persist(lazy)
    assert ray_oob_sched.last_stats().shuffles == 1
    got = pers.compute()
    del pers
    expected = kept(pdf, layout).sort_values(by, ascending=ascending)
    pd.testing.assert_frame_equal(got.reset_index(drop=True), expected.reset_index(drop=True))


# ----------------------------------------------------------------------- merge, join


@pytest.mark.parametrize("how", ["inner", "left", "outer"])
@pytest.mark.parametrize(("layout", "nout"), CASES)
def test_hash_merge(oob: OOB, layout: str, nout: int, how: str) -> None:
    left, right = make_frame(layout), right_frame()
    merged = as_dask(left, layout).merge(
        as_dask(right, "empty-parts", nparts=3),
        on="k",
        how=how,
        npartitions=nout,
        shuffle_method="p2p",
        broadcast=False,
    )
    got = merged.compute()
    assert ray_oob_sched.last_stats().shuffles == 2  # one per side
    expected = kept(left, layout).merge(kept(right, "empty-parts", nparts=3), on="k", how=how)
    pd.testing.assert_frame_equal(by_all(got, ["k", "v", "w"]), by_all(expected, ["k", "v", "w"]))


@pytest.mark.parametrize(("layout", "nout"), CASES)
def test_hash_join_on_the_index(oob: OOB, layout: str, nout: int) -> None:
    left = make_frame(layout)
    right = right_frame().set_index("k")
    got = (
        as_dask(left, layout)
        .set_index("k", sort=False)  # unknown divisions: a hash join
        .join(dd.from_pandas(right, npartitions=3, sort=False), how="left", npartitions=nout)
        .compute()
    )
    assert ray_oob_sched.last_stats().shuffles == 2
    expected = kept(left, layout).set_index("k").join(right, how="left")
    pd.testing.assert_frame_equal(
        by_all(got.reset_index(), ["k", "v", "w"]), by_all(expected.reset_index(), ["k", "v", "w"])
    )


# --------------------------------------------------------------------------- groupby


@pytest.mark.parametrize("by", ["k", "s", "c"])
@pytest.mark.parametrize(("layout", "nout"), CASES)
def test_groupby_split_out(oob: OOB, layout: str, nout: int, by: str) -> None:
    pdf = make_frame(layout)
    spec = {"v": "sum", "i": "sum", "b": "count", "t": "max"}
    got = (
        as_dask(pdf, layout)
        .groupby(by, observed=True)
        .agg(spec, split_out=nout, shuffle_method="p2p")
        .compute()
    )
    assert ray_oob_sched.last_stats().shuffles == 1
    expected = kept(pdf, layout).groupby(by, observed=True).agg(spec)
    pd.testing.assert_frame_equal(got.sort_index(), expected, check_index_type=False)


# ------------------------------------------------------------------- partition selection

Select = Callable[[dd.DataFrame, dd.DataFrame, int], dd.DataFrame]


def shuffle_by_k(left: dd.DataFrame, right: dd.DataFrame, nout: int) -> dd.DataFrame:
    return left.shuffle("k", npartitions=nout)


def sum_by_k(left: dd.DataFrame, right: dd.DataFrame, nout: int) -> dd.DataFrame:
    return left.groupby("k").v.sum(split_out=nout, shuffle_method="p2p").to_frame()


def merge_on_k(left: dd.DataFrame, right: dd.DataFrame, nout: int) -> dd.DataFrame:
    return left.merge(right, on="k", npartitions=nout, shuffle_method="p2p", broadcast=False)


def pick(frame: dd.DataFrame, chosen: list[int], how: str) -> pd.DataFrame:
    if how == "partitions":
        return frame.partitions[chosen].compute()
    # to_delayed: the whole graph, culled by ray_oob_sched to what the outputs need.
    # (merge(...).partitions[...] itself fails in dask 2026.8 with any scheduler,
    # distributed's included: HashJoinP2P names filtered outputs by partition number.)
    delayed = frame.to_delayed()
    return pd.concat(dask.compute(*(delayed[p] for p in chosen)))


@pytest.mark.parametrize(
    ("op", "how", "inputs"),
    [
        (shuffle_by_k, "partitions", [4]),
        (sum_by_k, "partitions", [4]),
        (shuffle_by_k, "to_delayed", [4]),
        (merge_on_k, "to_delayed", [4, 3]),  # both sides' shuffles
    ],
    ids=["shuffle", "groupby", "shuffle-to_delayed", "merge-to_delayed"],
)
def test_selected_partitions_move_only_their_rows(
    oob: OOB, op: Select, how: str, inputs: list[int]
) -> None:
    nout, chosen = 8, [2, 5]
    left = as_dask(make_frame("uniform"), "uniform", nparts=4)
    right = as_dask(right_frame(), "uniform", nparts=3)
    (pers,) = dask.persist(op(left, right, nout))
    assert ray_oob_sched.last_stats().shuffles == len(inputs)
    expected = pd.concat([pers.partitions[p].compute() for p in chosen])
    del pers

    with RunsAtFinish(oob) as probe:
        got = pick(op(left, right, nout), chosen, how)
    # The same rows; their order inside a partition follows the transfer tasks'
    # joined inputs (shuffle._combine), which depend on each compute's fusion plan.
    # A merge numbers its rows per partition (pd.merge's RangeIndex): that index
    # follows the order, so only the columns are compared there.
    drop = op is merge_on_k
    rows, want = got.reset_index(drop=drop), expected.reset_index(drop=drop)
    columns = list(rows.columns)
    pd.testing.assert_frame_equal(by_all(rows, columns), by_all(want, columns))
    assert probe.infos is not None and len(probe.infos) == len(inputs)  # one actor here
    by_received = sorted(probe.infos, key=lambda i: -i.stats.shards_received)
    for info, ninputs in zip(by_received, inputs, strict=True):
        # Every input is read, but only the chosen outputs are unpacked ...
        assert info.stats.outputs_read == len(chosen)
        # ... and only their rows travel to (and are stored by) the actors.
        assert 0 < info.stats.shards_received <= ninputs * len(chosen)


def test_one_partition_of_a_sort(oob: OOB) -> None:
    pdf = make_frame("uniform")
    ddf = as_dask(pdf, "uniform")
    whole = ddf.sort_values("v", npartitions=5)
    with RunsAtFinish(oob) as probe:
        got = whole.partitions[3].compute()
    expected = pdf.sort_values("v")
    assert len(got) and got.v.is_monotonic_increasing
    pd.testing.assert_frame_equal(got, expected[expected.v.between(got.v.min(), got.v.max())])
    assert probe.infos is not None
    (info,) = probe.infos
    assert info.stats.outputs_read == 1
    assert 0 < info.stats.shards_received <= NIN
