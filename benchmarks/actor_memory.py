"""The shuffle actor's memory against ``shuffle.memory-limit``, while receiving, while
unpacking, and after a shuffle: does the unpack phase stay within the budget, and does
the actor give memory back between runs?

One embedded Ray (bounded object store), one shuffle actor, ``memory-limit`` as given;
``--runs`` dataframe shuffles in a row of ``--partitions`` generated inputs of
``--partition-mb`` each into ``--out`` outputs (each reduced to its row count, so the
outputs leave the object store soon). A thread samples the actor's ``/proc`` status
every 20 ms (RSS, and its parts: anonymous, what the process itself allocated;
file-backed, mapped files such as spill files being read back, whose pages the kernel
may reclaim; shared, Ray's object-store pages) and the run's phase from ``shuffle_status()``
(receive: transfers unfinished; unpack: every transfer done). After each run it
reads, inside the actor, Arrow's live bytes and its pool's backend. ``--probe``
ends by measuring, inside the actor, what Arrow's ``release_unused()`` and then
glibc's ``malloc_trim(0)`` give back.

    flock /tmp/roos-ray.lock .venv/bin/python benchmarks/actor_memory.py --runs 3

Prints one JSON line per run and one summary line.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import ray

from shuffle.shell._actor import _IDLE_RELEASE_S

MiB = 2**20
BYTES_PER_ROW = 32


def gen_partition(i: int, rows: int, run: int) -> pd.DataFrame:
    """Input ``i`` of run ``run`` (new keys per run), made where it runs."""
    rng = np.random.default_rng([run, i])
    return pd.DataFrame(
        {
            "k": rng.integers(0, 2**40, rows, dtype=np.int64),
            "a": rng.random(rows),
            "b": rng.standard_normal(rows),
            "c": rng.integers(0, 1000, rows, dtype=np.int64),
        }
    )


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon, RssFile and RssShmem of ``pid`` in bytes."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[name] = int(rest.split()[0]) * 1024
    return out


def in_actor_arrow(actor: Any) -> dict[str, Any]:
    """Arrow's live bytes and pool backend inside the actor."""

    def probe(_self: Any) -> dict[str, Any]:
        import pyarrow as pa

        pool = pa.default_memory_pool()
        return {"arrow_bytes": pa.total_allocated_bytes(), "arrow_pool": pool.backend_name}

    out: dict[str, Any] = ray.get(actor.__ray_call__.remote(probe))
    return out


def in_actor_release(actor: Any, pid: int) -> dict[str, int]:
    """RSS before, after Arrow's release_unused(), after malloc_trim(0), and after a
    garbage collection followed by both (what reference cycles held)."""

    def release(_self: Any, what: str) -> None:
        import ctypes
        import gc

        import pyarrow as pa

        if what == "gc":
            gc.collect()
        if what in ("arrow", "gc"):
            pa.default_memory_pool().release_unused()
        if what in ("trim", "gc"):
            ctypes.CDLL("libc.so.6").malloc_trim(0)

    out = {"rss_before": proc_status(pid)["RssAnon"]}
    ray.get(actor.__ray_call__.remote(release, "arrow"))
    out["anon_after_arrow_release"] = proc_status(pid)["RssAnon"]
    ray.get(actor.__ray_call__.remote(release, "trim"))
    out["anon_after_malloc_trim"] = proc_status(pid)["RssAnon"]
    ray.get(actor.__ray_call__.remote(release, "gc"))
    out["anon_after_gc_collect"] = proc_status(pid)["RssAnon"]
    return out


@dataclass
class Sampler:
    pid: int
    phase: str = "idle"
    peaks: dict[str, dict[str, int]] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        import ray_oob_sched

        last_status = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now - last_status > 0.2:
                last_status = now
                runs = ray_oob_sched.shuffle_status(timeout=1.0).runs
                if runs:
                    r = runs[0]
                    self.phase = "receive" if r.inputs_received < r.inputs_expected else "unpack"
            st = proc_status(self.pid)
            peak = self.peaks.setdefault(self.phase, {})
            for k, v in st.items():
                peak[k] = max(peak.get(k, 0), v)
            self._stop.wait(0.02)

    def stop(self) -> None:
        self._stop.set()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--partitions", type=int, default=32)
    p.add_argument("--partition-mb", type=int, default=16)
    p.add_argument("--out", type=int, default=32)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--memory-limit-mb", type=int, default=64)
    p.add_argument("--store-mb", type=int, default=1536)
    p.add_argument("--num-cpus", type=int, default=2)
    p.add_argument("--probe", action="store_true", help="end with a release/trim probe")
    a = p.parse_args()

    ray.init(
        num_cpus=a.num_cpus,
        object_store_memory=a.store_mb * MiB,
        include_dashboard=False,
        log_to_driver=False,
    )
    import ray_oob_sched
    from ray_oob_sched._plugin import DEFAULT

    rows = a.partition_mb * MiB // BYTES_PER_ROW
    config = {
        "dataframe.shuffle.method": "p2p",
        "ray-oob-sched.shuffle.memory-limit": a.memory_limit_mb * MiB,
        "ray-oob-sched.shuffle.actors-per-node": 1,
    }
    try:
        with dask.config.set(config):
            (actor,) = DEFAULT.shuffle_service().actors()
            pid = ray.get(actor.handle.__ray_call__.remote(lambda _self: __import__("os").getpid()))
            base = proc_status(pid)
            start = {
                "start_rss_mb": round(base["VmRSS"] / MiB),
                "start_anon_mb": round(base["RssAnon"] / MiB),
            }
            print(json.dumps({"actor_pid": pid, **start}))
            for run in range(1, a.runs + 1):
                meta = gen_partition(0, 0, 0)
                ddf = dd.from_map(  # type: ignore[no-untyped-call]
                    gen_partition,
                    range(a.partitions),
                    args=(rows, run),
                    meta=meta,
                    enforce_metadata=False,
                )
                counts = ddf.shuffle("k", npartitions=a.out).map_partitions(len)
                sampler = Sampler(pid)
                thread = threading.Thread(target=sampler.run, daemon=True)
                thread.start()
                t0 = time.monotonic()
                n = sum(counts.compute(scheduler=ray_oob_sched.get))
                seconds = time.monotonic() - t0
                sampler.stop()
                thread.join()
                assert n == rows * a.partitions, (n, rows * a.partitions)
                # At rest: the actor gives freed memory back once idle for a moment.
                time.sleep(_IDLE_RELEASE_S + 0.5)
                after = proc_status(pid)
                line = {
                    "run": run,
                    "seconds": round(seconds, 1),
                    "memory_limit_mb": a.memory_limit_mb,
                    "shuffle_mb": a.partitions * a.partition_mb,
                    **{
                        f"peak_{phase}_{k}_mb": round(v / MiB)
                        for phase, peak in sorted(sampler.peaks.items())
                        for k, v in peak.items()
                        if phase in ("receive", "unpack")
                    },
                    "after_rss_mb": round(after["VmRSS"] / MiB),
                    "after_anon_mb": round(after["RssAnon"] / MiB),
                    **in_actor_arrow(actor.handle),
                }
                print(json.dumps(line), flush=True)
            if a.probe:
                probe = {k: round(v / MiB) for k, v in in_actor_release(actor.handle, pid).items()}
                print(json.dumps({"probe_mb": probe}), flush=True)
    finally:
        ray_oob_sched.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
