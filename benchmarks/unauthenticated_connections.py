"""What idle raw (unauthenticated) connections cost a shuffle listener, and how long they stay.

Starts a listener with the default ``TransportConfig`` (10 s handshake deadline, 256
pending connections), opens ``--connections`` raw TCP connections to its port that
never send a byte, and reports per transport: the listener's descriptors held right
after opening them, its Python memory per connection (tracemalloc) and RSS per
connection, and when the server closed them (first, median, last, seconds after
opening). A real client then connects and exchanges a message. One JSON line per
transport. Loopback only; needs ``ulimit -n`` above twice the connection count.

    python benchmarks/unauthenticated_connections.py --connections 2000 --transports tcp,ucx
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import socket
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shuffle._transport import Endpoint, TransportConfig, get_transport

os.environ.setdefault("UCX_NET_DEVICES", "lo")  # read when UCX starts


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(16) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


async def measure(kind: str, n: int, wait: float) -> dict[str, object]:
    config = TransportConfig(secret=secrets.token_bytes(32))
    transport = get_transport(kind, config=config)  # type: ignore[arg-type]

    async def echo(ep: Endpoint) -> None:
        while True:
            await ep.send(await ep.recv())

    listener = await transport.listen("127.0.0.1", 0, echo)
    port = int(listener.address.rsplit(":", 1)[1])
    await asyncio.sleep(0.5)
    fds0, rss0 = _fds(), _rss()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    start = time.monotonic()
    socks = []
    for i in range(n):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setblocking(False)
        socks.append(sock)
        if i % 100 == 99:
            await asyncio.sleep(0)  # let the listener accept
    await asyncio.sleep(0.3)
    python_bytes = sum(
        s.size_diff for s in tracemalloc.take_snapshot().compare_to(before, "filename")
    )
    tracemalloc.stop()
    held, rss = _fds() - fds0 - n, _rss() - rss0
    closed_at: dict[int, float] = {}
    while len(closed_at) < n and time.monotonic() - start < wait:
        for i, sock in enumerate(socks):
            if i not in closed_at and _closed(sock):
                closed_at[i] = time.monotonic() - start
        await asyncio.sleep(0.2)
    client = get_transport(kind, config=config)  # type: ignore[arg-type]
    ep = await client.connect(listener.address)
    await ep.send([b"real client"])
    await ep.recv()
    await client.close()
    for sock in socks:
        sock.close()
    await transport.close()
    times = sorted(closed_at.values())
    return {
        "transport": kind,
        "connections": n,
        "descriptors_held_after_open": held,
        "python_bytes_per_connection": round(python_bytes / n),
        "rss_bytes_per_connection": round(rss / n),
        "closed": len(times),
        "closed_first_s": round(times[0], 2) if times else None,
        "closed_median_s": round(times[len(times) // 2], 2) if times else None,
        "closed_last_s": round(times[-1], 2) if times else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--transports", default="tcp,ucx")
    parser.add_argument("--wait", type=float, default=30.0, help="give up after (s)")
    args = parser.parse_args()
    for kind in args.transports.split(","):
        print(json.dumps(asyncio.run(measure(kind, args.connections, args.wait))), flush=True)


if __name__ == "__main__":
    main()
