"""Tier 2: the sending side against in-process actors over TCP, without starting Ray.

``ShuffleActor`` is a plain class; here two of them serve on a background event loop
(as Ray's async actor loop would), and a ``ShuffleClient`` sends to them from the test
thread (as a transfer task would).
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import pytest

from shuffle._exceptions import (
    InconsistentInputsError,
    ShuffleClosedError,
    StaleRunError,
    UnknownRunError,
)
from shuffle._ids import RunId, ShuffleId
from shuffle._malloc import DEFAULT_MALLOC, MallocTuning
from shuffle._options import RunOptions
from shuffle._rechunk import RechunkLayout
from shuffle._spec import ShuffleRunSpec
from shuffle._transport import AuthenticationError, Endpoint, TransportConfig, get_transport

# The actor module imports Ray (a dependency of the project, absent on some GPU nodes).
pytest.importorskip("ray")

from shuffle.shell._actor import ShuffleActor
from shuffle.shell._client import ClientConfig, ShuffleClient
from shuffle.shell._handle import RunHandle
from shuffle.shell._transfer import InputBatch
from shuffle.wire._reply import ACK

T = TypeVar("T")
SECRET = b"k" * 32
WAIT = 20.0
NOUT = 4


# -------------------------------------------------------------- in-process actors


class LoopThread:
    """An event loop in a thread, standing in for Ray's async actor loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(WAIT)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(WAIT)
        self.loop.close()


@pytest.fixture
def loop() -> Iterator[LoopThread]:
    loop = LoopThread()
    yield loop
    loop.close()


@pytest.fixture(autouse=True)
def _keep_this_process_malloc(monkeypatch: pytest.MonkeyPatch) -> None:
    """Clients here run in the test process: leave its malloc as it is."""
    monkeypatch.setattr("shuffle.shell._client.tune_malloc", lambda tuning: True)


@pytest.fixture
def client() -> Iterator[ShuffleClient]:
    client = ShuffleClient(config=ClientConfig(request_timeout=WAIT, transfer_timeout=WAIT))
    yield client
    client.close()


@pytest.fixture
def actors(loop: LoopThread, tmp_path: Path) -> Iterator[dict[str, tuple[ShuffleActor, str]]]:
    options = RunOptions(memory_limit=0, spill_directory=tmp_path, message_bytes=500)
    actors = {}
    for name in ("a0", "a1"):
        actor = ShuffleActor(
            name=name, secret=SECRET, transport="tcp", host="127.0.0.1", options=options
        )
        actors[name] = (actor, loop.run(actor.start()))
    yield actors
    for actor, _ in actors.values():
        loop.run(actor.close())
    assert list(tmp_path.iterdir()) == []  # no spill files left


def make_input(i: int, nrows: int) -> pd.DataFrame:
    rng = np.random.default_rng(i)
    return pd.DataFrame(
        {"x": rng.random(nrows), "_partitions": rng.integers(0, NOUT, nrows)},
        index=pd.RangeIndex(100 * i, 100 * i + nrows),
    )


def start_run(
    loop: LoopThread, actors: dict[str, tuple[ShuffleActor, str]], run_id: int
) -> RunHandle:
    spec = ShuffleRunSpec(
        shuffle_id=ShuffleId("s"),
        run_id=RunId(run_id),
        npartitions_out=NOUT,
        participants=tuple(actors),
    )
    meta = make_input(0, 0)
    for actor, _ in actors.values():
        loop.run(actor.start_run(spec, meta))
    addresses = {name: address for name, (_, address) in actors.items()}
    return RunHandle(spec=spec, meta=meta, addresses=addresses, secret=SECRET, transport="tcp")


def outputs(
    loop: LoopThread, actors: dict[str, tuple[ShuffleActor, str]], handle: RunHandle
) -> list[pd.DataFrame]:
    spec = handle.spec
    return [
        loop.run(actors[spec.owner_of(p)][0].get_output_partition(spec.shuffle_id, spec.run_id, p))
        for p in range(NOUT)
    ]


def test_client_shuffles_to_actors_and_survives_a_dropped_connection(
    loop: LoopThread, actors: dict[str, tuple[ShuffleActor, str]], client: ShuffleClient
) -> None:
    inputs = [make_input(i, n) for i, n in enumerate([30, 0, 25, 40])]
    handle = start_run(loop, actors, run_id=1)
    for i, df in enumerate(inputs[:2]):
        client.shuffle(df, handle, i)
    # The actors drop every connection (as a restarted listener would): the pooled
    # endpoints are dead, and the next messages go over fresh ones.
    for actor, _ in actors.values():
        for endpoint in list(actor._listener._connections.values()):  # type: ignore[union-attr]
            endpoint.abort()
    for i, df in enumerate(inputs[2:], start=2):
        client.shuffle(df, handle, i)
    client.shuffle(inputs[0], handle, 0)  # a retried transfer: duplicates are dropped
    whole = pd.concat(inputs)
    for p, got in enumerate(outputs(loop, actors, handle)):
        expected = whole[whole["_partitions"] == p].drop(columns="_partitions")
        pd.testing.assert_frame_equal(got, expected)
    runs = [loop.run(actor.runs()) for actor, _ in actors.values()]
    assert sum(info.stats.duplicates_ignored for (info,) in runs) > 0

    newer = start_run(loop, actors, run_id=2)
    with pytest.raises(StaleRunError, match="run 1 is stale, run 2 superseded it") as info:
        client.shuffle(inputs[0], handle, 0)
    assert any("reported by the shuffle actor at tcp://" in n for n in info.value.__notes__)
    for actor, _ in actors.values():
        loop.run(actor.close_run(newer.spec.shuffle_id, newer.spec.run_id))
        assert loop.run(actor.runs()) == []


def test_a_refused_transfer_leaves_nothing_for_the_garbage_collector(
    loop: LoopThread, actors: dict[str, tuple[ShuffleActor, str]], client: ShuffleClient
) -> None:
    """In a Ray worker the input is a view of the object store: a cycle through the
    failure (its traceback's frames, the send buffer keeping it) would pin it until the
    worker's rare garbage collection. Reference counting alone must free it."""
    handle = start_run(loop, actors, run_id=1)
    for actor, _ in actors.values():  # the actors refuse every message of the run
        loop.run(actor.close_run(handle.spec.shuffle_id, handle.spec.run_id))
    df = make_input(1, 5_000)
    alive = weakref.ref(df)
    gc.collect()
    gc.disable()
    try:
        try:  # not pytest.raises: its ExceptionInfo is part of a cycle of its own
            client.shuffle(df, handle, 1)
        except ShuffleClosedError:
            pass
        else:
            pytest.fail("the closed run accepted a transfer")
        del df
        assert alive() is None, "a failed transfer's input outlives it (a reference cycle)"
    finally:
        gc.enable()


def _stats(loop: LoopThread, actors: dict[str, tuple[ShuffleActor, str]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for actor, _ in actors.values():
        for info in loop.run(actor.runs()):
            for field, value in vars(info.stats).items():
                total[field] = total.get(field, 0) + value
    return total


def test_an_input_batch_sends_staged_inputs_joined_and_a_retry_is_dropped(
    loop: LoopThread, actors: dict[str, tuple[ShuffleActor, str]], client: ShuffleClient
) -> None:
    inputs = {i: make_input(i, n) for i, n in enumerate([30, 0, 25, 40])}
    handle = dataclasses.replace(start_run(loop, actors, run_id=1), options=RunOptions())
    batch = InputBatch(handle, client=client)
    for i in (2, 0, 3, 1):  # the order a group happens to compute them in
        assert batch.add(inputs[i], i) == i
    assert sorted(batch.staged) == [0, 1, 2, 3]
    assert _stats(loop, actors)["shards_received"] == 0  # nothing left before flush
    batch.finish()
    assert batch.staged == []
    whole = pd.concat(inputs[i] for i in range(4))
    # One piece per output partition with rows, not one per input and output.
    pieces = sum(1 for p in range(NOUT) if (whole["_partitions"] == p).any())
    assert _stats(loop, actors)["shards_received"] == pieces
    retry = InputBatch(handle, client=client)  # a retried task stages the same inputs
    for i in (0, 1, 2, 3):
        retry.add(inputs[i], i)
    retry.flush()
    assert _stats(loop, actors)["duplicates_ignored"] > 0
    assert _stats(loop, actors)["shards_received"] == pieces
    got = outputs(loop, actors, handle)  # outputs are read once (released as read)
    for p in range(NOUT):
        expected = whole[whole["_partitions"] == p].drop(columns="_partitions")
        pd.testing.assert_frame_equal(got[p], expected)  # one joined piece: input order


def test_a_retry_that_cuts_other_sets_is_refused_not_merged(
    loop: LoopThread, actors: dict[str, tuple[ShuffleActor, str]], client: ShuffleClient
) -> None:
    inputs = {i: make_input(i, 30) for i in range(3)}
    handle = start_run(loop, actors, run_id=1)
    first = InputBatch(handle, client=client)
    for i in (0, 1):
        first.add(inputs[i], i)
    first.flush()
    # The retry computed more (say, a random source said otherwise): {0, 1, 2} under
    # the name 0 would be dropped as a duplicate, and input 2's rows lost.
    retry = InputBatch(handle, client=client)
    for i in (0, 1, 2):
        retry.add(inputs[i], i)
    with pytest.raises(InconsistentInputsError, match=r"overlaps one covering \[0, 1\]"):
        retry.flush()
    whole = pd.concat([inputs[0], inputs[1]])
    for p, frame in enumerate(outputs(loop, actors, handle)):
        expected = whole[whole["_partitions"] == p].drop(columns="_partitions")
        pd.testing.assert_frame_equal(frame, expected)  # nothing of the refused message


def test_an_input_batch_sends_once_it_holds_combine_bytes(
    loop: LoopThread, actors: dict[str, tuple[ShuffleActor, str]], client: ShuffleClient
) -> None:
    handle = start_run(loop, actors, run_id=1)
    small = dataclasses.replace(handle, options=RunOptions(combine_bytes=1))
    batch = InputBatch(small, client=client)
    batch.add(make_input(0, 30), 0)
    assert batch.staged == []  # over the limit at once: sent before add returned
    assert _stats(loop, actors)["shards_received"] > 0


def test_an_input_batch_checks_each_input_when_it_is_added(
    loop: LoopThread, actors: dict[str, tuple[ShuffleActor, str]], client: ShuffleClient
) -> None:
    handle = start_run(loop, actors, run_id=1)
    batch = InputBatch(handle, client=client)
    with pytest.raises(ValueError, match="input partition 5 has columns"):
        batch.add(make_input(5, 3).rename(columns={"x": "y"}), 5)
    with pytest.raises(ValueError, match="input partition must be an int"):
        batch.add(make_input(6, 3), -1)
    assert batch.staged == []
    layout = RechunkLayout(((2, 2),), ((4,),))
    array_handle = dataclasses.replace(handle, meta=layout)
    with pytest.raises(TypeError, match="send array chunks with transfer"):
        InputBatch(array_handle, client=client)


def test_a_request_without_an_ack_times_out(loop: LoopThread) -> None:
    transport = get_transport("tcp", config=TransportConfig(secret=SECRET))

    async def swallow(endpoint: Endpoint) -> None:
        while True:
            await endpoint.recv()  # never answers

    listener = loop.run(transport.listen("127.0.0.1", 0, swallow))
    client = ShuffleClient(config=ClientConfig(request_timeout=0.3))
    try:
        with pytest.raises(TimeoutError, match="did not acknowledge a shuffle message within"):
            client.send(listener.address, [b"x"], secret=SECRET)
    finally:
        client.close()
        loop.run(transport.close())


def test_a_process_using_the_client_exits_without_closing_it(loop: LoopThread) -> None:
    """The per-process client's loop thread and connections must not hold up exit."""
    transport = get_transport("tcp", config=TransportConfig(secret=SECRET))

    async def ack(endpoint: Endpoint) -> None:
        while True:
            await endpoint.recv()
            await endpoint.send(ACK)

    listener = loop.run(transport.listen("127.0.0.1", 0, ack))
    code = (
        "from shuffle.shell._process import get_client\n"
        f"get_client().send({listener.address!r}, [b'x'], secret={SECRET!r})\n"
        "print('sent', flush=True)\n"
    )
    try:
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=WAIT, check=False
        )
    finally:
        loop.run(transport.close())
    assert (result.returncode, result.stdout) == (0, "sent\n"), result.stderr


# ------------------------------------------------------------------- monitoring


def _eventually(predicate: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {WAIT} s: {what}")
        time.sleep(0.01)


def test_actor_usage_and_counters_follow_what_it_received_spilled_and_refused(
    loop: LoopThread, actors: dict[str, tuple[ShuffleActor, str]], client: ShuffleClient
) -> None:
    inputs = [make_input(i, 30) for i in range(2)]
    assert all(df["_partitions"].nunique() == NOUT for df in inputs)  # a piece per output
    handle = start_run(loop, actors, run_id=1)
    for i, df in enumerate(inputs):
        client.shuffle(df, handle, i)
    client.shuffle(inputs[0], handle, 0)  # a retry: duplicates are not counted
    usage = {name: loop.run(actor.usage()) for name, (actor, _) in actors.items()}
    assert {name: [(u.shuffle_id, u.run_id) for u in us] for name, us in usage.items()} == {
        "a0": [("s", 1)],
        "a1": [("s", 1)],
    }
    runs = {name: us[0] for name, us in usage.items()}
    stats = {
        info.participant: info.stats for a, _ in actors.values() for info in loop.run(a.runs())
    }
    for name, u in runs.items():
        owned = len(handle.spec.partitions_of(name))
        assert u.pieces_received == len(inputs) * owned == stats[name].shards_received
        assert u.bytes_received == stats[name].bytes_received > 0
        # memory_limit=0: every piece went to disk, none is in memory
        assert (u.memory_bytes, u.disk_bytes) == (0, u.bytes_received)
        assert u.bytes_spilled == u.bytes_received and u.bytes_read_back == 0
    outputs(loop, actors, handle)  # unpacks read the spilled pieces back
    for name, (actor, _) in actors.items():
        (u,) = loop.run(actor.usage())
        assert u.bytes_read_back == runs[name].bytes_spilled
        sample = actor.sample()
        assert sample.runs_active == 1 and sample.disk_bytes == u.disk_bytes
        closed = loop.run(actor.close_run(ShuffleId("s"), RunId(1)))
        assert closed is not None and closed.bytes_received == u.bytes_received
        assert loop.run(actor.close_run(ShuffleId("s"), RunId(1))) is None  # closed already
        # Counters outlive the run; gauges drop to zero.
        after = actor.sample()
        assert after.counters.runs_opened == 1
        assert after.counters.pieces_received == u.pieces_received
        assert after.counters.bytes_received == u.bytes_received
        assert after.counters.bytes_read_back == u.bytes_read_back
        assert (after.runs_active, after.memory_bytes, after.disk_bytes) == (0, 0, 0)

    # Refusals are counted by reason: a closed run, an unknown run, a failed handshake.
    with pytest.raises(ShuffleClosedError):
        client.shuffle(inputs[0], handle, 0)
    unknown = dataclasses.replace(handle, spec=dataclasses.replace(handle.spec, run_id=RunId(7)))
    with pytest.raises(UnknownRunError):
        client.shuffle(inputs[0], unknown, 0)
    intruder = get_transport("tcp", config=TransportConfig(secret=b"x" * 32))
    address = actors["a0"][1]

    async def intrude() -> None:
        try:
            with pytest.raises(AuthenticationError):
                await intruder.connect(address)
        finally:
            await intruder.close()

    a0, a1 = actors["a0"][0], actors["a1"][0]
    before = a0.sample().refused["handshake"]
    loop.run(intrude())
    # At least: the client's pool may also hang up on a connection mid-handshake.
    _eventually(lambda: a0.sample().refused["handshake"] > before, "a failed handshake counted")
    # The client sends to both owners at once; the first refusal ends the transfer.
    total = [a.sample().refused for a in (a0, a1)]
    assert sum(r.get("closed_run", 0) for r in total) >= 1
    assert sum(r.get("unknown_run", 0) for r in total) >= 1
    assert a1.sample().refused["protocol"] == 0


def test_connect_opens_authenticated_connections_that_later_sends_reuse(
    loop: LoopThread, actors: dict[str, tuple[ShuffleActor, str]], client: ShuffleClient
) -> None:
    addresses = [address for _, address in actors.values()]
    client.connect(addresses, transport="tcp", secret=SECRET)
    client.connect(addresses, transport="tcp", secret=SECRET)  # open ones are kept

    def accepted() -> int:
        return sum(len(a._listener._connections) for a, _ in actors.values())  # type: ignore[union-attr]

    assert accepted() == 2  # one per actor, authenticated (the listener accepted it)
    handle = start_run(loop, actors, run_id=1)
    client.shuffle(make_input(0, 30), handle, 0)
    assert accepted() == 2  # the send went over the warmed connections
    with pytest.raises(AuthenticationError, match="does not know the shared secret"):
        client.connect(addresses, transport="tcp", secret=b"x" * 32)  # a wrong secret


def test_closing_a_run_gives_memory_back_once_idle(loop: LoopThread, tmp_path: Path) -> None:
    released: list[str] = []
    done = threading.Event()

    def release() -> None:
        released.append(threading.current_thread().name)
        done.set()

    actor = ShuffleActor(
        name="a0",
        secret=SECRET,
        transport="tcp",
        host="127.0.0.1",
        options=RunOptions(spill_directory=tmp_path),
        release=release,
        idle_release_s=0.01,
    )
    loop.run(actor.start())
    handle = start_run(loop, {"a0": (actor, "")}, run_id=1)
    assert released == []  # nothing while a run is open
    loop.run(actor.close_run(handle.spec.shuffle_id, handle.spec.run_id))
    assert done.wait(WAIT)
    assert len(released) == 1 and released[0].startswith("a0-unpack")  # off the loop
    loop.run(actor.close_run(handle.spec.shuffle_id, handle.spec.run_id))  # not open
    # A run that opens before the actor is idle keeps the heap as it is.
    start_run(loop, {"a0": (actor, "")}, run_id=2)

    async def idle_check() -> None:
        actor._release_if_idle()

    loop.run(idle_check())
    assert len(released) == 1
    loop.run(actor.close())


@pytest.mark.parametrize(
    ("memory_limit", "releases"), [(0, 1), (2**40, 0)], ids=["beyond-budget", "within-budget"]
)
def test_outputs_beyond_the_budget_are_built_two_at_a_time_after_one_release(
    loop: LoopThread,
    tmp_path: Path,
    client: ShuffleClient,
    monkeypatch: pytest.MonkeyPatch,
    memory_limit: int,
    releases: int,
) -> None:
    # A budget of 0: every output is beyond it, so the actor builds two at once (one
    # reads back while the other converts), never more, and the rest wait at its
    # gate. Memory is released once, when receiving ends, and only when the run
    # received more than the budget; never between outputs.
    events: list[str] = []
    options = RunOptions(memory_limit=memory_limit, spill_directory=tmp_path, message_bytes=500)
    actor = ShuffleActor(
        name="a0",
        secret=SECRET,
        transport="tcp",
        host="127.0.0.1",
        options=options,
        release=lambda: events.append("release"),
    )
    actors = {"a0": (actor, loop.run(actor.start()))}
    handle = start_run(loop, actors, run_id=1)
    inputs = [make_input(i, 60) for i in range(3)]
    for i, df in enumerate(inputs):
        client.shuffle(df, handle, i)
    spec = handle.spec
    run = actor._manager.get_run(spec.shuffle_id, spec.run_id)
    build, lock, go = run.get_output_partition, threading.Lock(), threading.Event()
    inside: list[int] = []

    def observed_build(partition: int) -> Any:
        with lock:
            inside.append(partition)
            events.append("build")
        go.wait(WAIT)  # hold every build that started until the test looked
        return build(partition)

    monkeypatch.setattr(run, "get_output_partition", observed_build)

    async def unpack_all() -> list[pd.DataFrame]:
        calls = [
            asyncio.ensure_future(actor.get_output_partition(spec.shuffle_id, spec.run_id, p))
            for p in range(NOUT)
        ]
        deadline = time.monotonic() + WAIT
        # Two builds run and the others wait at the gate.
        while memory_limit == 0 and not (
            len(inside) == 2 and actor._unpack_gate.waiting == NOUT - 2
        ):
            assert len(inside) < 3, f"outputs {inside} were built at once"
            assert time.monotonic() < deadline, "the unpack calls did not start"
            await asyncio.sleep(0.01)
        go.set()
        return list(await asyncio.gather(*calls))

    got = loop.run(unpack_all())
    if memory_limit == 0:
        assert events[:2] == ["release", "build"]  # receiving's memory went back first
    assert events.count("build") == NOUT
    assert events.count("release") == releases
    whole = pd.concat(inputs)
    for p, df in enumerate(got):
        expected = whole[whole["_partitions"] == p].drop(columns="_partitions")
        pd.testing.assert_frame_equal(df, expected)
    loop.run(actor.close())


def test_release_memory_returns_freed_heap_to_the_os() -> None:
    # A child process, so that this process's heap does not matter: it frees 200
    # MiB of small blocks that glibc keeps (a few pinned at the top of its heap),
    # then calls release_memory.
    code = """
import sys
from shuffle._release import release_memory
def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
blocks = [bytearray(4000) for _ in range(50_000)]
keep = [bytearray(4000) for _ in range(10)]
del blocks
before = anon()
release_memory()
print(before - anon())
"""
    if not sys.platform.startswith("linux"):
        pytest.skip("measured through /proc")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout) > 100 * 2**20


def test_the_first_transfer_sets_the_process_malloc_thresholds_once(
    loop: LoopThread,
    actors: dict[str, tuple[ShuffleActor, str]],
    client: ShuffleClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[MallocTuning] = []
    monkeypatch.setattr("shuffle.shell._client.tune_malloc", calls.append)
    untuned = dataclasses.replace(
        start_run(loop, actors, run_id=1), options=RunOptions(malloc=None)
    )
    client.shuffle(make_input(0, 10), untuned, 0)
    assert calls == []  # None: left as glibc has them
    handle = dataclasses.replace(start_run(loop, actors, run_id=2), options=RunOptions())
    for i in range(3):
        client.shuffle(make_input(i, 10), handle, i)
    assert calls == [DEFAULT_MALLOC]
    other = MallocTuning(mmap_threshold=2**20, trim_threshold=2**21)
    newer = dataclasses.replace(start_run(loop, actors, run_id=3), options=RunOptions(malloc=other))
    client.shuffle(make_input(0, 10), newer, 0)
    assert calls == [DEFAULT_MALLOC, other]
