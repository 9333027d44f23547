"""A dataframe ETL on Ray: merge, groupby, sort, Parquet out and back in.

Generates an "orders" table (``--size`` rows) and a "customers" table (one per 20
orders) on the workers, joins them (hash merge), aggregates revenue per region and
day (groupby with ``split_out``), sorts the joined orders by amount, writes them to
Parquet (pyarrow) and reads them back. All three shuffles run through the
out-of-band shuffle actors. Every result is checked against pandas on the same
generated data; the script exits non-zero if one is wrong.

    python examples/etl_dataframe.py [--size 2000000] [--out DIR]

Uses the Ray named by RAY_ADDRESS, or starts an embedded local one. On a cluster,
``--out`` must be a directory every node can write (shared storage), since each
worker writes its own partitions.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

import dask.dataframe as dd
import numpy as np
import pandas as pd

import ray_oob_sched

REGIONS = np.array(["north", "south", "east", "west", "centre"])
SEGMENTS = np.array(["retail", "business", "public"])


def orders_part(i: int, *, rows: int, customers: int) -> pd.DataFrame:
    """Orders of partition ``i``: deterministic, so pandas can rebuild the same table."""
    rng = np.random.default_rng(1000 + i)
    return pd.DataFrame(
        {
            "order_id": np.arange(i * rows, (i + 1) * rows, dtype="int64"),
            "customer_id": rng.integers(0, customers, rows),
            "day": rng.integers(0, 365, rows).astype("int16"),
            "amount": np.round(rng.gamma(2.0, 40.0, rows), 2),
        }
    )


def customers_part(i: int, *, rows: int) -> pd.DataFrame:
    rng = np.random.default_rng(2000 + i)
    return pd.DataFrame(
        {
            "customer_id": np.arange(i * rows, (i + 1) * rows, dtype="int64"),
            "region": REGIONS[rng.integers(0, len(REGIONS), rows)],
            "segment": SEGMENTS[rng.integers(0, len(SEGMENTS), rows)],
        }
    )


def shuffles_and_seconds(total: list[float]) -> None:
    stats = ray_oob_sched.last_stats()
    assert stats is not None
    total[0] += stats.shuffles
    total[1] += stats.seconds


def check(step: str, ok: bool) -> bool:
    print(f"  {step:<44} {'correct' if ok else 'WRONG'}", flush=True)
    return ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=2_000_000, help="rows of the orders table")
    p.add_argument("--partitions", type=int, default=16, help="partitions of the orders table")
    p.add_argument("--out", help="directory for the Parquet files (default: a temporary one)")
    args = p.parse_args(argv)

    n_orders = max(args.size // args.partitions, 1) * args.partitions
    per_orders = n_orders // args.partitions
    cust_parts = max(args.partitions // 4, 1)
    per_customers = max(n_orders // 20 // cust_parts, 1)
    n_customers = per_customers * cust_parts

    orders = dd.from_map(
        orders_part, range(args.partitions), rows=per_orders, customers=n_customers
    )
    customers = dd.from_map(customers_part, range(cust_parts), rows=per_customers)
    totals = [0.0, 0.0]  # out-of-band shuffles, seconds inside computes
    with (
        contextlib.nullcontext(args.out)
        if args.out
        else tempfile.TemporaryDirectory(prefix="etl-", ignore_cleanup_errors=True)
    ) as out:
        target = Path(out) / "orders_by_amount.parquet"
        start = time.perf_counter()
        with ray_oob_sched.enable():
            joined = orders.merge(customers, on="customer_id", how="inner", broadcast=False)
            revenue = joined.groupby(["region", "day"]).amount.agg(["sum", "count"], split_out=4)
            got_revenue = revenue.compute()
            shuffles_and_seconds(totals)
            joined.sort_values("amount").to_parquet(target, engine="pyarrow", write_index=False)
            shuffles_and_seconds(totals)
            back = dd.read_parquet(target, engine="pyarrow").compute()
            shuffles_and_seconds(totals)
        elapsed = time.perf_counter() - start

        # The same tables in pandas, one process.
        p_orders = pd.concat(
            [orders_part(i, rows=per_orders, customers=n_customers) for i in range(args.partitions)]
        )
        p_customers = pd.concat([customers_part(i, rows=per_customers) for i in range(cust_parts)])
        p_joined = p_orders.merge(p_customers, on="customer_id", how="inner")
        p_revenue = p_joined.groupby(["region", "day"]).amount.agg(["sum", "count"])
        moved = sum(
            int(df.memory_usage(deep=True).sum()) for df in (p_orders, p_customers, p_joined)
        )
        print(
            f"ETL of {n_orders:,} orders x {n_customers:,} customers: {elapsed:.2f} s "
            f"({totals[1]:.2f} s in {int(totals[0])} out-of-band shuffles), "
            f"~{moved / 2**20:,.1f} MiB shuffled (in-memory size of the merge's and the "
            "sort's inputs)",
            flush=True,
        )
        by_order = back.sort_values("order_id", ignore_index=True)
        expected = p_joined.sort_values("order_id", ignore_index=True)
        ok = all(
            [
                check(
                    "merge: the joined rows",
                    by_order[expected.columns.tolist()].astype(expected.dtypes).equals(expected),
                ),
                check(
                    "groupby(region, day) with split_out",
                    list(got_revenue.sort_index().index) == list(p_revenue.sort_index().index)
                    and np.allclose(got_revenue.sort_index(), p_revenue.sort_index()),
                ),
                check(
                    "sort_values(amount), Parquet round trip",
                    len(back) == len(p_joined) and back["amount"].is_monotonic_increasing,
                ),
            ]
        )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
