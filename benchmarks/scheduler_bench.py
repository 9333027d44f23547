"""Scheduler benchmark: ray_oob_sched vs Ray's ray_dask_get vs dask's threaded scheduler.

One process, one local Ray shared by both Ray schedulers, the same graphs for all.
Prints one JSON line per measurement (median of --repeat runs, after one warm-up)
and one JSON line of ratios per workload.

    python benchmarks/scheduler_bench.py --tiny 10000 --array 8192 --chunk 1024 \\
        --rows 4000000 --repeat 5
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

import dask
import dask.array as da
import dask.dataframe as dd
import numpy as np
import pandas as pd
import ray

# Shared with the shuffle benchmark (same folder).
from shuffle_bench import report_speedups
from timing import measure


def tiny_graph(n: int, fan_in: int = 8) -> tuple[dict, str]:
    """n independent tiny tasks, then a tree reduction with the given fan-in."""
    dsk: dict[Any, Any] = {("leaf", i): (abs, -i) for i in range(n)}
    level = list(dsk)
    depth = 0
    while len(level) > 1:
        depth += 1
        nxt = []
        for j in range(0, len(level), fan_in):
            key = ("sum", depth, j)
            dsk[key] = (sum, level[j : j + fan_in])
            nxt.append(key)
        level = nxt
    return dsk, level[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", type=int, default=10_000, help="independent tiny tasks")
    p.add_argument("--array", type=int, default=8192, help="side of the square array")
    p.add_argument("--chunk", type=int, default=1024, help="chunk side")
    p.add_argument("--rows", type=int, default=4_000_000, help="dataframe rows")
    p.add_argument("--partitions", type=int, default=32, help="dataframe partitions")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--num-cpus", type=int, default=None)
    p.add_argument("--skip", nargs="*", default=[], help="schedulers to skip")
    args = p.parse_args()

    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    from ray.util.dask import ray_dask_get

    import ray_oob_sched

    schedulers: dict[str, Any] = {
        "ray_oob_sched": ray_oob_sched.get,
        "ray_dask_get": ray_dask_get,
        "threaded": "threads",
    }
    schedulers = {k: v for k, v in schedulers.items() if k not in args.skip}

    dsk, root = tiny_graph(args.tiny)
    x = da.random.default_rng(0).random((args.array, args.array), chunks=args.chunk)
    arr = (x + x.T).sum()
    rng = np.random.default_rng(0)
    pdf = pd.DataFrame({"k": rng.integers(0, 1000, args.rows), "v": rng.random(args.rows)})
    ddf = dd.from_pandas(pdf, npartitions=args.partitions)
    grp = ddf.groupby("k").v.agg(["sum", "mean", "count"])

    workloads: dict[str, tuple[int, Callable[[Any], Any]]] = {
        "tiny_tree": (len(dsk), lambda s: _get(s, dsk, root)),
        "array_xxT_sum": (len(arr.__dask_graph__()), lambda s: arr.compute(scheduler=s)),
        "df_groupby_agg": (len(grp.__dask_graph__()), lambda s: grp.compute(scheduler=s)),
    }
    for name, (ntasks, run) in workloads.items():
        medians: dict[str, float] = {}
        results = {}
        for sname, sched in schedulers.items():
            with dask.config.set({"dataframe.shuffle.method": "tasks"}):
                t, res, _ = measure(
                    lambda run=run, sched=sched: run(sched), repeat=args.repeat, warmup=1
                )
            medians[sname] = t
            results[sname] = res
            print(
                json.dumps(
                    {
                        "workload": name,
                        "scheduler": sname,
                        "median_s": round(t, 4),
                        "dask_tasks": ntasks,
                        "tasks_per_s": round(ntasks / t, 1),
                        "repeat": args.repeat,
                    }
                ),
                flush=True,
            )
        _check_same(name, results)
        report_speedups(name, medians)
    ray.shutdown()


def _get(sched: Any, dsk: dict, key: Any) -> Any:
    if isinstance(sched, str):
        return dask.threaded.get(dsk, key)
    return sched(dsk, key)


def _check_same(name: str, results: dict[str, Any]) -> None:
    vals = list(results.values())
    for v in vals[1:]:
        if isinstance(v, pd.DataFrame):
            pd.testing.assert_frame_equal(v.sort_index(), vals[0].sort_index())
        else:
            np.testing.assert_allclose(v, vals[0], err_msg=name)


if __name__ == "__main__":
    main()
