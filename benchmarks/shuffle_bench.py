"""Shuffle benchmark: ray_oob_sched's p2p shuffle vs ray_dask_get, distributed P2P, pandas.

One process run. Workloads: ``df.shuffle("k", npartitions=M)`` of N generated input
partitions of B bytes each, and a hash merge (``merge(on="k", npartitions=M)``) of two
such frames. Inputs are made inside tasks by a generator function per partition
(``dd.from_map``), so no data is shipped from the driver. Each output partition is
reduced to a one-row summary (rows, distinct keys, column sums), so the result
pulled to the driver is tiny but the whole shuffle must run. Competitors:

- ``ray_oob_sched``: ``ray_oob_sched.get``, shuffle method "p2p" (out-of-band
  shuffle actors); reports ``ray_oob_sched.last_stats()``;
- ``ray_dask_get``: Ray's Dask-on-Ray, shuffle method "tasks";
- ``distributed``: ``LocalCluster(n_workers=2, threads_per_worker=1, processes=True)``,
  shuffle method "p2p" (started after Ray is shut down);
- ``floor``: pandas in this process: generate, concat, split by dask's
  ``partitioning_index`` into M frames (merge: split both sides, merge pair-wise).

Prints one JSON line per measurement (median of --repeat runs, after --warmup runs),
then one JSON line of ratios per workload; results are cross-checked between
competitors (same rows, same distinct-key count, same column sums).

What each line reports besides times, measured while that competitor ran (warm-ups
included; counts are per run, i.e. divided by the number of runs):

- ``ray_tasks_executed``: tasks and actor calls Ray's workers executed (each raylet's
  per-worker ``num_executed_tasks``, sampled), ``plasma_objects_created``: objects
  created in the object stores (small results inlined into their owner are not
  there), both from the raylets' node stats;
- ``plasma_peak_mb`` (sampled, all nodes), ``spilled_mb`` and ``restored_mb`` (per run);
- ``machine_mem_growth_mb``: peak of the machine's used memory (MemTotal -
  MemAvailable, sampled; shared memory included) above its value at the start, i.e.
  driver, workers, actors and object store together (only meaningful alone on a machine);
- ``driver_peak_rss_mb``: the driver process's peak RSS;
- ``actors_private_peak_mb``, ``workers_private_peak_mb``: peaks of the summed private
  memory (RssAnon: the object store's shared pages left out) of Ray's actors and of
  its task workers on this machine;
- ours only, from ``last_stats().shuffle_runs`` (the last run): ``receive_phase_s``
  (to the last message an actor stored), ``unpack_busy_s`` (output builds, summed over
  threads), the actors' spill writes and read-backs (MiB, seconds, MiB/s).

The ratio line also gives every competitor's ``machine_mem_growth_mb``.

    python benchmarks/shuffle_bench.py --partitions 64 --partition-mb 16 --out 64 \\
        --repeat 5
    python benchmarks/shuffle_bench.py --partitions 256 --partition-mb 1 --out 256 \\
        --repeat 5
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import ray
from dask.dataframe.shuffle import partitioning_index

# The measuring loop, shared with the other benchmarks (same folder).
from timing import measure

COMPETITORS = ("ray_oob_sched", "ray_dask_get", "distributed", "floor")
WORKLOADS = ("shuffle", "merge")
LEFT = ("k", "a", "b", "c")  # int64 key, float64, float64, int64
RIGHT = ("k", "x", "y", "z")
BYTES_PER_ROW = 8 * len(LEFT)
_NIL_ACTOR_ID = ray.ActorID.nil().binary()


# -- data --------------------------------------------------------------------


def gen_partition(
    i: int, rows: int, key_range: int, seed: int, names: Sequence[str], run: int = 0
) -> pd.DataFrame:
    """Input partition ``i``: deterministic in (seed, i), made where it runs.

    ``run`` is unused: a new value gives the graph new keys, so that no scheduler can
    hand back a result it still holds from the previous run (distributed did).
    """
    rng = np.random.default_rng([seed, i])
    k, f1, f2, n = names
    return pd.DataFrame(
        {
            k: rng.integers(0, key_range, rows, dtype=np.int64),
            f1: rng.random(rows),
            f2: rng.standard_normal(rows),
            n: rng.integers(0, 1000, rows, dtype=np.int64),
        }
    )


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """One row per output partition: its rows, the sum of its keys and of every column.

    Cheap on purpose (a counting or hashing consumer would add the same seconds to
    every competitor and hide the shuffle's own time), yet a strong check: every
    competitor's per-partition row counts and key sums must be identical
    (``_check_same``), which holds only if each key landed in the same output
    partition as dask's ``partitioning_index`` puts it.
    """
    out: dict[str, Any] = {"rows": [len(df)], "k_sum": [int(df["k"].sum())]}
    for col in df.columns:
        if col != "k":
            out[f"sum_{col}"] = [df[col].sum()]
    return pd.DataFrame(out)


def total(parts: pd.DataFrame) -> dict[str, Any]:
    """The per-partition summaries of one run, added up, with the exact per-partition
    row counts and key sums."""
    out: dict[str, Any] = {c: parts[c].sum().item() for c in parts.columns}
    out["rows_by_partition"] = parts["rows"].astype(int).tolist()
    out["k_sum_by_partition"] = parts["k_sum"].astype(int).tolist()
    return out


@dataclass(frozen=True)
class Sizes:
    partitions: int
    rows: int  # per input partition
    out: int
    seed: int

    @property
    def key_range(self) -> int:
        # Keys drawn from [0, all rows): a merge of two frames yields about as many
        # rows as one input frame.
        return self.partitions * self.rows

    def frame_bytes(self) -> int:
        return self.partitions * self.rows * BYTES_PER_ROW

    def ddf(self, names: Sequence[str], seed_offset: int = 0, run: int = 0) -> dd.DataFrame:
        meta = gen_partition(0, 0, 1, 0, names)
        return dd.from_map(
            gen_partition,
            range(self.partitions),
            args=(self.rows, self.key_range, self.seed + seed_offset, tuple(names), run),
            meta=meta,
            label=f"gen-{names[1]}",
            enforce_metadata=False,
        )

    def pandas_parts(self, names: Sequence[str], seed_offset: int = 0) -> list[pd.DataFrame]:
        return [
            gen_partition(i, self.rows, self.key_range, self.seed + seed_offset, tuple(names))
            for i in range(self.partitions)
        ]


def dask_workloads(s: Sizes, run: int = 0) -> dict[str, tuple[int, dd.DataFrame]]:
    """workload -> (input bytes, collection of per-output-partition summaries)."""
    left = s.ddf(LEFT, run=run)
    right = s.ddf(RIGHT, seed_offset=1, run=run)
    shuffled = left.shuffle("k", npartitions=s.out)
    merged = left.merge(right, on="k", how="inner", npartitions=s.out, broadcast=False)
    empty_l, empty_r = gen_partition(0, 0, 1, 0, LEFT), gen_partition(0, 0, 1, 0, RIGHT)
    meta = summary(empty_l)
    meta_m = summary(pd.merge(empty_l, empty_r, on="k"))
    return {
        "shuffle": (s.frame_bytes(), shuffled.map_partitions(summary, meta=meta)),
        "merge": (2 * s.frame_bytes(), merged.map_partitions(summary, meta=meta_m)),
    }


def _split(df: pd.DataFrame, nout: int) -> list[pd.DataFrame]:
    """Hash-partition ``df`` on k into ``nout`` frames (a stable sort on the target)."""
    # As dask's AssignPartitioningIndex does: the key columns as a frame, numeric
    # ones cast to float64, so the floor's output partitions are dask's.
    target = np.asarray(partitioning_index(df[["k"]].astype(np.float64), nout))
    order = np.argsort(target, kind="stable")
    bounds = np.searchsorted(target[order], np.arange(1, nout))
    ordered = df.take(order)
    return [ordered.iloc[a:b] for a, b in zip([0, *bounds], [*bounds, len(df)], strict=False)]


def floor_shuffle(s: Sizes, phases: dict[str, list[float]]) -> pd.DataFrame:
    t0 = time.perf_counter()
    df = pd.concat(s.pandas_parts(LEFT), ignore_index=True)
    t1 = time.perf_counter()
    out = pd.concat([summary(p) for p in _split(df, s.out)], ignore_index=True)
    phases["generate_s"].append(t1 - t0)
    phases["split_s"].append(time.perf_counter() - t1)
    return out


def floor_merge(s: Sizes, phases: dict[str, list[float]]) -> pd.DataFrame:
    t0 = time.perf_counter()
    left = pd.concat(s.pandas_parts(LEFT), ignore_index=True)
    right = pd.concat(s.pandas_parts(RIGHT, seed_offset=1), ignore_index=True)
    t1 = time.perf_counter()
    pairs = zip(_split(left, s.out), _split(right, s.out), strict=False)
    out = pd.concat([summary(pd.merge(a, b, on="k")) for a, b in pairs], ignore_index=True)
    phases["generate_s"].append(t1 - t0)
    phases["split_s"].append(time.perf_counter() - t1)
    return out


# -- measuring -----------------------------------------------------------------


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux: VmHWM, and with it ru_maxrss)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss_mb(field: str = "VmHWM") -> float:
    """This process's peak (VmHWM) or current (VmRSS) resident set size, MiB."""
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"{field}:\s+(\d+) kB", f.read())
        if m:
            return int(m.group(1)) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _private_mb(pid: int) -> float:
    """A process's private resident memory (RssAnon), MiB; 0 if unknown. Unlike its
    RSS, this leaves out the object store's shared pages it mapped or wrote."""
    try:
        with open(f"/proc/{pid}/status") as f:
            m = re.search(r"RssAnon:\s+(\d+) kB", f.read())
    except OSError:
        return 0.0
    return int(m.group(1)) / 1024 if m else 0.0


def _machine_used_mb() -> float | None:
    """MemTotal - MemAvailable, MiB (Linux); counts shared memory such as plasma's."""
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
    except OSError:
        return None
    kib = int(info["MemTotal"].split()[0]) - int(info["MemAvailable"].split()[0])
    return kib / 1024


class Monitor:
    """Samples memory and, while Ray runs, the raylets' node stats, in a thread.

    Executed tasks are counted per worker (a worker's ``num_executed_tasks`` only
    grows), keeping each worker's last sample, so workers that exit still count up to
    their last sample; the driver executes none.
    """

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bench-monitor", daemon=True)
        self._ray = ray.is_initialized()
        self._nodes = (
            [(n["NodeManagerAddress"], n["NodeManagerPort"]) for n in ray.nodes() if n["Alive"]]
            if self._ray
            else []
        )
        self._tasks: dict[bytes, int] = {}  # worker id -> executed tasks, latest sample
        self._tasks0: dict[bytes, int] = {}
        self._store0: dict[str, int] = {}
        self._store: dict[str, int] = {}
        self.plasma_peak = 0
        # peaks of the summed private memory of Ray's actors and of its other workers
        # (this machine's processes; the driver is reported on its own)
        self.actors_private_peak = 0.0
        self.workers_private_peak = 0.0
        self.mem0 = _machine_used_mb()
        self.mem_peak = self.mem0

    def _sample(self) -> None:
        mem = _machine_used_mb()
        if mem is not None and self.mem_peak is not None:
            self.mem_peak = max(self.mem_peak, mem)
        if not self._ray:
            return
        from ray._private.internal_api import node_stats

        used, totals = (
            0,
            dict.fromkeys(
                ("spilled_bytes_total", "restored_bytes_total", "cumulative_created_objects"), 0
            ),
        )
        private = {"actor": 0.0, "worker": 0.0}
        for address, port in self._nodes:
            reply = node_stats(address, port, include_memory_info=False)
            for w in reply.core_workers_stats:
                seen = self._tasks.get(w.worker_id, 0)
                self._tasks[w.worker_id] = max(seen, w.num_executed_tasks)
                if w.pid and w.pid != os.getpid():
                    # a task worker reports the nil actor id, not an empty one
                    actor = w.actor_id and w.actor_id != _NIL_ACTOR_ID
                    private["actor" if actor else "worker"] += _private_mb(w.pid)
            used += reply.store_stats.object_store_bytes_used
            for k in totals:
                totals[k] += getattr(reply.store_stats, k)
        self.actors_private_peak = max(self.actors_private_peak, private["actor"])
        self.workers_private_peak = max(self.workers_private_peak, private["worker"])
        self.plasma_peak = max(self.plasma_peak, used)
        self._store = totals

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._sample()
            except Exception as e:  # noqa: BLE001 -- a lost sample only blurs the peak
                print(f"monitor: sample failed: {e!r}", file=sys.stderr)

    def __enter__(self) -> Monitor:
        self._sample()
        self._tasks0, self._store0 = dict(self._tasks), dict(self._store)
        self.plasma_peak = 0
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def report(self, runs: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self._ray:
            executed = sum(n - self._tasks0.get(w, 0) for w, n in self._tasks.items())
            delta = {k: v - self._store0.get(k, 0) for k, v in self._store.items()}
            out |= {
                "ray_tasks_executed": round(executed / runs, 1),
                "plasma_objects_created": round(delta["cumulative_created_objects"] / runs, 1),
                "plasma_peak_mb": round(self.plasma_peak / 2**20, 1),
                "spilled_mb": round(delta["spilled_bytes_total"] / 2**20 / runs, 1),
                "restored_mb": round(delta["restored_bytes_total"] / 2**20 / runs, 1),
                "actors_private_peak_mb": round(self.actors_private_peak, 1),
                "workers_private_peak_mb": round(self.workers_private_peak, 1),
            }
        if self.mem0 is not None and self.mem_peak is not None:
            out["machine_mem_growth_mb"] = round(self.mem_peak - self.mem0, 1)
        return out


def driver_rss(*, exact: bool, start: float, peak: float) -> dict[str, float | None]:
    """The peak RSS of the whole driver process during a competitor's runs, and how far
    above its RSS at the start (imports, Ray's core worker) it went; ``None`` unless the
    peak was reset at the start (``exact``)."""
    return {
        "driver_peak_rss_mb": round(peak, 1) if exact else None,
        "driver_rss_growth_mb": round(peak - start, 1) if exact else None,
    }


def last_stats() -> dict[str, Any]:
    """What ray_oob_sched's last compute ran (Ray tasks, objects, shuffles), and how."""
    import ray_oob_sched

    st = ray_oob_sched.last_stats()
    return {
        "ray_tasks": st.ray_tasks,
        "objects": st.objects,
        "shuffles": st.shuffles,
        **shuffle_settings(),
        **shuffle_phases(st.shuffle_runs),
    }


def shuffle_settings() -> dict[str, Any]:
    """The shuffle actors' settings that shape this measurement (spilling, transport)."""

    # Key by key: dask.config.get canonicalises "-" and "_" (an environment variable
    # such as DASK_RAY_OOB_SCHED__SHUFFLE__MEMORY_LIMIT sets "memory_limit").
    def get(key: str) -> Any:
        return dask.config.get(f"ray-oob-sched.shuffle.{key}")

    return {
        "transport": get("transport"),
        "actors_per_node": get("actors-per-node"),
        "actor_memory_limit": get("memory-limit"),
    }


def shuffle_phases(runs: Sequence[Any]) -> dict[str, Any]:
    """Where a compute's shuffles spent their time on the actors (``last_stats()``):
    the receive phase (run start to the last message stored: inputs made, split and
    sent), output builds (summed over threads), and the actors' spill writes and
    read-backs with their rates."""

    def mb(n: float) -> float:
        return round(n / 2**20, 1)

    def rate(nbytes: int, seconds: float) -> float | None:
        return round(nbytes / 2**20 / seconds) if seconds > 0 else None

    spilled = sum(r.bytes_spilled for r in runs)
    spill_s = sum(r.spill_seconds for r in runs)
    read = sum(r.bytes_read_back for r in runs)
    read_s = sum(r.read_back_seconds for r in runs)
    return {
        "shuffle_run_s": round(sum(r.seconds for r in runs), 2),
        "receive_phase_s": round(sum(r.receive_seconds for r in runs), 2),
        "unpack_busy_s": round(sum(r.unpack_seconds for r in runs), 2),
        "actor_spilled_mb": mb(spilled),
        "actor_spill_s": round(spill_s, 2),
        "actor_spill_mb_per_s": rate(spilled, spill_s),
        "actor_read_back_mb": mb(read),
        "actor_read_back_s": round(read_s, 2),
        "actor_read_back_mb_per_s": rate(read, read_s),
    }


def graph_len(coll: Any) -> int:
    """Tasks in the graph dask hands the scheduler (under the current config)."""
    from dask._expr import FinalizeCompute

    expr = FinalizeCompute(dask.base.collections_to_expr([coll])).optimize()
    return len(expr.__dask_graph__())


def report_failure(failed: list[str], *, competitor: str, workload: str, error: Exception) -> None:
    """Print a competitor's failure as a JSON line (traceback to stderr) and note it in
    ``failed``: the other competitors still run."""
    failed.append(f"{competitor}/{workload}")
    print(
        json.dumps(
            {
                "workload": workload,
                "competitor": competitor,
                "error": f"{type(error).__name__}: {error}"[:2000],
            }
        ),
        flush=True,
    )
    traceback.print_exc(file=sys.stderr)


def report_speedups(workload: str, medians: dict[str, float], **extra: Any) -> None:
    """Print each competitor's median over ray_oob_sched's (when it ran), and ``extra``."""
    base = medians.get("ray_oob_sched")
    if base:
        print(
            json.dumps(
                {
                    "workload": workload,
                    "speedup_vs": {
                        k: round(v / base, 2) for k, v in medians.items() if k != "ray_oob_sched"
                    },
                    **extra,
                }
            ),
            flush=True,
        )


def exit_if_failed(failed: list[str]) -> None:
    """If anything failed, say what (one JSON line) and exit with status 1."""
    if failed:
        print(json.dumps({"failed": failed}), flush=True)
        sys.exit(1)


@contextlib.contextmanager
def distributed_client() -> Iterator[Any]:
    """A client of a two-process ``distributed.LocalCluster``, the P2P competitor."""
    import logging

    from distributed import Client, LocalCluster

    # distributed's P2P logs every shuffle start and end at WARNING level.
    logging.getLogger("distributed.shuffle._scheduler_plugin").setLevel(logging.ERROR)
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


class Bench:
    def __init__(self, args: argparse.Namespace, sizes: Sizes) -> None:
        self.args = args
        self.sizes = sizes
        self.medians: dict[str, dict[str, float]] = {w: {} for w in args.workloads}
        self.mem_growth: dict[str, dict[str, float]] = {w: {} for w in args.workloads}
        self.results: dict[str, dict[str, dict[str, Any]]] = {w: {} for w in args.workloads}
        self.failed: list[str] = []

    def run(
        self,
        competitor: str,
        workload: str,
        input_bytes: int,
        fn: Callable[[], pd.DataFrame],
        extra: Callable[[], dict[str, Any]] = dict,
    ) -> None:
        a = self.args
        try:
            exact = _reset_peak_rss()
            rss0 = _rss_mb("VmRSS")
            with Monitor(a.sample_interval) as monitor:
                t, res, times = measure(fn, repeat=a.repeat, warmup=a.warmup)
            rss = _rss_mb()
            info = {**extra(), **monitor.report(a.repeat + a.warmup)}
        except Exception as e:  # noqa: BLE001 -- report, go on with the others
            report_failure(self.failed, competitor=competitor, workload=workload, error=e)
            return
        self.medians[workload][competitor] = t
        if "machine_mem_growth_mb" in info:
            self.mem_growth[workload][competitor] = info["machine_mem_growth_mb"]
        self.results[workload][competitor] = total(res)
        print(
            json.dumps(
                {
                    "workload": workload,
                    "competitor": competitor,
                    "median_s": round(t, 4),
                    "gb_per_s": round(input_bytes / t / 1e9, 3),
                    "input_bytes": input_bytes,
                    "partitions": self.sizes.partitions,
                    "out": self.sizes.out,
                    "rows_per_partition": self.sizes.rows,
                    **info,
                    **driver_rss(exact=exact, start=rss0, peak=rss),
                    "repeat": a.repeat,
                    "times_s": [round(x, 4) for x in times],
                }
            ),
            flush=True,
        )

    def report(self) -> None:
        for workload in self.args.workloads:
            _check_same(workload, self.results[workload], self.failed)
            report_speedups(
                workload, self.medians[workload], machine_mem_growth_mb=self.mem_growth[workload]
            )


def _check_same(workload: str, results: dict[str, dict[str, Any]], failed: list[str]) -> None:
    if len(results) < 2:
        return
    names = list(results)
    ref = results[names[0]]
    same = True
    for name in names[1:]:
        got = results[name]
        # Float sums depend on the order of addition: values are O(1), so allow
        # a relative error of 1e-9 of the row count.
        atol = 1e-9 * ref["rows"]
        ok = got.keys() == ref.keys() and all(
            got[c] == ref[c]
            if isinstance(ref[c], (int, list))
            else np.isclose(got[c], ref[c], rtol=1e-9, atol=atol)
            for c in ref
        )
        if not ok:
            same = False
            failed.append(f"check {workload}: {name}")
            print(
                json.dumps(
                    {
                        "workload": workload,
                        "check": "MISMATCH",
                        names[0]: ref,
                        name: got,
                    }
                ),
                flush=True,
            )
    if same:
        shown = {k: v for k, v in ref.items() if not isinstance(v, list)}
        print(
            json.dumps(
                {
                    "workload": workload,
                    "check": "same",
                    "competitors": names,
                    "partitions_compared": len(ref["rows_by_partition"]),
                    **shown,
                }
            ),
            flush=True,
        )


# -- competitors ---------------------------------------------------------------


_RUNS = itertools.count(1)


def fresh(bench: Bench, workload: str) -> dd.DataFrame:
    """``workload``'s collection with new keys (see ``gen_partition``)."""
    return dask_workloads(bench.sizes, run=next(_RUNS))[workload][1]


def parse_competitor_args(
    p: argparse.ArgumentParser, *, workloads: Sequence[str], competitors: Sequence[str]
) -> argparse.Namespace:
    """``p``'s arguments, with the options every competitor benchmark here takes added:
    repetitions, the embedded Ray's size, the seed, and which workloads and competitors."""
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    p.add_argument("--num-cpus", type=int, default=None)
    p.add_argument("--store-mb", type=int, default=4096, help="Ray object store, MiB")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workloads", nargs="*", default=list(workloads), choices=workloads)
    p.add_argument("--skip", nargs="*", default=[], choices=competitors, help="competitors to skip")
    args = p.parse_args()
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    return args


@contextlib.contextmanager
def embedded_ray(*, num_cpus: int | None, store_mb: int) -> Iterator[None]:
    """The embedded Ray every benchmark here measures on, shut down on leaving with
    ray_oob_sched's shuffle actors. Started with the Ray settings ray_oob_sched's own
    embedded start uses (its ``init`` config: objects freed every 100 ms), as
    ``enable()`` would start it; the Ray competitors share it."""
    import ray_oob_sched
    from ray_oob_sched._config import ray_init_kwargs

    system_config = ray_init_kwargs().get("_system_config")
    ray.init(
        num_cpus=num_cpus,
        object_store_memory=store_mb * 2**20,
        include_dashboard=False,
        log_to_driver=False,
        **({"_system_config": system_config} if system_config else {}),
    )

    try:
        yield
    finally:
        ray_oob_sched.shutdown()  # the shuffle actors; never a Ray it did not start
        ray.shutdown()


def run_each(
    bench: Bench,
    work: dict[str, tuple[int, dd.DataFrame]],
    *,
    competitor: str,
    method: str,
    scheduler: Callable[..., Any],
    extra: Callable[[int], dict[str, Any]],
) -> None:
    """``competitor``: every workload with shuffle method ``method`` on ``scheduler``;
    ``extra`` gives what its lines report besides, from the graph's task count."""
    for name, (nbytes, coll) in work.items():
        with dask.config.set({"dataframe.shuffle.method": method}):
            ntasks = graph_len(coll)
            bench.run(
                competitor,
                name,
                nbytes,
                lambda name=name: fresh(bench, name).compute(scheduler=scheduler),
                lambda n=ntasks: extra(n),
            )


def run_ray(bench: Bench, work: dict[str, tuple[int, dd.DataFrame]], skip: set[str]) -> None:
    with embedded_ray(num_cpus=bench.args.num_cpus, store_mb=bench.args.store_mb):
        import ray_oob_sched

        if "ray_oob_sched" not in skip:
            run_each(
                bench,
                work,
                competitor="ray_oob_sched",
                method="p2p",
                scheduler=ray_oob_sched.get,
                extra=lambda n: {"dask_tasks": n, **last_stats()},
            )
        if "ray_dask_get" not in skip:
            from ray.util.dask import ray_dask_get

            run_each(
                bench,
                work,
                competitor="ray_dask_get",
                method="tasks",
                scheduler=ray_dask_get,
                # one Ray task, and one object, per Dask task
                extra=lambda n: {"dask_tasks": n, "ray_tasks": n, "objects": n},
            )


def run_distributed(bench: Bench, work: dict[str, tuple[int, dd.DataFrame]]) -> None:
    with distributed_client() as client:
        run_each(
            bench,
            work,
            competitor="distributed",
            method="p2p",
            scheduler=client.get,
            extra=lambda n: {"dask_tasks": n},
        )


def run_floor(bench: Bench) -> None:
    s = bench.sizes
    fns = {"shuffle": (s.frame_bytes(), floor_shuffle), "merge": (2 * s.frame_bytes(), floor_merge)}
    for name in bench.args.workloads:
        nbytes, fn = fns[name]
        phases: dict[str, list[float]] = {"generate_s": [], "split_s": []}

        def med(phases: dict[str, list[float]] = phases) -> dict[str, Any]:
            # the timed runs only: the warm-ups come first
            timed = {k: v[bench.args.warmup :] for k, v in phases.items()}
            return {k: round(statistics.median(v), 4) for k, v in timed.items()}

        bench.run("floor", name, nbytes, lambda fn=fn, ph=phases: fn(s, ph), med)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--partitions", type=int, default=64, help="input partitions (N)")
    p.add_argument("--partition-mb", type=float, default=16, help="MiB per input partition (B)")
    p.add_argument("--out", type=int, default=64, help="output partitions (M)")
    p.add_argument(
        "--sample-interval",
        type=float,
        default=0.25,
        help="seconds between memory and task-count samples",
    )
    args = parse_competitor_args(p, workloads=WORKLOADS, competitors=COMPETITORS)

    rows = max(1, int(args.partition_mb * 2**20) // BYTES_PER_ROW)
    sizes = Sizes(partitions=args.partitions, rows=rows, out=args.out, seed=args.seed)
    bench = Bench(args, sizes)
    work = {k: v for k, v in dask_workloads(sizes).items() if k in args.workloads}
    skip = set(args.skip)

    # One runtime at a time: Ray (both Ray schedulers), then distributed, then pandas.
    if not {"ray_oob_sched", "ray_dask_get"} <= skip:
        run_ray(bench, work, skip)
    if "distributed" not in skip:
        run_distributed(bench, work)
    if "floor" not in skip:
        run_floor(bench)
    bench.report()
    exit_if_failed(bench.failed)


if __name__ == "__main__":
    main()
