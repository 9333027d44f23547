"""Bandwidth between two actors on different raylets: out-of-band vs an ObjectRef.

A ``ray.cluster_utils.Cluster`` with two raylets (two nodes, two object stores, on this
machine) and two actors, each pinned to its own node, as the shuffle actors are:

- **out of band** (``ucx``, ``tcp``): the receiver listens on the shuffle's transport
  (``shuffle._transport``, the same HMAC handshake and framing the shuffle uses) and
  answers every message with a tiny acknowledgement; the sender times ``send(one
  frame of N bytes)`` + ``recv(ack)`` over one connection, as a transfer task does.
- **ObjectRef** (``objectref``): the sender ``ray.put``\\ s the same N bytes on its node
  (a fresh object each repetition) and calls the receiver with the ref inside a list;
  the receiver ``await``\\ s it, so Ray pulls it into the receiver's object store.
  Timed from before the put to the call's return (``median_s``), and the receiver's
  wait for the object alone (``get_median_s``); ``put_median_s`` is the put.

Two ceilings, measured in the receiver's process, put the figures in context: ``memcpy``
copies N bytes into a buffer that was written before (the machine's copy bandwidth at that
size), ``memcpy_fresh`` into a newly allocated one each time, as a receive buffer is (the
kernel then maps and zeroes every page on first touch). A transfer between two processes
costs at least one or two such copies, so where ``memcpy_fresh`` is near the transports'
figures, the copies, not the protocol, set the bandwidth.

``--frames K`` sends each out-of-band message as K equal frames instead of one, as a
batched shuffle message of K small pieces travels, which shows the per-frame cost.

The actors run with the shuffle actors' environment (``shuffle.shell._actor.ACTOR_ENV``,
which lets UCX use shared memory). Prints one JSON line per path and size (medians of
``--repetitions`` after one warm-up), then one line of ratios per size.

    python benchmarks/actor_bandwidth.py --sizes 1MiB,16MiB,64MiB --repetitions 5
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import secrets
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray.cluster_utils import Cluster
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shuffle.shell._actor import ACTOR_ENV

sys.path.insert(0, str(Path(__file__).resolve().parent))
import transport_bandwidth
from transport_bandwidth import _config, ack_each_message, parse_size

# The actors call _config; ship it by value, workers need not import this folder.
ray.cloudpickle.register_pickle_by_value(transport_bandwidth)

TIMEOUT = 300.0


def _payload(nbytes: int) -> np.ndarray:
    # Random bytes: nothing on the way may compress or deduplicate them.
    return np.random.default_rng(nbytes).integers(0, 256, nbytes, dtype=np.uint8)


class Receiver:
    """Listens out of band and acknowledges each message; awaits refs it is handed."""

    def __init__(self) -> None:
        self._transports: list[Any] = []
        self._listeners: list[Any] = []  # referenced, or the listener may be collected

    async def listen(self, transport: str, secret: bytes, host: str) -> str:
        from shuffle._transport import get_transport

        t = get_transport(transport, config=_config(secret))  # type: ignore[arg-type]
        self._transports.append(t)
        listener = await t.listen(host, 0, ack_each_message)
        self._listeners.append(listener)
        return listener.address

    async def fetch(self, refs: list[Any]) -> tuple[int, float]:
        """Wait for ``refs[0]`` (pulled to this node); its size and the seconds it took."""
        start = time.perf_counter()
        value = await refs[0]
        elapsed = time.perf_counter() - start
        return int(value.nbytes), elapsed

    def copy(self, nbytes: int, reps: int, fresh: bool) -> list[float]:
        """Seconds per copy of ``nbytes``, into a reused or a newly allocated buffer."""
        data = _payload(nbytes)
        target = np.empty_like(data)
        np.copyto(target, data)  # written once: its pages are mapped
        times = []
        for i in range(reps + 1):  # the first one warms up
            start = time.perf_counter()
            if fresh:
                target = np.empty_like(data)
            np.copyto(target, data)
            if i:
                times.append(time.perf_counter() - start)
        return times

    async def close(self) -> None:
        for t in self._transports:
            await t.close()  # closes its listener too
        self._transports.clear()
        self._listeners.clear()


class Sender:
    """Times sends to the receiver: out of band, or as ObjectRefs."""

    async def out_of_band(
        self, transport: str, secret: bytes, address: str, nbytes: int, reps: int, frames: int
    ) -> list[float]:
        from shuffle._transport import get_transport

        data = memoryview(_payload(nbytes))
        bounds = np.linspace(0, nbytes, frames + 1).astype(int).tolist()
        message = [data[a:b] for a, b in itertools.pairwise(bounds)]
        async with get_transport(transport, config=_config(secret)) as t:  # type: ignore[arg-type]
            ep = await asyncio.wait_for(t.connect(address), TIMEOUT)
            times = []
            for i in range(reps + 1):  # the first one warms up
                start = time.perf_counter()
                await asyncio.wait_for(ep.send(message), TIMEOUT)
                await asyncio.wait_for(ep.recv(), TIMEOUT)
                if i:
                    times.append(time.perf_counter() - start)
            await ep.close()
        return times

    async def object_ref(self, receiver: Any, nbytes: int, reps: int) -> list[dict[str, float]]:
        data = _payload(nbytes)
        out = []
        for i in range(reps + 1):
            start = time.perf_counter()
            ref = ray.put(data)  # a new object each time: the receiver's node lacks it
            put = time.perf_counter()
            got, get_s = await receiver.fetch.remote([ref])
            stop = time.perf_counter()
            del ref
            if got != nbytes:
                raise RuntimeError(f"receiver got {got} bytes, expected {nbytes}")
            if i:
                out.append({"total_s": stop - start, "put_s": put - start, "get_s": get_s})
        return out


def _pinned(cls: type, node_id: str) -> Any:
    return (
        ray.remote(cls)
        .options(
            num_cpus=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            runtime_env={"env_vars": dict(ACTOR_ENV)},
        )
        .remote()
    )


def _record(path: str, nbytes: int, times: list[float], **extra: Any) -> dict[str, Any]:
    median = statistics.median(times)
    return {
        "benchmark": "actor_bandwidth",
        "path": path,
        "nbytes": nbytes,
        "repetitions": len(times),
        "median_s": round(median, 6),
        "min_s": round(min(times), 6),
        "GB/s": round(nbytes / median / 1e9, 3),
        **extra,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1MiB,16MiB,64MiB", help="comma-separated, e.g. 64KiB,1MiB")
    p.add_argument("--repetitions", type=int, default=5)
    p.add_argument("--transports", default="ucx,tcp")
    p.add_argument("--frames", type=int, default=1, help="frames per out-of-band message")
    p.add_argument("--store-mb", type=int, default=None, help="object store per node, MiB")
    args = p.parse_args()
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    if args.repetitions < 1 or args.frames < 1 or not sizes or min(sizes) < args.frames:
        p.error("--repetitions and --frames must be at least 1, every size at least --frames")
    # Room for a few objects of the largest size on each node (puts are freed as we go).
    store = (args.store_mb or max(256, 4 * max(sizes) >> 20)) << 20

    from shuffle._transport import ucx

    transports = args.transports.split(",") if args.transports else []
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "object_store_memory": store, "include_dashboard": False},
    )
    try:
        cluster.add_node(num_cpus=1, object_store_memory=store)
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        nodes = sorted(
            ((n["NodeID"], n["NodeManagerAddress"]) for n in ray.nodes() if n["Alive"]),
            key=lambda n: n[0],
        )
        (node_a, _), (node_b, host_b) = nodes[0], nodes[1]
        sender, receiver = _pinned(Sender, node_a), _pinned(Receiver, node_b)
        secret = secrets.token_bytes(32)
        results: dict[str, dict[int, float]] = {}
        for name in transports:
            if name == "ucx" and not ucx.is_available():
                print(json.dumps({"path": "ucx", "skipped": "ucxx cannot be imported"}))
                continue
            address = ray.get(receiver.listen.remote(name, secret, host_b), timeout=TIMEOUT)
            for nbytes in sizes:
                call = sender.out_of_band.remote(
                    name, secret, address, nbytes, args.repetitions, args.frames
                )
                rec = _record(name, nbytes, ray.get(call, timeout=TIMEOUT), frames=args.frames)
                results.setdefault(name, {})[nbytes] = rec["GB/s"]
                print(json.dumps(rec), flush=True)
        for nbytes in sizes:
            call = sender.object_ref.remote(receiver, nbytes, args.repetitions)
            reps = ray.get(call, timeout=TIMEOUT)
            get_s = statistics.median(r["get_s"] for r in reps)
            rec = _record(
                "objectref",
                nbytes,
                [r["total_s"] for r in reps],
                put_median_s=round(statistics.median(r["put_s"] for r in reps), 6),
                get_median_s=round(get_s, 6),
                get_GB_per_s=round(nbytes / get_s / 1e9, 3),
            )
            results.setdefault("objectref", {})[nbytes] = rec["GB/s"]
            results.setdefault("objectref_get", {})[nbytes] = rec["get_GB_per_s"]
            print(json.dumps(rec), flush=True)
        for name, fresh in (("memcpy", False), ("memcpy_fresh", True)):
            for nbytes in sizes:
                times = ray.get(
                    receiver.copy.remote(nbytes, args.repetitions, fresh), timeout=TIMEOUT
                )
                rec = _record(name, nbytes, times)
                results.setdefault(name, {})[nbytes] = rec["GB/s"]
                print(json.dumps(rec), flush=True)
        for nbytes in sizes:
            ratios = {
                f"{name}/{ref}": round(results[name][nbytes] / results[ref][nbytes], 2)
                for name in transports
                if name in results
                for ref in ("objectref", "objectref_get")
            }
            print(json.dumps({"ratios": ratios, "nbytes": nbytes}), flush=True)
        ray.get(receiver.close.remote(), timeout=TIMEOUT)
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
