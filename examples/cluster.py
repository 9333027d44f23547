"""Run on an existing Ray cluster, with the shuffle settings a cluster wants.

Joins the cluster named by ``--address`` or RAY_ADDRESS (the head's GCS address,
``<head>:6379``; not ``ray://``, Ray Client is not supported), prints its nodes,
sets the shuffle service up for it, and runs a dataframe shuffle (groupby with
``split_out``) and an array rechunk of ``--size`` rows, checked against pandas and
numpy; exits non-zero if a result is wrong. Without an address it refuses to run,
unless ``--local`` asks for an embedded Ray on this machine.

    RAY_ADDRESS=10.0.0.1:6379 python examples/cluster.py [--size 4000000]
        [--transport ucx] [--memory-limit 2GiB] [--actors-per-node 2]
        [--port-range 40000-40031]
    python examples/cluster.py --local --size 200000

See docs/deploy.md for starting the cluster, ports, UCX settings and auth.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import dask
import dask.array as da
import dask.dataframe as dd
import numpy as np
import pandas as pd
import ray

import ray_oob_sched


def shuffle_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The ``ray-oob-sched.shuffle.*`` settings given on the command line."""
    settings: dict[str, Any] = {
        # ucx on clusters with a fast network; "tcp" where UCX cannot reach the
        # nodes' addresses; "auto" takes UCX when ucxx imports, else TCP with a warning.
        "transport": args.transport,
        # null: every actor listens on its own node's Ray address, which is what a
        # cluster wants (a fixed host only suits one machine).
        "host": None,
        # Received bytes an actor keeps in memory per run before spilling to disk.
        "memory-limit": dask.utils.parse_bytes(args.memory_limit)
        if args.memory_limit not in ("auto", None)
        else args.memory_limit,
        "actors-per-node": args.actors_per_node
        if args.actors_per_node == "auto"
        else int(args.actors_per_node),
        "port-range": args.port_range,  # firewalls: open this range between nodes
    }
    if args.spill_directory:
        settings["spill-directory"] = args.spill_directory
    return {f"ray-oob-sched.shuffle.{k}": v for k, v in settings.items()}


def connect(args: argparse.Namespace) -> str:
    """Join the cluster, or start an embedded Ray if ``--local``; describe it."""
    address = args.address or os.environ.get("RAY_ADDRESS")
    if args.local:
        # Bounded, so that a laptop keeps memory for the driver.
        ray.init(num_cpus=args.local_cpus, object_store_memory=256 * 2**20)
        where = "an embedded local Ray"
    elif address:
        if address.startswith("ray://"):
            raise SystemExit(
                f"{address} is a Ray Client address, which ray_oob_sched does not support: "
                "run this script on a cluster node with RAY_ADDRESS=<head>:6379, or submit "
                "it with `ray job submit -- python examples/cluster.py`"
            )
        ray.init(address=address)
        where = f"the cluster at {address}"
    else:
        raise SystemExit(
            "no cluster given: set RAY_ADDRESS=<head>:6379 or pass --address; "
            "--local runs on an embedded Ray on this machine instead"
        )
    nodes = [n for n in ray.nodes() if n["Alive"]]
    print(f"connected to {where}: {len(nodes)} node(s)", flush=True)
    for n in nodes:
        cpus = n["Resources"].get("CPU", 0)
        gpus = n["Resources"].get("GPU", 0)
        print(f"  {n['NodeManagerAddress']:<16} {cpus:g} CPUs, {gpus:g} GPUs", flush=True)
    return where


def run_workloads(rows: int) -> bool:
    rng = np.random.default_rng(0)
    pdf = pd.DataFrame({"key": rng.integers(0, rows // 10 + 1, rows), "x": rng.random(rows)})
    ddf = dd.from_pandas(pdf, npartitions=16)
    start = time.perf_counter()
    got = ddf.groupby("key").x.agg(["sum", "count"], split_out=8).compute()
    seconds = time.perf_counter() - start
    stats = ray_oob_sched.last_stats()
    expected = pdf.groupby("key").x.agg(["sum", "count"])
    got = got.sort_index()
    ok_df = got.index.equals(expected.index) and np.allclose(got, expected)
    print(
        f"groupby-agg with split_out=8 over {rows:,} rows: {seconds:.2f} s, "
        f"~{pdf.memory_usage().sum() / 2**20:,.1f} MiB input, "
        f"{stats.shuffles if stats else 0} out-of-band shuffle(s)   "
        f"{'correct' if ok_df else 'WRONG'}",
        flush=True,
    )

    side = max(int(np.sqrt(rows)), 64)
    arr = rng.random((side, side))
    x = da.from_array(arr, chunks=(side, max(side // 16, 1)))  # column panels
    start = time.perf_counter()
    got_rows = x.rechunk((max(side // 16, 1), side)).sum(axis=1).compute()  # row panels
    seconds = time.perf_counter() - start
    ok_arr = bool(np.allclose(got_rows, arr.sum(axis=1)))
    print(
        f"rechunk {side} x {side} from column to row panels: {seconds:.2f} s, "
        f"~{arr.nbytes / 2**20:,.1f} MiB moved   {'correct' if ok_arr else 'WRONG'}",
        flush=True,
    )
    return ok_df and ok_arr


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=4_000_000, help="rows of the dataframe")
    p.add_argument("--address", help="the head's GCS address (default: RAY_ADDRESS)")
    p.add_argument("--local", action="store_true", help="start an embedded Ray instead")
    p.add_argument("--local-cpus", type=int, default=2, help="CPUs of the embedded Ray")
    p.add_argument("--transport", default="auto", choices=["auto", "ucx", "tcp"])
    p.add_argument("--memory-limit", default="auto", help="e.g. 2GiB, or auto")
    p.add_argument("--actors-per-node", default="auto", help="an integer, or auto")
    p.add_argument("--port-range", help="ports the actors listen on, e.g. 40000-40031")
    p.add_argument("--spill-directory", help="local disk for spills (default: temp dir)")
    args = p.parse_args(argv)

    connect(args)
    try:
        # The settings go in before enable(): it starts the shuffle actors with them.
        with dask.config.set(shuffle_settings(args)), ray_oob_sched.enable():
            ok = run_workloads(args.size)
    finally:
        ray_oob_sched.shutdown()  # stops the shuffle actors; never a cluster it joined
        ray.shutdown()  # disconnects this driver (stops Ray only if --local started it)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
