"""When each phase of a shuffle ends: a timeline per key kind, with CPU per process.

Runs ``shuffle_bench``'s shuffle workload through ray_oob_sched (p2p) and records,
with a dask callback, when each group of each key kind finished (seconds from the
compute's start): the inputs and transfer tasks (fused), the barrier, the unpacks
(``p2pshuffle``), their consumers (``summary``). Prints one JSON line per timed run:
``phases`` maps a key kind to ``[groups' keys, first end, last end]``, beside the run's
CPU seconds per process kind (``process_cpu``), Ray tasks and calls, and pieces the
actors received. Load-robust enough to compare settings in one sitting:

    .venv/bin/python benchmarks/shuffle_phases.py --partitions 256 --partition-mb 1 --out 256
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path
from typing import Any

import dask
import ray
import ray.cloudpickle
from dask.callbacks import Callback

sys.path.insert(0, str(Path(__file__).resolve().parent))

import process_cpu
import shuffle_bench

# Workers cannot import this directory: ship the data functions by value.
ray.cloudpickle.register_pickle_by_value(shuffle_bench)


def kind(key: Any) -> str:
    """A key's name without dask's token: ``('shuffle-transfer-<token>', 3)`` gives
    ``shuffle-transfer``."""
    name = str(key[0] if isinstance(key, tuple) else key)
    head, _, tail = name.rpartition("-")
    return head if head and len(tail) >= 16 else name


class Timeline(Callback):
    """Per key kind, the times (from the compute's start) at which its keys finished."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # dask's, untyped
        self.t0 = time.perf_counter()
        self.done: dict[str, list[float]] = collections.defaultdict(list)

    def _start(self, dsk: Any) -> None:
        self.t0 = time.perf_counter()
        self.done.clear()

    def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
        self.done[kind(key)].append(time.perf_counter() - self.t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--partitions", type=int, default=256)
    parser.add_argument("--partition-mb", type=float, default=1.0)
    parser.add_argument("--out", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--store-mb", type=int, default=2048)
    a = parser.parse_args()
    sizes = shuffle_bench.Sizes(
        a.partitions, int(a.partition_mb * 2**20) // shuffle_bench.BYTES_PER_ROW, a.out, 0
    )
    shuffle_bench.init_ray(a.num_cpus, a.store_mb)
    import ray_oob_sched

    try:
        for run in range(a.warmup + a.repeat):
            with dask.config.set({"dataframe.shuffle.method": "p2p"}):
                coll = shuffle_bench.dask_workloads(sizes, run=run)["shuffle"][1]
                timeline = Timeline()
                before = process_cpu.process_cpu()
                start = time.perf_counter()
                with timeline:
                    coll.compute(scheduler=ray_oob_sched.get)
                wall = time.perf_counter() - start
                after = process_cpu.process_cpu()
            if run < a.warmup:
                continue
            by_kind: dict[str, float] = collections.defaultdict(float)
            for pid, (proc, cpu) in after.items():
                by_kind[proc] += cpu - before.get(pid, (proc, 0.0))[1]
            stats = ray_oob_sched.last_stats()
            assert stats is not None  # the compute above succeeded
            ends = sorted(timeline.done.items(), key=lambda kv: min(kv[1]))
            print(
                json.dumps(
                    {
                        "wall_s": round(wall, 3),
                        "ray_tasks": stats.ray_tasks,
                        "pieces_received": sum(r.pieces_received for r in stats.shuffle_runs),
                        "cpu_s": {
                            k: round(v, 2)
                            for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])
                            if v >= 0.01
                        },
                        "phases": {
                            k: [len(v), round(min(v), 3), round(max(v), 3)] for k, v in ends
                        },
                        **shuffle_bench.shuffle_settings(),
                    }
                )
            )
    finally:
        ray_oob_sched.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
