"""The main job: a real Dask workload on an embedded local Ray, with ray_oob_sched.

Runs array workloads (a rechunk among them), a dataframe groupby/merge/set_index
(the rechunk and the shuffles go through the out-of-band shuffle actors), a bag and a
delayed graph, persists a collection and drops it again, and prints what each step
did: Dask tasks, Ray tasks, objects, shuffles, time, and a check against dask's
threaded scheduler or pandas.

    python examples/demo.py [--size 4096] [--rows 2000000]
"""

from __future__ import annotations

import argparse
import gc
import logging
import time

import dask
import dask.array as da
import dask.bag as db
import dask.dataframe as dd
import numpy as np
import pandas as pd

import ray_oob_sched


def report(step: str, check: bool) -> None:
    s = ray_oob_sched.last_stats()
    assert s is not None
    shuffles = f", {s.shuffles} out-of-band shuffle(s)" if s.shuffles else ""
    print(
        f"{step:<38} {s.dask_tasks:>5} dask tasks -> {s.ray_tasks:>4} Ray tasks, "
        f"{s.objects:>4} objects{shuffles}, {s.seconds:5.2f} s   "
        f"{'correct' if check else 'WRONG'}",
        flush=True,
    )
    if not check:
        raise SystemExit(f"{step}: wrong result")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=4096, help="side of the square array")
    p.add_argument("--rows", type=int, default=2_000_000, help="rows of the dataframe")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    logging.getLogger("ray").setLevel(logging.WARNING)

    with ray_oob_sched.enable():
        import ray  # started by the first compute below, if not running already

        x = da.random.default_rng(42).random((args.size, args.size), chunks=512)
        y = (x + x.T).sum()
        got = y.compute()
        report("array: (x + x.T).sum()", np.isclose(got, y.compute(scheduler="threads")))

        z = x[::3, 100:].std(axis=0)
        got = z.compute()
        report("array: x[::3, 100:].std(axis=0)", np.allclose(got, z.compute(scheduler="threads")))

        cols = x.rechunk((args.size, 128))  # square blocks to column panels, p2p
        got = cols.std(axis=0).compute()
        expected = x.rechunk((args.size, 128), method="tasks").std(axis=0)
        report(
            "array: rechunk to columns (p2p)",
            np.allclose(got, expected.compute(scheduler="threads")),
        )

        rng = np.random.default_rng(0)
        pdf = pd.DataFrame({"k": rng.integers(0, 10_000, args.rows), "v": rng.random(args.rows)})
        ddf = dd.from_pandas(pdf, npartitions=16)
        agg = ddf.groupby("k").v.agg(["sum", "mean", "count"], split_out=4)
        got = agg.compute().sort_index()
        expected = pdf.groupby("k").v.agg(["sum", "mean", "count"])
        report("dataframe: groupby-agg (p2p shuffle)", np.allclose(got.values, expected.values))

        names = dd.from_pandas(
            pd.DataFrame({"k": np.arange(10_000), "name": [f"n{i}" for i in range(10_000)]}),
            npartitions=4,
        )
        joined = ddf.merge(names, on="k").set_index("k")
        got = joined.v.sum().compute()
        report("dataframe: merge + set_index (p2p)", np.isclose(got, pdf.v.sum()))

        words = db.from_sequence([f"w{i % 97}" for i in range(100_000)], npartitions=10)
        freq = words.frequencies()
        got = dict(freq.compute())
        report("bag: frequencies", got == dict(freq.compute(scheduler="threads")))

        total = dask.delayed(sum)([dask.delayed(pow)(i, 2) for i in range(500)])
        report("delayed: 500 tasks + sum", total.compute() == sum(i * i for i in range(500)))

        t0 = time.perf_counter()
        (xp,) = dask.persist(x)
        report("persist: x (data stays in Ray)", True)
        store = ray.available_resources().get("object_store_memory", 0.0)
        got = (xp + 1).mean().compute()
        report(
            "compute on the persisted array",
            np.isclose(got, (x + 1).mean().compute(scheduler="threads")),
        )
        del xp
        gc.collect()
        freed = ray.available_resources().get("object_store_memory", 0.0) - store
        print(
            f"dropped the persisted array: object store usage down by "
            f"~{max(freed, 0) / 2**20:.0f} MiB ({time.perf_counter() - t0:.2f} s)"
        )
    print("demo finished: every result was correct")


if __name__ == "__main__":
    main()
