"""A CuPy rechunk through shuffle runs wired in memory, against the same NumPy rechunk.

Two participants' ``ShuffleManager``s exchange messages in one process (the wiring of
``tests/shuffle/support.Network``: device frames copied on the device, host frames on
the host, no transport), so this times the run machinery itself: splitting input chunks
into pieces, encoding, storing, and assembling output chunks. The array is float32,
``--rows`` x ``--cols``, in ``--chunks`` row blocks rechunked to as many column blocks
(every input chunk sends a piece to every output chunk). Nothing spills
(``memory_limit=None``). Every output chunk is compared with the matching slice of the
input after the timed runs. Prints one JSON line per measurement and a table last.

    python benchmarks/device_rechunk.py --rows 16384 --cols 32768 --chunks 8 --repeat 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


async def rechunk_once(xp: Any, a: Any, chunks: int) -> tuple[float, list[Any]]:
    from shuffle._ids import RunId, ShuffleId
    from shuffle._options import RunOptions
    from shuffle._rechunk import RechunkLayout
    from shuffle._spec import ShuffleRunSpec
    from shuffle.device._cuda import registry_for
    from shuffle.wire._memory import HOST_REGISTRY
    from tests.shuffle.support import Network, copy_host_frames

    rows, cols = a.shape
    old = (tuple([rows // chunks] * chunks), (cols,))
    new = ((rows,), tuple([cols // chunks] * chunks))
    layout = RechunkLayout(old, new)
    device = xp.__name__ == "cupy"
    if device:
        from tests.shuffle.test_gpu_runs import copy_device_frames

        wire = Network(
            ["a", "b"],
            options=RunOptions(memory_limit=None),
            registry=registry_for("cuda"),
            copy=copy_device_frames,
        )
    else:
        wire = Network(
            ["a", "b"],
            options=RunOptions(memory_limit=None),
            registry=HOST_REGISTRY,
            copy=copy_host_frames,
        )
    spec = ShuffleRunSpec(
        shuffle_id=ShuffleId("bench"),
        run_id=RunId(1),
        npartitions_out=layout.npartitions_out,
        participants=tuple(wire.managers),
    )
    if device:
        xp.cuda.runtime.deviceSynchronize()
    start = time.perf_counter()
    runs = {n: await m.get_or_create(spec, layout) for n, m in wire.managers.items()}
    step = rows // chunks
    for i in range(chunks):
        await wire.send_input("ab"[i % 2], a[i * step : (i + 1) * step], i, spec=spec, meta=layout)
    for run in runs.values():
        run.inputs_done()
    outs = [runs[spec.owner_of(p)].get_output_partition(p) for p in range(chunks)]
    if device:
        xp.cuda.runtime.deviceSynchronize()
    elapsed = time.perf_counter() - start
    await wire.close()
    return elapsed, outs


def bench(xp: Any, rows: int, cols: int, chunks: int, repeat: int) -> float:
    import numpy as np

    a = xp.asarray(np.random.default_rng(0).standard_normal((rows, cols), dtype="f4"))
    times = []
    for i in range(repeat + 1):  # the first run warms up (imports, CUDA kernels)
        elapsed, outs = asyncio.run(rechunk_once(xp, a, chunks))
        if i:
            times.append(elapsed)
        step = cols // chunks
        for p, out in enumerate(outs):
            assert type(out) is type(a), f"output {p} is a {type(out)}, not a {type(a)}"
            assert bool((out == a[:, p * step : (p + 1) * step]).all()), f"output {p} differs"
        del outs
    median = statistics.median(times)
    print(
        json.dumps(
            {
                "benchmark": "device_rechunk",
                "module": xp.__name__,
                "shape": [rows, cols],
                "chunks": chunks,
                "GiB": a.nbytes / 2**30,
                "median_s": round(median, 4),
                "min_s": round(min(times), 4),
                "GB/s": round(a.nbytes / median / 1e9, 3),
            }
        ),
        flush=True,
    )
    return median


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=16384)
    parser.add_argument("--cols", type=int, default=32768)
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--host-only", action="store_true", help="the NumPy rechunk only")
    args = parser.parse_args()
    import numpy

    modules: list[Any] = [numpy]
    if not args.host_only:
        from shuffle.device._cuda import gpu_status

        status = gpu_status()
        if not status.usable:
            print(
                f"device_rechunk: no usable GPU here ({status.reason}); "
                "use --host-only for the NumPy rechunk alone"
            )
            return 2
        import cupy

        modules.insert(0, cupy)
    results = {
        m.__name__: bench(m, args.rows, args.cols, args.chunks, args.repeat) for m in modules
    }
    gib = args.rows * args.cols * 4 / 2**30
    print(
        f"rechunk {args.rows}x{args.cols} float32 ({gib:g} GiB), "
        f"{args.chunks} row blocks -> {args.chunks} column blocks"
    )
    for name, median in results.items():
        print(f"  {name:>6}: {median:8.3f} s median")
    return 0


if __name__ == "__main__":
    sys.exit(main())
