"""A GPU shuffle end to end: cuDF and CuPy partitions through the shuffle actors.

Needs a CUDA GPU with CuPy, cuDF and dask_cudf installed (plus ucxx-cu12, which the
project's setup installs); exits with a message saying what is missing otherwise.
Not part of CI. Steps, each checked against dask's threaded scheduler:

1. device-to-device self-check: one CuPy array and one cuDF frame are encoded
   (``shuffle.wire._ndarray``, ``shuffle.device._cudf``) and sent over the UCX
   transport between two endpoints of this process into RMM buffers, then decoded and compared;
2. a dask_cudf ``shuffle(on="key")`` through ``ray_oob_sched.enable()`` (p2p, so the
   pieces go through the shuffle actors out of band);
3. a CuPy-backed ``rechunk`` from row chunks to column chunks with ``method="p2p"``.

Steps 2 and 3 send device pieces out of band (see docs/gpu.md, "Status"); a refusal
is reported as such, never hidden.

    python examples/gpu_shuffle.py [--rows 2000000] [--size 4096] [--gpus-per-task 0.25]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time

import numpy as np
import pandas as pd


def require_gpu() -> None:
    """Exit with a clear message unless CuPy sees a GPU and cuDF/dask_cudf import."""
    try:
        import cupy

        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # noqa: BLE001 -- not installed, no driver, no device
        sys.exit(f"gpu_shuffle.py needs a CUDA GPU and CuPy: {type(e).__name__}: {e}")
    if count < 1:
        sys.exit("gpu_shuffle.py needs a CUDA GPU: CuPy sees none")
    missing = []
    for name in ("cudf", "dask_cudf", "rmm"):
        try:
            __import__(name)
        except Exception as e:  # noqa: BLE001
            missing.append(f"{name} ({type(e).__name__}: {e})")
    if missing:
        sys.exit(f"gpu_shuffle.py needs {', '.join(missing)}")


def report(step: str, ok: bool, detail: str = "") -> None:
    print(f"{step:<48} {'correct' if ok else 'WRONG'} {detail}", flush=True)
    if not ok:
        raise SystemExit(f"{step}: wrong result")


async def self_check() -> None:
    """Step 1: device frames over UCX between two endpoints, into RMM buffers."""
    import cudf
    import cupy

    from shuffle._transport import TransportConfig, get_transport
    from shuffle.device._allocator import transport_allocator
    from shuffle.device._cuda import cuda_registry
    from shuffle.device._cudf import decode_cudf, encode_cudf
    from shuffle.wire._ndarray import decode_piece, encode_piece

    registry = cuda_registry()
    config = TransportConfig(
        secret=os.urandom(32), allocator=transport_allocator(registry, where="self-check")
    )
    arr = cupy.random.default_rng(0).random((4096, 4096))
    df = cudf.DataFrame({"key": cupy.arange(100_000) % 97, "s": ["x", "yy"] * 50_000})
    piece = encode_piece(arr)
    df_meta, df_buffer = encode_cudf(df)
    frames = [registry.hooks("cuda").wrap(b) for b in (piece.data, df_buffer)]
    transport = get_transport("ucx", config=config)
    received: asyncio.Queue[list[object]] = asyncio.Queue()

    async def handler(ep: object) -> None:
        await received.put(await ep.recv())  # type: ignore[attr-defined]

    try:
        listener = await transport.listen("127.0.0.1", 0, handler)
        client = await transport.connect(listener.address)
        start = time.perf_counter()
        await client.send(frames)
        got = await asyncio.wait_for(received.get(), 60)
        seconds = time.perf_counter() - start
        await client.close()
    finally:
        await transport.close()
    out_arr, out_df = decode_piece(piece.meta, got[0]), decode_cudf(df_meta, got[1])
    nbytes = sum(registry.hooks("cuda").nbytes(f) for f in frames)
    report(
        "1. UCX device-to-device (CuPy + cuDF)",
        bool(cupy.array_equal(out_arr, arr)) and out_df.equals(df),
        f"{nbytes / 2**20:.0f} MiB in {seconds:.3f} s, received into "
        f"{sorted({type(f).__name__ for f in got})}",
    )


def dataframe_shuffle(rows: int, gpus: float) -> None:
    """Step 2: a dask_cudf shuffle through the shuffle actors."""
    import dask
    import dask.dataframe as dd
    import dask_cudf  # noqa: F401 -- registers the cudf backend

    import ray_oob_sched

    rng = np.random.default_rng(0)
    pdf = pd.DataFrame({"key": rng.integers(0, 10_000, rows), "x": rng.random(rows)})
    ddf = dd.from_pandas(pdf, npartitions=16).to_backend("cudf")
    with ray_oob_sched.enable():
        shuffled = ddf.shuffle(on="key", npartitions=8)
        parts = dask.compute(*shuffled.to_delayed(), ray_remote_args={"num_gpus": gpus})
    stats = ray_oob_sched.last_stats()
    keys = [set(p["key"].to_pandas()) for p in parts]
    disjoint = sum(map(len, keys)) == len(set().union(*keys))
    got = pd.concat([p.to_pandas() for p in parts]).sort_values(["key", "x"])
    want = pdf.sort_values(["key", "x"])
    same = np.array_equal(got.to_numpy(), want.to_numpy())
    report(
        "2. dask_cudf shuffle(on='key') via the actors",
        disjoint and same and stats is not None and stats.shuffles == 1,
        f"{rows} rows, {stats.shuffles if stats else '?'} out-of-band shuffle(s)",
    )


def cupy_rechunk(size: int, gpus: float) -> None:
    """Step 3: a CuPy-backed rechunk, rows to columns, with the p2p method."""
    import cupy
    import dask.array as da

    import ray_oob_sched

    x = da.random.default_rng(1).random((size, size), chunks=(size // 16, size))
    xg = x.map_blocks(cupy.asarray, dtype=x.dtype)
    with ray_oob_sched.enable():
        got = xg.rechunk((size, size // 16), method="p2p").compute(
            ray_remote_args={"num_gpus": gpus}
        )
    want = x.compute(scheduler="threads")
    report(
        "3. CuPy rechunk rows -> columns (p2p)",
        isinstance(got, cupy.ndarray) and np.array_equal(cupy.asnumpy(got), want),
        f"{size}x{size} float64",
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=2_000_000)
    p.add_argument("--size", type=int, default=4096)
    p.add_argument(
        "--gpus-per-task",
        type=float,
        default=0.25,
        help="num_gpus of every Ray task (a share, so tasks fit beside the shuffle actor)",
    )
    args = p.parse_args()
    require_gpu()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    logging.getLogger("ray").setLevel(logging.WARNING)
    import ray_oob_sched

    asyncio.run(self_check())
    try:
        for step in (dataframe_shuffle, cupy_rechunk):
            try:
                step(args.rows if step is dataframe_shuffle else args.size, args.gpus_per_task)
            except (TypeError, NotImplementedError, ray_oob_sched.UnsupportedGraphError) as e:
                # The run layer may not take device partitions yet: say so, do not hide it.
                print(f"{step.__name__}: the shuffle refused device partitions: {e!r}")
                raise SystemExit(1) from e
    finally:
        ray_oob_sched.shutdown()


if __name__ == "__main__":
    main()
