"""An array workload on Ray: a climate cube from daily maps to per-pixel time series.

A (time, lat, lon) temperature cube of ``--size`` days on a 1-degree grid is made in
chunks of a few whole daily maps (contiguous in time, how a model writes its
output). Per-pixel statistics need every day of a pixel in one chunk, so the cube is
rechunked to small lat/lon tiles holding every day (contiguous in space), through
the out-of-band shuffle actors; then each pixel's mean and 90th percentile are
computed, written to Zarr and read back. The result is checked against numpy on the
same cube; the script exits non-zero if it is wrong.

    python examples/climate_rechunk.py [--size 3650] [--out DIR]

Uses the Ray named by RAY_ADDRESS, or starts an embedded local one. On a cluster,
``--out`` must be a directory every node can write (shared storage).
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np

import ray_oob_sched

LAT, LON = 180, 360  # 1-degree grid


def temperature(t: np.ndarray, lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """Deterministic "temperature" at broadcastable (day, lat index, lon index)."""
    phi = np.deg2rad(lat - 89.5)
    season = np.sin(2 * np.pi * t / 365.25) * np.sin(phi)
    weather = np.sin(0.37 * t + 0.11 * lon) * np.cos(0.23 * t - 0.07 * lat)
    celsius: np.ndarray = (28 * np.cos(phi) - 10 + 12 * season + 3 * weather).astype("float32")
    return celsius


def block(block_info: dict[Any, Any] | None = None) -> np.ndarray:
    """One chunk of the cube, from its location (``map_blocks`` passes it)."""
    assert block_info is not None
    (t0, t1), (y0, y1), (x0, x1) = block_info[None]["array-location"]
    t, y, x = np.ogrid[t0:t1, y0:y1, x0:x1]
    return temperature(t, y, x)


def pixel_stats(tile: np.ndarray) -> np.ndarray:
    """Mean and 90th percentile of every pixel of a tile holding all its days."""
    return np.stack([tile.mean(axis=0), np.percentile(tile, 90, axis=0)]).astype("float32")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=3650, help="days in the cube")
    p.add_argument("--days-per-chunk", type=int, default=8, help="input chunks: whole maps")
    p.add_argument("--tile", type=int, default=30, help="output chunks: tile x tile pixels")
    p.add_argument("--out", help="directory for the Zarr store (default: a temporary one)")
    args = p.parse_args(argv)

    days = args.size
    maps = da.map_blocks(
        block,
        dtype="float32",
        chunks=(da.core.normalize_chunks((args.days_per_chunk, LAT, LON), (days, LAT, LON))),
    )
    with (
        contextlib.nullcontext(args.out)
        if args.out
        else tempfile.TemporaryDirectory(prefix="climate-", ignore_cleanup_errors=True)
    ) as out:
        store = str(Path(out) / "pixel_stats.zarr")
        start = time.perf_counter()
        with ray_oob_sched.enable():
            # p2p: through the shuffle actors (as plain tasks if the plan is small)
            series = maps.rechunk((days, args.tile, args.tile))
            stats = series.map_blocks(
                pixel_stats, chunks=((2,), *series.chunks[1:]), dtype="float32"
            )
            stats.to_zarr(store)
            rechunk_stats = ray_oob_sched.last_stats()
            back = da.from_zarr(store).compute()
        elapsed = time.perf_counter() - start
        assert rechunk_stats is not None

        t, y, x = np.ogrid[0:days, 0:LAT, 0:LON]
        expected = pixel_stats(temperature(t, y, x))
        print(
            f"cube of {days} days x {LAT} x {LON} ({maps.nbytes / 2**20:,.1f} MiB, "
            f"{maps.npartitions} chunks of {args.days_per_chunk} maps -> "
            f"{series.npartitions} tiles of {args.tile} x {args.tile} pixels): "
            f"{elapsed:.2f} s, ~{maps.nbytes / 2**20:,.1f} MiB rechunked through "
            f"{rechunk_stats.shuffles} out-of-band rechunk(s), stats in Zarr at {store}",
            flush=True,
        )
        ok = back.shape == expected.shape and np.allclose(back, expected, rtol=1e-5, atol=1e-4)
        print(f"  per-pixel mean and p90, Zarr round trip      {'correct' if ok else 'WRONG'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
