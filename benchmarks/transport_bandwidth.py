"""One-way bandwidth of the shuffle transports between two processes over loopback.

For each transport a server process echoes a tiny acknowledgement per message and a
client process times ``send(one frame of N bytes)`` + ``recv(ack)``; after a warm-up,
the median of the repetitions is reported. Prints one JSON line per measurement, then
one line per size with the ucx/tcp ratio.

    python benchmarks/transport_bandwidth.py --sizes 1MiB,16MiB,64MiB --repetitions 5

``--compare-mm-error-handling`` adds a UCX run with ``UCX_MM_ERROR_HANDLING=n`` (UCX's
default), which shows why ``shuffle._transport.ucx`` sets it to ``y``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import secrets
import statistics
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

_UNITS = {"b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}
TIMEOUT = 120.0


def parse_size(text: str) -> int:
    lowered = text.strip().lower()
    for unit in ("gib", "mib", "kib", "b"):
        if lowered.endswith(unit):
            return int(float(lowered[: -len(unit)]) * _UNITS[unit])
    return int(lowered)


def _config(secret: bytes) -> Any:
    from shuffle._transport import FrameLimits, TransportConfig

    return TransportConfig(secret=secret, limits=FrameLimits(max_frame_bytes=1 << 34))


async def ack_each_message(ep: Any) -> None:
    """The receiving side: answer every message with an empty one until the peer ends."""
    from shuffle._transport import EndOfStream

    try:
        while True:
            await ep.recv()
            await ep.send([b""])
    except EndOfStream:
        return


def _set_env(env: dict[str, str]) -> None:
    os.environ.update(env)
    os.environ.setdefault("UCX_NET_DEVICES", "lo")  # a loopback benchmark: no other NIC


def serve(name: str, secret: bytes, env: dict[str, str], conn: Connection) -> None:
    _set_env(env)

    async def main() -> None:
        from shuffle._transport import Endpoint, get_transport

        done = asyncio.Event()

        async def serve_one(ep: Endpoint) -> None:
            await ack_each_message(ep)
            done.set()

        async with get_transport(name, config=_config(secret)) as transport:  # type: ignore[arg-type]
            listener = await transport.listen("127.0.0.1", 0, serve_one)
            conn.send(listener.address)
            await asyncio.wait_for(done.wait(), TIMEOUT)

    asyncio.run(main())


def measure(
    name: str,
    secret: bytes,
    env: dict[str, str],
    address: str,
    sizes: list[int],
    reps: int,
    conn: Connection,
) -> None:
    _set_env(env)

    async def main() -> None:
        from shuffle._transport import get_transport

        async with get_transport(name, config=_config(secret)) as transport:  # type: ignore[arg-type]
            ep = await asyncio.wait_for(transport.connect(address), TIMEOUT)
            for nbytes in sizes:
                frame = bytearray(os.urandom(1 << 16)) * (nbytes >> 16) + bytearray(nbytes & 0xFFFF)
                times = []
                for i in range(reps + 1):  # the first one warms up
                    start = time.perf_counter()
                    await asyncio.wait_for(ep.send([frame]), TIMEOUT)
                    await asyncio.wait_for(ep.recv(), TIMEOUT)
                    if i:
                        times.append(time.perf_counter() - start)
                conn.send((nbytes, times))
            await ep.close()

    asyncio.run(main())
    conn.send(None)


def run_variant(
    name: str, variant: str, env: dict[str, str], sizes: list[int], reps: int
) -> dict[int, float]:
    ctx = mp.get_context("spawn")
    secret = secrets.token_bytes(32)
    server_conn, server_child = ctx.Pipe()
    server = ctx.Process(target=serve, args=(name, secret, env, server_child), daemon=True)
    server.start()
    if not server_conn.poll(TIMEOUT):
        raise RuntimeError(f"{name} server did not start")
    address = server_conn.recv()
    client_conn, client_child = ctx.Pipe()
    client = ctx.Process(
        target=measure, args=(name, secret, env, address, sizes, reps, client_child), daemon=True
    )
    client.start()
    medians: dict[int, float] = {}
    while client_conn.poll(TIMEOUT * reps):
        item = client_conn.recv()
        if item is None:
            break
        nbytes, times = item
        median = statistics.median(times)
        medians[nbytes] = nbytes / median / 1e9
        record = {
            "benchmark": "transport_bandwidth",
            "transport": name,
            "variant": variant,
            "nbytes": nbytes,
            "repetitions": reps,
            "median_s": round(median, 6),
            "min_s": round(min(times), 6),
            "GB/s": round(medians[nbytes], 3),
        }
        print(json.dumps(record), flush=True)
    for process in (client, server):
        process.join(TIMEOUT)
        if process.exitcode != 0:
            raise RuntimeError(f"{name} {process.name} exited with {process.exitcode}")
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", default="1MiB,16MiB,64MiB", help="comma-separated, e.g. 64KiB,1MiB"
    )
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--transports", default="tcp,ucx")
    parser.add_argument("--compare-mm-error-handling", action="store_true")
    args = parser.parse_args()
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    names = args.transports.split(",")

    from shuffle._transport import ucx

    results: dict[str, dict[int, float]] = {}
    for name in names:
        if name == "ucx" and not ucx.is_available():
            print(json.dumps({"transport": "ucx", "skipped": "ucxx cannot be imported"}))
            continue
        results[name] = run_variant(name, "default", {}, sizes, args.repetitions)
        if name == "ucx" and args.compare_mm_error_handling:
            env = {"UCX_MM_ERROR_HANDLING": "n"}
            results["ucx-mm-n"] = run_variant(
                name, "UCX_MM_ERROR_HANDLING=n", env, sizes, args.repetitions
            )
    for other in ("ucx", "ucx-mm-n"):
        if other in results and "tcp" in results:
            for nbytes in sizes:
                ratio = results[other][nbytes] / results["tcp"][nbytes]
                print(
                    json.dumps(
                        {"ratio": f"{other}/tcp", "nbytes": nbytes, "value": round(ratio, 2)}
                    )
                )


if __name__ == "__main__":
    main()
