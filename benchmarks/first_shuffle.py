"""The first shuffle of a session against the next ones, and where its extra time goes.

Each mode runs in a fresh driver (a subprocess) that starts Ray, runs one small
graph without a shuffle (so Ray's workers exist and have imported the scheduler),
then times:

- ``shuffle``: the first and second 16-partition dataframe shuffle (p2p);
- ``rechunk``: the first and second p2p rechunk through the shuffle actors
  (``shuffle.rechunk-tasks-max-pieces: 0``);
- ``phases``: the parts of the first one, each on its own: starting the shuffle
  actors (``ShuffleService.actors()``), and in a Ray worker that never sent: the
  imports of the sending side, ucxx's import, creating the client, the transport
  and UCX context (``get_transport`` + a listener-free ``_runtime``), and the first
  and second connect + handshake to an actor.

    .venv/bin/python benchmarks/first_shuffle.py --modes shuffle rechunk phases --repeat 3

Prints one JSON line per measurement. With ``--no-prestart`` the scheduler does not
start the actors and warm the workers' clients early (``shuffle.prestart: false``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _frame(npartitions: int, rows: int) -> Any:
    import dask.dataframe as dd
    import numpy as np
    import pandas as pd

    def part(i: int) -> pd.DataFrame:
        rng = np.random.default_rng(i)
        return pd.DataFrame({"k": rng.integers(0, 10_000, rows), "v": rng.random(rows)})

    return dd.from_map(part, list(range(npartitions)))


def _warm_graph() -> None:
    import dask.array as da

    da.ones((2000, 2000), chunks=(250, 2000)).sum().compute()


def run_mode(mode: str, *, num_cpus: int, prestart: bool) -> list[dict[str, Any]]:
    import dask
    import dask.array as da
    import ray

    sys.path.insert(0, str(ROOT))
    import ray_oob_sched

    ray.init(num_cpus=num_cpus, object_store_memory=1 << 30, include_dashboard=False)
    out: list[dict[str, Any]] = []
    cfg = {
        "ray-oob-sched.shuffle.rechunk-tasks-max-pieces": 0,
        # The phases are measured on their own, from a cold start.
        "ray-oob-sched.shuffle.prestart": prestart and mode != "phases",
    }
    try:
        with dask.config.set(cfg), ray_oob_sched.enable():
            t0 = time.perf_counter()
            _warm_graph()
            out.append({"mode": mode, "what": "graph without shuffle", "s": _since(t0)})
            if mode == "phases":
                out += _phases()
                return out
            for n in ("first", "second", "third"):
                t0 = time.perf_counter()
                if mode == "shuffle":
                    _frame(16, 50_000).shuffle("k").map_partitions(len).compute()
                else:
                    x = da.random.default_rng(0).random((2000, 2000), chunks=(125, 2000))
                    x.rechunk((2000, 125)).sum().compute()
                out.append({"mode": mode, "what": f"{n} {mode}", "s": _since(t0)})
    finally:
        ray_oob_sched.shutdown()
        ray.shutdown()
    return out


def _since(t0: float) -> float:
    return round(time.perf_counter() - t0, 3)


def _phases() -> list[dict[str, Any]]:
    import ray

    from shuffle.shell._service import ShuffleService

    t0 = time.perf_counter()
    service = ShuffleService()
    actors = service.actors()
    rows = [{"mode": "phases", "what": "actor start", "s": _since(t0)}]
    address = actors[0].address
    try:
        got = ray.get(_probe.remote(address, service._secret))
    finally:
        service.close()
    rows += [{"mode": "phases", "what": k, "s": round(v, 3)} for k, v in got.items()]
    return rows


def _probe_impl(address: str, secret: bytes) -> dict[str, float]:
    """In a worker that never sent: the cost of each step of its first send."""
    import asyncio

    times: dict[str, float] = {}
    t0 = time.perf_counter()
    import shuffle.shell._transfer  # noqa: F401

    times["worker imports (shuffle sender)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    from shuffle._transport import TransportConfig, get_transport

    if address.startswith("ucx"):
        from shuffle._transport.ucx import _import_ucxx

        _import_ucxx()
    times["worker imports (ucxx)"] = time.perf_counter() - t0
    from shuffle.shell._process import get_client

    t0 = time.perf_counter()
    client = get_client()
    times["client (loop thread)"] = time.perf_counter() - t0

    async def steps() -> None:
        t = time.perf_counter()
        transport = get_transport(
            address.partition("://")[0],
            config=TransportConfig(secret=secret),  # type: ignore[arg-type]
        )
        runtime = getattr(transport, "_runtime", None)
        if runtime is not None:
            await runtime()
        times["transport + UCX context"] = time.perf_counter() - t
        for n in ("first", "second"):
            t = time.perf_counter()
            ep = await transport.connect(address)
            times[f"{n} connect + handshake"] = time.perf_counter() - t
            await ep.close()
        await transport.close()

    asyncio.run_coroutine_threadsafe(steps(), client._loop).result(60)
    return times


def _remote_probe() -> Any:
    import ray

    return ray.remote(num_cpus=1)(_probe_impl)


_probe: Any = None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", nargs="*", default=["shuffle", "rechunk", "phases"])
    p.add_argument("--repeat", type=int, default=1, help="fresh drivers per mode")
    p.add_argument("--num-cpus", type=int, default=2)
    p.add_argument("--no-prestart", action="store_true")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        global _probe
        _probe = _remote_probe()
        for row in run_mode(args.child, num_cpus=args.num_cpus, prestart=not args.no_prestart):
            print(json.dumps(row), flush=True)
        return
    for _ in range(args.repeat):
        for mode in args.modes:
            cmd = [sys.executable, __file__, "--child", mode, "--num-cpus", str(args.num_cpus)]
            if args.no_prestart:
                cmd.append("--no-prestart")
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            for line in done.stdout.splitlines():
                if line.startswith("{"):
                    print(line, flush=True)
            if done.returncode:
                print(done.stderr[-3000:], file=sys.stderr)


if __name__ == "__main__":
    main()
