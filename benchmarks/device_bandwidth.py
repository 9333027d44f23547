"""Device frames over the UCX transport against host staging, two processes on one GPU.

A server process receives each message and acknowledges it with an empty frame; a
client process times ``send`` + ``recv(ack)`` per array size in two modes:

* ``device``: the CuPy array itself is the frame (``"cuda"`` memory type); the server
  receives it into a device buffer from ``transport_allocator`` (RMM if importable,
  else CuPy), so UCX copies device to device (``cuda_ipc`` on one node).
* ``staged``: ``cupy.asnumpy`` on the client, a host frame over UCX, ``cupy.asarray``
  on the server (synchronised before the ack): the path the design avoids.
* ``copies``: ``cupy.asarray(cupy.asnumpy(a))`` in the client alone, no transport:
  what the staging's two PCIe copies cost by themselves.

Arrays are random bytes; the first (untimed) message of each size and mode asks the
server for a checksum of what it received, so wrong bytes fail the run. Prints one
JSON line per measurement, the UCX protocols chosen for tagged messages (with
``UCX_PROTO_INFO=y`` and ``--ucx-log``) and a table last. ``--host-only`` runs the
staged harness with NumPy arrays and no GPU (a smoke test of the harness on CPU).

    UCX_PROTO_INFO=y python benchmarks/device_bandwidth.py --sizes 1MiB,16MiB,64MiB,256MiB \\
        --repetitions 7 --ucx-log /tmp/ucx.log
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import multiprocessing as mp
import os
import re
import secrets
import statistics
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.transport_bandwidth import parse_size

TIMEOUT = 120.0
VERIFY, TIMED = b"v", b"t"


def _checksum(xp: Any, buffer: Any) -> int:
    """Sum of the bytes of ``buffer`` (host or device memory)."""
    return int(xp.asarray(buffer).view("u1").sum(dtype="u8"))


def _redirect(log: str | None) -> None:
    # UCX prints its protocol tables on the process's own stdout/stderr descriptors.
    if log:
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)


def _config(secret: bytes, *, device: bool) -> Any:
    from shuffle._transport import Allocator, FrameLimits, TransportConfig, host_allocator

    allocator: Allocator = host_allocator
    if device:
        from shuffle.device._allocator import transport_allocator
        from shuffle.device._cuda import registry_for

        allocator = transport_allocator(registry_for("cuda"), where="benchmark server")
    limits = FrameLimits(max_frame_bytes=1 << 34)
    return TransportConfig(secret=secret, limits=limits, allocator=allocator)


def serve(secret: bytes, host_only: bool, log: str | None, conn: Connection) -> None:
    _redirect(log)

    async def run_server() -> None:
        from shuffle._transport import EndOfStream, Endpoint, get_transport

        xp: Any = importlib.import_module("numpy" if host_only else "cupy")
        done = asyncio.Event()

        async def handle(ep: Endpoint) -> None:
            try:
                while True:
                    control, payload = await ep.recv()
                    if not hasattr(payload, "__cuda_array_interface__"):
                        payload = xp.asarray(memoryview(payload).cast("B"))  # host -> device
                    if not host_only:
                        xp.cuda.runtime.deviceSynchronize()
                    reply = b""
                    if bytes(control) == VERIFY:
                        reply = str(_checksum(xp, payload)).encode()
                    await ep.send([reply])
            except EndOfStream:
                done.set()

        async with get_transport("ucx", config=_config(secret, device=not host_only)) as t:
            listener = await t.listen("127.0.0.1", 0, handle)
            conn.send(listener.address)
            await asyncio.wait_for(done.wait(), TIMEOUT * 10)

    asyncio.run(run_server())


def measure(
    secret: bytes,
    address: str,
    sizes: list[int],
    reps: int,
    host_only: bool,
    log: str | None,
    conn: Connection,
) -> None:
    _redirect(log)

    async def run_client() -> None:
        import numpy as np

        from shuffle._transport import get_transport

        xp: Any = np if host_only else importlib.import_module("cupy")
        modes = ["staged"] if host_only else ["device", "staged"]
        async with get_transport("ucx", config=_config(secret, device=False)) as t:
            ep = await asyncio.wait_for(t.connect(address), TIMEOUT)
            rng = np.random.default_rng(0)
            for nbytes in sizes:
                array = xp.asarray(rng.integers(0, 256, nbytes, dtype="u1"))
                expected = _checksum(xp, array)
                for mode in modes:
                    times = []
                    for i in range(reps + 1):  # the first one warms up and is checked
                        if not host_only:
                            xp.cuda.runtime.deviceSynchronize()
                        start = time.perf_counter()
                        if mode == "device":
                            frame = array
                        else:
                            frame = array.tobytes() if host_only else xp.asnumpy(array)
                        control = VERIFY if i == 0 else TIMED
                        await asyncio.wait_for(ep.send([control, frame]), TIMEOUT)
                        (ack,) = await asyncio.wait_for(ep.recv(), TIMEOUT)
                        elapsed = time.perf_counter() - start
                        if i == 0 and int(bytes(ack)) != expected:
                            raise AssertionError(
                                f"{mode} {nbytes} bytes: checksum {bytes(ack)!r} != {expected}"
                            )
                        if i:
                            times.append(elapsed)
                    conn.send((mode, nbytes, times))
                if not host_only:  # the staging copies alone, in this process: no transport
                    times = []
                    for i in range(reps + 1):
                        xp.cuda.runtime.deviceSynchronize()
                        start = time.perf_counter()
                        xp.asarray(xp.asnumpy(array))
                        xp.cuda.runtime.deviceSynchronize()
                        if i:
                            times.append(time.perf_counter() - start)
                    conn.send(("copies", nbytes, times))
                del array
            await ep.close()

    asyncio.run(run_client())
    conn.send(None)


def transports_chosen(log: str) -> list[str]:
    """UCX's protocol choices for tagged messages (``UCX_PROTO_INFO=y`` tables),
    deduplicated: a title per table (e.g. "intra-node: tagged message by ucp_tag_send*
    from cuda/GPU0"), then per size range the protocol and the lanes chosen."""
    try:
        text = Path(log).read_text(errors="replace")
    except OSError:
        return []
    tables: dict[str, list[str]] = {}
    rows: list[str] | None = None
    for raw in text.splitlines():
        line = re.sub(r"^\[[^]]*\] \[[^]]*\]\s*", "", raw).strip()
        title = re.match(r"\| ucp_context_\d+ (\S+) cfg#\d+ \| (.*?)\s*\|$", line)
        if title:
            key = f"{title[1]}: {title[2]}"
            rows = [] if "tagged message" in key and key not in tables else None
            if rows is not None:
                tables[key] = rows
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if rows is not None and line.startswith("|") and len(cells) == 3:
            rows.append(f"  {cells[0]:>14}  {cells[1]:<45} {cells[2]}")
    keys = sorted(tables, key=lambda k: "cuda" not in k)  # device memory first
    return [line for key in keys for line in [key, *tables[key]]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1MiB,16MiB,64MiB,256MiB")
    parser.add_argument("--repetitions", type=int, default=7)
    parser.add_argument(
        "--host-only",
        action="store_true",
        help="NumPy arrays, host frames only: a CPU smoke test of the harness",
    )
    parser.add_argument("--ucx-log", help="file for the processes' UCX output (UCX_PROTO_INFO)")
    args = parser.parse_args()
    sizes = [parse_size(s) for s in args.sizes.split(",")]

    from shuffle._transport import ucx

    if not ucx.is_available():
        print("device_bandwidth: ucxx cannot be imported; install ucxx for this CUDA version")
        return 2
    if not args.host_only:
        from shuffle.device._cuda import gpu_status

        status = gpu_status()
        if not status.usable:
            print(
                f"device_bandwidth: no usable GPU here ({status.reason}); "
                "use --host-only for a CPU smoke test of the harness"
            )
            return 2
    ctx = mp.get_context("spawn")
    secret = secrets.token_bytes(32)
    server_conn, server_child = ctx.Pipe()
    server = ctx.Process(target=serve, args=(secret, args.host_only, args.ucx_log, server_child))
    server.start()
    if not server_conn.poll(TIMEOUT):
        raise RuntimeError("the benchmark server did not start")
    address = server_conn.recv()
    client_conn, client_child = ctx.Pipe()
    client = ctx.Process(
        target=measure,
        args=(secret, address, sizes, args.repetitions, args.host_only, args.ucx_log, client_child),
    )
    client.start()
    table: dict[tuple[str, int], float] = {}
    while client_conn.poll(TIMEOUT * args.repetitions):
        try:
            item = client_conn.recv()
        except EOFError:  # the client died; its error is in its output
            break
        if item is None:
            break
        mode, nbytes, times = item
        median = statistics.median(times)
        table[mode, nbytes] = nbytes / median / 1e9
        print(
            json.dumps(
                {
                    "benchmark": "device_bandwidth",
                    "mode": mode,
                    "nbytes": nbytes,
                    "repetitions": len(times),
                    "median_s": round(median, 6),
                    "min_s": round(min(times), 6),
                    "GB/s": round(table[mode, nbytes], 3),
                }
            ),
            flush=True,
        )
    failed = False
    for process in (client, server):
        process.join(TIMEOUT)
        if process.exitcode != 0:
            print(f"device_bandwidth: {process.name} exited with {process.exitcode}")
            process.kill()
            failed = True
    if args.ucx_log:
        print(f"UCX protocols chosen for tagged messages (full log: {args.ucx_log}):")
        for line in transports_chosen(args.ucx_log)[:45]:
            print("  " + line[:150])
    # copies: cupy.asnumpy + cupy.asarray in one process, the staging's floor.
    print(f"{'MiB':>6} {'device':>8} {'staged':>8} {'copies':>8} {'device/staged':>14}  (GB/s)")
    for nbytes in sizes:
        dev, staged = table.get(("device", nbytes)), table.get(("staged", nbytes))
        copies = table.get(("copies", nbytes))
        ratio = f"{dev / staged:.2f}" if dev and staged else "-"
        print(
            f"{nbytes / 2**20:>6g} {dev or float('nan'):>8.2f} {staged or float('nan'):>8.2f} "
            f"{copies or float('nan'):>8.2f} {ratio:>14}"
        )
    return 1 if failed or len(table) < len(sizes) * (1 if args.host_only else 3) else 0


if __name__ == "__main__":
    sys.exit(main())
