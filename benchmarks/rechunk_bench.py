"""Rechunk benchmark: ray_oob_sched's p2p rechunk vs ray_dask_get, distributed P2P, threads.

One process run. Workloads:

- ``rows_to_cols``: an N x N float64 array in C row blocks ``(N/C, N)`` rechunked to C
  column blocks ``(N, N/C)``: every input chunk sends a piece to every output chunk;
- ``time_to_space``: a climate-style ``(time, level, lat, lon)`` float32 array, one
  time step per chunk, rechunked to full time series of small ``(lat, lon)`` tiles.

Inputs are made inside tasks by a generator per chunk (seeded by the chunk's block
index), so no data is shipped from the driver. Each output chunk is reduced to two
numbers (its sum and a position-weighted checksum, so a misplaced piece is caught), so
the result pulled to the driver is tiny but the whole rechunk must run. Competitors:

- ``ray_oob_sched``: ``ray_oob_sched.get``, rechunk method "p2p" (out-of-band shuffle
  actors); reports ``ray_oob_sched.last_stats()``;
- ``ray_dask_get``: Ray's Dask-on-Ray, rechunk method "tasks";
- ``distributed``: ``LocalCluster(n_workers=2, threads_per_worker=1, processes=True)``,
  rechunk method "p2p" (started after Ray is shut down);
- ``threads``: dask's threaded scheduler in this process, rechunk method "tasks".

Prints one JSON line per measurement (median of --repeat runs, after --warmup runs),
then one JSON line of ratios per workload. Every competitor's summaries are checked
against the values computed in the driver from the same generator, chunk by chunk,
and against each other.

    python benchmarks/rechunk_bench.py --size 8192 --chunks 8 \\
        --climate 512 4 180 360 --space-chunks 18 36 --repeat 5
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import dask
import dask.array as da
import numpy as np

# Driver-side measuring helpers, shared with the shuffle benchmark (same folder).
from shuffle_bench import (
    _reset_peak_rss,
    _rss_mb,
    distributed_client,
    driver_rss,
    embedded_ray,
    exit_if_failed,
    graph_len,
    last_stats,
    parse_competitor_args,
    report_failure,
    report_speedups,
)
from timing import measure

COMPETITORS = ("ray_oob_sched", "ray_dask_get", "distributed", "threads")
WORKLOADS = ("rows_to_cols", "time_to_space")
#: Per-axis checksum weights are ``1 + (i * PRIME[axis]) % 7`` at global index ``i``.
PRIMES = (3, 5, 11, 13, 17, 19, 23, 29)

Chunks = tuple[tuple[int, ...], ...]


# -- data --------------------------------------------------------------------


def gen_block(seed: int, dtype: str, block_info: dict[Any, Any] | None = None) -> np.ndarray:
    """Input chunk at ``block_info``'s location: deterministic in (seed, block index)."""
    assert block_info is not None
    info = block_info[None]
    return _gen(seed, tuple(info["chunk-location"]), tuple(info["chunk-shape"]), np.dtype(dtype))


def _gen(seed: int, index: tuple[int, ...], shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    return np.random.default_rng([seed, *index]).random(shape, dtype=dtype)


def _weights(axis: int, start: int, stop: int) -> np.ndarray:
    return 1.0 + (np.arange(start, stop, dtype=np.int64) * PRIMES[axis]) % 7


def chunk_summary(x: np.ndarray, block_info: dict[Any, Any] | None = None) -> np.ndarray:
    """``[sum, checksum]`` of one output chunk, shaped ``(1,) * ndim + (2,)``.

    The checksum weighs every element by a product of per-axis weights of its global
    position, so it changes when a piece lands in the wrong place.
    """
    assert block_info is not None
    location = block_info[0]["array-location"]
    v: Any = x
    for axis in reversed(range(x.ndim)):  # contract the last axis with its weights
        w = _weights(axis, *location[axis])
        v = v @ w.astype(v.dtype) if axis == x.ndim - 1 else np.asarray(v, np.float64) @ w
    out = np.array([x.sum(dtype=np.float64), float(v)])
    return out.reshape((1,) * x.ndim + (2,))


@dataclass(frozen=True)
class Workload:
    name: str
    shape: tuple[int, ...]
    dtype: str
    old: tuple[int, ...]  # chunk shape of the input
    new: tuple[int, ...]  # chunk shape of the output
    seed: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize

    def chunks(self, chunk_shape: Sequence[int]) -> Chunks:
        return da.core.normalize_chunks(tuple(chunk_shape), self.shape, dtype=self.dtype)

    def source(self) -> da.Array:
        return da.map_blocks(
            gen_block,
            self.seed,
            self.dtype,
            chunks=self.chunks(self.old),
            dtype=self.dtype,
            meta=np.empty((0,) * len(self.shape), self.dtype),
            name=f"gen-{self.name}-{self.seed}",
        )

    def summaries(self, method: str) -> da.Array:
        """Per output chunk ``[sum, checksum]``: shape ``numblocks + (2,)``."""
        y = self.source().rechunk(self.new, method=method)
        return y.map_blocks(
            chunk_summary,
            dtype=np.float64,
            chunks=(*((1,) * len(c) for c in y.chunks), (2,)),
            new_axis=y.ndim,
            meta=np.empty((0,) * (y.ndim + 1), np.float64),
        )

    def expected(self) -> np.ndarray:
        """The summaries computed here, one input chunk at a time (little memory)."""
        old, new = self.chunks(self.old), self.chunks(self.new)
        new_bounds = [[0, *itertools.accumulate(c)] for c in new]
        out = np.zeros((*(len(c) for c in new), 2))
        dtype = np.dtype(self.dtype)
        for index in itertools.product(*(range(len(c)) for c in old)):
            shape = tuple(c[i] for c, i in zip(old, index, strict=True))
            start = tuple(sum(c[:i]) for c, i in zip(old, index, strict=True))
            x = _gen(self.seed, index, shape, dtype).astype(np.float64)
            w = np.ones(shape)
            for axis, (s, n) in enumerate(zip(start, shape, strict=True)):
                along = [-1 if a == axis else 1 for a in range(len(shape))]
                w = w * _weights(axis, s, s + n).reshape(along)
            sums, checks = x, x * w
            target = []
            for axis, (s, n) in enumerate(zip(start, shape, strict=True)):
                b = new_bounds[axis]
                first = bisect.bisect_right(b, s) - 1  # output chunk holding s
                cuts = [0] + [e - s for e in b if s < e < s + n]
                sums = np.add.reduceat(sums, cuts, axis=axis)
                checks = np.add.reduceat(checks, cuts, axis=axis)
                target.append(slice(first, first + len(cuts)))
            out[(*target, 0)] += sums
            out[(*target, 1)] += checks
        return out

    def describe(self) -> dict[str, Any]:
        old, new = self.chunks(self.old), self.chunks(self.new)
        return {
            "shape": list(self.shape),
            "dtype": self.dtype,
            "old_chunk": list(self.old),
            "new_chunk": list(self.new),
            "input_chunks": math.prod(map(len, old)),
            "output_chunks": math.prod(map(len, new)),
        }


def workloads(args: argparse.Namespace) -> dict[str, Workload]:
    n, c = args.size, args.chunks
    t, lev, lat, lon = args.climate
    block = -(-n // c)  # c blocks (the last may be smaller)
    return {
        "rows_to_cols": Workload(
            "rows_to_cols", (n, n), "float64", (block, n), (n, block), args.seed
        ),
        "time_to_space": Workload(
            "time_to_space",
            (t, lev, lat, lon),
            "float32",
            (args.time_chunk, lev, lat, lon),
            (t, lev, *args.space_chunks),
            args.seed + 1,
        ),
    }


# -- measuring -----------------------------------------------------------------


def p2p_shape(coll: Any) -> dict[str, int]:
    """p2p barriers (one per rechunk stage dask planned) and transfer tasks in ``coll``.

    dask merges input chunks into transfers of up to ``array.chunk-size`` bytes
    ("prechunking"), so there may be fewer transfers than input chunks.
    """
    try:
        from distributed.shuffle._core import P2PBarrierTask
    except ImportError:
        return {}
    barriers = [v for v in dict(coll.__dask_graph__()).values() if isinstance(v, P2PBarrierTask)]
    transfers = sum(len(b.dependencies) for b in barriers)
    return {"p2p_stages": len(barriers), "p2p_transfers": transfers}


class Bench:
    def __init__(self, args: argparse.Namespace, work: dict[str, Workload]) -> None:
        self.args = args
        self.work = work
        self.expected = {name: w.expected() for name, w in work.items()}
        self.medians: dict[str, dict[str, float]] = {w: {} for w in work}
        self.results: dict[str, dict[str, np.ndarray]] = {w: {} for w in work}
        self.failed: list[str] = []

    def run(
        self,
        competitor: str,
        workload: str,
        fn: Callable[[], np.ndarray],
        extra: Callable[[], dict[str, Any]] = dict,
    ) -> None:
        a, w = self.args, self.work[workload]
        try:
            exact = _reset_peak_rss()
            rss0 = _rss_mb("VmRSS")
            t, res, times = measure(fn, repeat=a.repeat, warmup=a.warmup)
            rss = _rss_mb()
            info = extra()
        except Exception as e:  # noqa: BLE001 -- report, go on with the others
            report_failure(self.failed, competitor=competitor, workload=workload, error=e)
            return
        self.medians[workload][competitor] = t
        self.results[workload][competitor] = np.asarray(res)
        print(
            json.dumps(
                {
                    "workload": workload,
                    "competitor": competitor,
                    "median_s": round(t, 4),
                    "gb_per_s": round(w.nbytes / t / 1e9, 3),
                    "input_bytes": w.nbytes,
                    "dask_chunk_size": dask.config.get("array.chunk-size"),
                    **w.describe(),
                    **info,
                    **driver_rss(exact=exact, start=rss0, peak=rss),
                    "repeat": a.repeat,
                    "times_s": [round(x, 4) for x in times],
                }
            ),
            flush=True,
        )

    def report(self) -> None:
        for workload in self.work:
            self._check(workload)
            report_speedups(workload, self.medians[workload])

    def _check(self, workload: str) -> None:
        """Every competitor against the driver's values, and against each other."""
        results = self.results[workload]
        if not results:
            return
        expected = self.expected[workload]
        # Sums of O(1) values in another order: float32 data is contracted in float32
        # once per output row (see chunk_summary), float64 data exactly.
        rtol = 1e-5 if np.dtype(self.work[workload].dtype).itemsize < 8 else 1e-9
        names = list(results)
        bad = []
        for name in names:
            got = results[name]
            ok = got.shape == expected.shape and np.allclose(got, expected, rtol=rtol, atol=0)
            same = got.shape == results[names[0]].shape and np.allclose(
                got, results[names[0]], rtol=rtol, atol=0
            )
            if not (ok and same):
                bad.append(name)
                self.failed.append(f"check {workload}: {name}")
                print(
                    json.dumps(
                        {
                            "workload": workload,
                            "check": "MISMATCH",
                            "competitor": name,
                            "shape": list(got.shape),
                            "expected_shape": list(expected.shape),
                            "max_rel_error": _max_rel_error(got, expected),
                        }
                    ),
                    flush=True,
                )
        if not bad:
            print(
                json.dumps(
                    {
                        "workload": workload,
                        "check": "same",
                        "competitors": names,
                        "against": "driver-side values from the same generator",
                        "total_sum": float(expected[..., 0].sum()),
                        "total_checksum": float(expected[..., 1].sum()),
                    }
                ),
                flush=True,
            )


def _max_rel_error(got: np.ndarray, expected: np.ndarray) -> float | None:
    if got.shape != expected.shape:
        return None
    return float(np.max(np.abs(got - expected) / np.maximum(np.abs(expected), 1e-300)))


# -- competitors ---------------------------------------------------------------


def run_each(
    bench: Bench,
    *,
    competitor: str,
    method: str,
    compute: Callable[[Any], np.ndarray],
    extra: Callable[[dict[str, Any]], dict[str, Any]] = dict,
) -> None:
    """``competitor``: every workload's rechunk by ``method``, run by ``compute``; its
    lines report the graph's size (and shape, for p2p) and what ``extra`` adds to them."""
    for name, w in bench.work.items():
        coll = w.summaries(method)
        info = {"method": method, "dask_tasks": graph_len(coll)}
        if method == "p2p":
            info |= p2p_shape(coll)
        bench.run(competitor, name, lambda coll=coll: compute(coll), lambda info=info: extra(info))


def run_ray(bench: Bench, skip: set[str]) -> None:
    with embedded_ray(num_cpus=bench.args.num_cpus, store_mb=bench.args.store_mb):
        import ray_oob_sched

        if "ray_oob_sched" not in skip:
            run_each(
                bench,
                competitor="ray_oob_sched",
                method="p2p",
                compute=lambda coll: coll.compute(scheduler=ray_oob_sched.get),
                extra=lambda info: info | last_stats(),
            )
        if "ray_dask_get" not in skip:
            from ray.util.dask import ray_dask_get

            run_each(
                bench,
                competitor="ray_dask_get",
                method="tasks",
                compute=lambda coll: coll.compute(scheduler=ray_dask_get),
                extra=lambda info: info | {"ray_tasks": info["dask_tasks"]},
            )


def run_distributed(bench: Bench) -> None:
    with distributed_client() as client:
        run_each(
            bench,
            competitor="distributed",
            method="p2p",
            compute=lambda coll: coll.compute(scheduler=client.get),
        )


def run_threads(bench: Bench) -> None:
    n = bench.args.num_cpus
    run_each(
        bench,
        competitor="threads",
        method="tasks",
        compute=lambda coll: coll.compute(scheduler="threads", num_workers=n),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=8192, help="rows_to_cols: N of the N x N array")
    p.add_argument("--chunks", type=int, default=8, help="rows_to_cols: row blocks = column blocks")
    p.add_argument(
        "--climate",
        type=int,
        nargs=4,
        default=[512, 4, 180, 360],
        metavar=("T", "L", "Y", "X"),
        help="time_to_space: shape (time, level, lat, lon)",
    )
    p.add_argument(
        "--time-chunk", type=int, default=1, help="time_to_space: time steps per input chunk"
    )
    p.add_argument(
        "--space-chunks",
        type=int,
        nargs=2,
        default=[18, 36],
        metavar=("Y", "X"),
        help="time_to_space: (lat, lon) of an output chunk (full time and levels)",
    )
    p.add_argument(
        "--dask-chunk-size",
        default=None,
        help="dask's array.chunk-size (e.g. 128MiB): bounds the transfers of a p2p rechunk "
        "and the intermediate chunks of a tasks rechunk (default: dask's)",
    )
    args = parse_competitor_args(p, workloads=WORKLOADS, competitors=COMPETITORS)
    if min(args.size, args.chunks, *args.climate, args.time_chunk, *args.space_chunks) < 1:
        p.error("sizes and chunk counts must be at least 1")

    if args.dask_chunk_size is not None:
        dask.config.set({"array.chunk-size": args.dask_chunk_size})  # before graphs are built
    work = {k: v for k, v in workloads(args).items() if k in args.workloads}
    bench = Bench(args, work)
    skip = set(args.skip)

    # One runtime at a time: Ray (both Ray schedulers), then distributed, then threads.
    if not {"ray_oob_sched", "ray_dask_get"} <= skip:
        run_ray(bench, skip)
    if "distributed" not in skip:
        run_distributed(bench)
    if "threads" not in skip:
        run_threads(bench)
    bench.report()
    exit_if_failed(bench.failed)


if __name__ == "__main__":
    main()
