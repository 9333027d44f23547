"""Where a shuffle's time and CPU go: CPU per process kind and the phases of one compute.

Runs ``shuffle_bench``'s shuffle workload on an embedded Ray with ray_oob_sched
(p2p method), and prints, per timed run, the wall time and the CPU seconds each kind
of process used during it (the driver, Ray's workers, the shuffle actor, the raylet,
...), read from ``/proc`` through psutil before and after the compute. On a machine
with few cores the total against ``cores x wall`` tells how busy it was. Beside it,
``phases`` says when each kind of key finished (a dask callback; seconds from the
compute's start, ``[keys, first end, last end]``): the inputs and transfer tasks
(fused), the barrier, the unpacks (``p2pshuffle``), their consumers (``summary``);
and the run's Ray tasks and calls and the pieces the actors received.

    .venv/bin/python benchmarks/process_cpu.py --partitions 256 --partition-mb 1 --out 256

Set ``DASK_RAY_OOB_SCHED__SHUFFLE__...`` variables to compare settings (e.g.
``..._TRANSPORT=tcp`` or ``..._COMBINE_BYTES=0``); run it alone.
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
import psutil
import ray
import ray.cloudpickle
from dask.callbacks import Callback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

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


def process_cpu() -> dict[int, tuple[str, float]]:
    """pid -> (kind, CPU seconds so far) for this process and all its descendants."""
    me = psutil.Process()
    out: dict[int, tuple[str, float]] = {}
    for p in [me, *me.children(recursive=True)]:
        try:
            kind = "driver" if p.pid == me.pid else p.name()
            times = p.cpu_times()
            out[p.pid] = (kind, times.user + times.system)
        except psutil.Error:  # gone meanwhile
            continue
    return out


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
    with shuffle_bench.embedded_ray(num_cpus=a.num_cpus, store_mb=a.store_mb):
        import ray_oob_sched

        for run in range(a.warmup + a.repeat):
            with dask.config.set({"dataframe.shuffle.method": "p2p"}):
                coll = shuffle_bench.dask_workloads(sizes, run=run)["shuffle"][1]
                timeline = Timeline()
                before = process_cpu()
                start = time.perf_counter()
                with timeline:
                    coll.compute(scheduler=ray_oob_sched.get)
                wall = time.perf_counter() - start
                after = process_cpu()
            if run < a.warmup:
                continue
            by_kind: collections.Counter[str] = collections.Counter()
            for pid, (proc, cpu) in after.items():
                by_kind[proc] += cpu - before.get(pid, (proc, 0.0))[1]
            stats = ray_oob_sched.last_stats()
            assert stats is not None  # the compute above succeeded
            ends = sorted(timeline.done.items(), key=lambda kv: min(kv[1]))
            print(
                json.dumps(
                    {
                        "wall_s": round(wall, 3),
                        "cpu_s": round(sum(by_kind.values()), 2),
                        "by_process": {
                            k: round(v, 2) for k, v in by_kind.most_common() if v >= 0.01
                        },
                        "ray_tasks": stats.ray_tasks,
                        "pieces_received": sum(r.pieces_received for r in stats.shuffle_runs),
                        "phases": {
                            k: [len(v), round(min(v), 3), round(max(v), 3)] for k, v in ends
                        },
                        **shuffle_bench.shuffle_settings(),
                    }
                )
            )


if __name__ == "__main__":
    main()
