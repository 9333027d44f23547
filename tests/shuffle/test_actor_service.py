"""Tier 3: the shuffle service on real Ray, out of band over TCP and UCX.

Transfer tasks (``ray.remote(transfer)``) send input partitions straight to the shuffle
actor owning each output partition; after they return, actor calls hand the outputs
back as driver-owned ObjectRefs. Single-node tests share the session's Ray
(``ray_session``) and one ``ShuffleService`` per transport with one actor, and a
service with two actors on the node has its own test; the two-node test runs a
``ray.cluster_utils.Cluster`` in a subprocess, because one process can hold only one
Ray connection and the session's is in use. Every test ends with a cleanup assertion:
no runs on any actor, no spill files; the fixture checks that the actors are gone.
"""

from __future__ import annotations

import os
import socket
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from shuffle._exceptions import FrameError, ShuffleClosedError, StaleRunError, UnknownRunError
from shuffle._ids import RunId, ShardKey, ShuffleId
from shuffle._options import RunOptions
from shuffle._store import spill_prefix
from shuffle._transport import AuthenticationError, TransportName
from shuffle._transport import ucx as ucx_module
from shuffle.shell._client import ClientConfig, ShuffleClient
from shuffle.shell._handle import RunHandle
from shuffle.shell._placement import actors_on_node, slots

ray = pytest.importorskip("ray")


import contextlib

from shuffle.shell._service import ShuffleService
from shuffle.shell._transfer import transfer
from tests.conftest import assert_dies, run_scenario, scenario_cluster
from tests.shuffle.frames import piece_message
from tests.shuffle.support import TRANSPORTS

pytestmark = pytest.mark.ray

NIN, NOUT = 8, 5
ROWS = [40, 0, 25, 33, 1, 60, 12, 30]  # input partition 1 is empty
COLUMN = "_partitions"
WAIT = 60.0  # bound on every ray.get
COLORS = pd.CategoricalDtype(["red", "green", "blue"])
remote_transfer = ray.remote(max_retries=0)(transfer)


# ---------------------------------------------------------------------------- helpers


def make_inputs(seed: int) -> list[pd.DataFrame]:
    """Input partitions with int, float, string, categorical and tz-aware columns."""
    frames = []
    offset = 0
    for i, nrows in enumerate(ROWS):
        rng = np.random.default_rng(seed * 100 + i)
        missing = rng.random(nrows) < 0.2
        words = np.array(["alpha", "beta", "gamma", "δέλτα"], dtype=object)[
            rng.integers(0, 4, nrows)
        ]
        text = pd.array(words, dtype="str")
        text[missing] = None
        floats = rng.random(nrows)
        floats[missing] = np.nan
        frames.append(
            pd.DataFrame(
                {
                    "i8": rng.integers(-(10**9), 10**9, nrows),
                    "f8": floats,
                    "text": text,
                    "color": pd.Categorical.from_codes(rng.integers(0, 3, nrows), dtype=COLORS),
                    # unit="ns": pandas 3 infers seconds for an empty array.
                    "when": pd.to_datetime(rng.integers(0, 10**18, nrows), unit="ns", utc=True)
                    .tz_convert("Europe/Berlin")
                    .array,
                    COLUMN: rng.integers(0, NOUT, nrows),
                },
                index=pd.RangeIndex(offset, offset + nrows),
            )
        )
        offset += nrows
    return frames


def expected_outputs(inputs: Sequence[pd.DataFrame]) -> list[pd.DataFrame]:
    """pandas' answer: the rows of each partition in input-partition order, column dropped."""
    whole = pd.concat(inputs)
    return [whole[whole[COLUMN] == p].drop(columns=COLUMN) for p in range(NOUT)]


def start(service: ShuffleService, shuffle_id: str, inputs: Sequence[pd.DataFrame]) -> RunHandle:
    return service.start_run(
        shuffle_id, npartitions_out=NOUT, meta=inputs[0].iloc[:0], column=COLUMN, drop_column=True
    )


def transfer_all(handle: RunHandle, inputs: Sequence[pd.DataFrame], **options: Any) -> list[int]:
    refs = [ray.put(df) for df in inputs]
    task = remote_transfer.options(**options) if options else remote_transfer
    return ray.get([task.remote(ref, handle, i) for i, ref in enumerate(refs)], timeout=WAIT)


def unpack(handle: RunHandle) -> list[pd.DataFrame]:
    spec = handle.spec
    refs = [
        handle.actor_for(p).get_output_partition.remote(spec.shuffle_id, spec.run_id, p)
        for p in range(spec.npartitions_out)
    ]
    return ray.get(refs, timeout=WAIT)


def run_shuffle(
    service: ShuffleService, shuffle_id: str, inputs: Sequence[pd.DataFrame], **options: Any
) -> tuple[RunHandle, list[pd.DataFrame]]:
    handle = start(service, shuffle_id, inputs)
    assert transfer_all(handle, inputs, **options) == list(range(NIN))  # the barrier's markers
    return handle, unpack(handle)


def assert_outputs(got: Sequence[pd.DataFrame], inputs: Sequence[pd.DataFrame]) -> None:
    expected = expected_outputs(inputs)
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        pd.testing.assert_frame_equal(g, e)
    pd.testing.assert_frame_equal(pd.concat(got), pd.concat(expected))


def run_infos(service: ShuffleService) -> list[Any]:
    refs = [a.handle.runs.remote() for a in service.actors()]
    return [info for infos in ray.get(refs, timeout=WAIT) for info in infos]


def assert_clean(service: ShuffleService, spill: Path) -> None:
    assert run_infos(service) == []
    assert service.open_runs() == []
    assert list(spill.iterdir()) == []


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", params=TRANSPORTS)
def service(
    request: pytest.FixtureRequest, ray_session: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ShuffleService, Path]]:
    spill = tmp_path_factory.mktemp(f"spill-{request.param}")
    options = RunOptions(
        memory_limit=8 * 2**10,  # small: runs spill, and closing must delete the files
        spill_directory=spill,
        message_bytes=4 * 2**10,  # several messages per owner
        limiter_timeout=WAIT,
    )
    service = ShuffleService(
        transport=request.param, options=options, timeout=WAIT, actors_per_node=1
    )
    try:
        yield service, spill
        handles = [a.handle for a in service.actors()]
    finally:
        service.close()
    for handle in handles:
        assert_dies(handle, wait=WAIT)
    assert list(spill.iterdir()) == []


# ---------------------------------------------------------------------------- tests


def test_shuffle_matches_pandas(service: tuple[ShuffleService, Path]) -> None:
    svc, spill = service
    actors = svc.actors()
    assert len(actors) == 1  # one node
    assert actors[0].address.startswith(f"{svc.transport}://")
    inputs = make_inputs(seed=0)
    handle = start(svc, "matches-pandas", inputs)
    assert transfer_all(handle, inputs) == list(range(NIN))  # the barrier's markers
    spec = handle.spec
    outputs = ray.get(
        [
            handle.actor_for(p).get_output_partition.remote(spec.shuffle_id, spec.run_id, p)
            for p in range(NOUT - 2)
        ],
        timeout=WAIT,
    )
    # The last two as the scheduler submits a batch of unpacks: one call after the
    # barrier's ref, a tiny status first, then each partition as its own object.
    assert spec.owner_of(NOUT - 2) == spec.owner_of(NOUT - 1)
    barrier = ray.put(spec.run_id)
    status, *parts = (
        handle.actor_for(NOUT - 1)
        .unpack.options(num_returns=3)
        .remote(spec.shuffle_id, spec.run_id, [NOUT - 2, NOUT - 1], barrier)
    )
    assert isinstance(ray.get(status, timeout=WAIT), str)
    outputs.extend(ray.get(parts, timeout=WAIT))
    assert handle.transport == svc.transport
    assert_outputs(outputs, inputs)

    (info,) = run_infos(svc)
    assert info.spill_directory is not None  # the small memory limit made it spill
    assert info.stats.shards_received == sum(df[COLUMN].nunique() for df in inputs)
    assert info.stats.messages_received > NIN - 1  # message_bytes split some inputs
    assert info.stats.outputs_read == NOUT and info.failed is None

    assert svc.open_runs() == [handle]
    svc.close_run(handle)
    svc.close_run(handle)  # idempotent
    with pytest.raises(ShuffleClosedError):
        actor = handle.actor_for(0)
        ray.get(
            actor.get_output_partition.remote("matches-pandas", handle.spec.run_id, 0), timeout=WAIT
        )
    assert_clean(svc, spill)


def test_stale_run_is_rejected_and_the_new_run_completes(
    service: tuple[ShuffleService, Path],
) -> None:
    svc, spill = service
    inputs = make_inputs(seed=1)
    old = start(svc, "stale", inputs)
    new = start(svc, "stale", inputs)  # a restart supersedes the old run everywhere
    assert new.spec.run_id > old.spec.run_id

    with pytest.raises(StaleRunError, match="is stale") as info:
        ray.get(remote_transfer.remote(inputs[0], old, 0), timeout=WAIT)
    assert (info.value.run_id, info.value.current_run_id) == (old.spec.run_id, new.spec.run_id)
    actor = old.actor_for(0)
    with pytest.raises(StaleRunError):
        ray.get(actor.get_output_partition.remote("stale", old.spec.run_id, 0), timeout=WAIT)
    with pytest.raises(UnknownRunError, match="'never-started' run 1 does not exist"):
        ray.get(
            actor.get_output_partition.remote(ShuffleId("never-started"), RunId(1), 0),
            timeout=WAIT,
        )

    assert transfer_all(new, inputs) == list(range(NIN))
    assert_outputs(unpack(new), inputs)
    svc.close_run(old)  # closes nothing: the newer run stays open
    assert [(i.shuffle_id, i.run_id) for i in run_infos(svc)] == [("stale", new.spec.run_id)]
    svc.close_run(new)
    with pytest.raises(ShuffleClosedError, match="is closed"):
        ray.get(remote_transfer.remote(inputs[0], new, 0), timeout=WAIT)
    assert_clean(svc, spill)


def test_unauthenticated_clients_are_dropped_and_the_actor_keeps_serving(
    service: tuple[ShuffleService, Path],
) -> None:
    svc, spill = service
    (actor,) = svc.actors()
    if svc.transport == "tcp":
        host, _, port = actor.address.removeprefix("tcp://").rpartition(":")
        with socket.create_connection((host, int(port)), timeout=WAIT) as raw:
            raw.sendall(b"GET / HTTP/1.0\r\n\r\n" + os.urandom(64))
            # Dropped without an answer, or with a reset.
            with contextlib.suppress(ConnectionResetError):
                assert raw.recv(1024) == b""
    client = ShuffleClient(config=ClientConfig(request_timeout=WAIT))
    try:
        with pytest.raises(AuthenticationError, match="does not know the shared secret"):
            client.send(actor.address, [b"not a shuffle message"], secret=os.urandom(32))
    finally:
        client.close()

    assert svc.actors() == [actor]  # same actor, same address
    inputs = make_inputs(seed=2)
    handle, outputs = run_shuffle(svc, "after-intruders", inputs)
    assert_outputs(outputs, inputs)
    svc.close_run(handle)
    assert_clean(svc, spill)


def test_shards_of_unknown_input_partitions_are_refused_with_a_typed_error(
    service: tuple[ShuffleService, Path],
) -> None:
    svc, spill = service
    inputs = make_inputs(seed=5)
    handle = svc.start_run(
        "input-range",
        npartitions_out=NOUT,
        meta=inputs[0].iloc[:0],
        column=COLUMN,
        npartitions_in=NIN,
    )
    spec = handle.spec
    frames = piece_message(
        spec, sender="intruder-with-the-secret", key=ShardKey(0, 999999), rows=inputs[0].iloc[:3]
    )
    client = ShuffleClient(config=ClientConfig(request_timeout=WAIT))
    try:
        with pytest.raises(FrameError, match=r"input partitions \[999999\].* has 8 inputs"):
            client.send(handle.addresses[spec.owner_of(0)], frames, secret=handle.secret)
    finally:
        client.close()
    assert transfer_all(handle, inputs) == list(range(NIN))
    assert_outputs(unpack(handle), inputs)  # no row of the refused shard
    svc.close_run(handle)
    assert_clean(svc, spill)


def test_idle_raw_connections_neither_stop_a_shuffle_nor_stay(
    service: tuple[ShuffleService, Path],
) -> None:
    """Raw connections to the actor's port (for UCX: held below the application) do not
    stop a shuffle, and are closed within the handshake deadline plus the reaper's
    period."""
    svc, spill = service
    (actor,) = svc.actors()
    host, _, port = actor.address.partition("://")[2].rpartition(":")
    socks = [socket.create_connection((host, int(port)), timeout=WAIT) for _ in range(300)]
    try:
        start_time = time.monotonic()
        inputs = make_inputs(seed=6)
        handle, outputs = run_shuffle(svc, "under-a-flood", inputs)
        assert_outputs(outputs, inputs)
        svc.close_run(handle)
        for sock in socks:
            sock.settimeout(max(0.1, start_time + 15.0 - time.monotonic()))
            with contextlib.suppress(ConnectionResetError):
                assert sock.recv(16) == b""
        assert time.monotonic() - start_time < 15.0  # 10 s handshake deadline, 1 s period
    finally:
        for sock in socks:
            sock.close()
    assert_clean(svc, spill)


def test_a_dead_actor_is_recreated(service: tuple[ShuffleService, Path]) -> None:
    svc, spill = service
    (before,) = svc.actors()
    ray.kill(before.handle, no_restart=True)
    assert_dies(before.handle, wait=WAIT)
    (after,) = svc.actors()
    assert after.name != before.name and after.node_id == before.node_id
    inputs = make_inputs(seed=3)
    handle, outputs = run_shuffle(svc, "recreated", inputs)
    assert handle.spec.participants == (after.name,)
    assert_outputs(outputs, inputs)
    svc.close_run(handle)
    assert_clean(svc, spill)


def test_run_handle_pickles_without_actor_handles(service: tuple[ShuffleService, Path]) -> None:
    svc, spill = service
    inputs = make_inputs(seed=4)
    handle = start(svc, "pickled", inputs)
    clone = ray.get(ray.put(handle), timeout=WAIT)
    assert clone.spec == handle.spec and clone.addresses == handle.addresses
    assert clone.secret == handle.secret and clone.actors is None
    with pytest.raises(RuntimeError, match="only the driver's copy"):
        clone.actor_for(0)
    svc.close_run(clone)  # the service closes a run from any copy of its handle
    assert_clean(svc, spill)


def test_restart_run_replaces_a_run_that_lost_its_actor(
    service: tuple[ShuffleService, Path],
) -> None:
    svc, spill = service
    inputs = make_inputs(seed=6)
    old = start(svc, "restarted", inputs)
    assert transfer_all(old, inputs[:2]) == [0, 1]
    (victim,) = svc.actors()
    ray.kill(victim.handle, no_restart=True)
    assert_dies(victim.handle, wait=WAIT)
    new = svc.restart_run(old)
    assert new.spec.run_id > old.spec.run_id and new.spec.shuffle_id == old.spec.shuffle_id
    assert victim.name not in new.spec.participants
    assert new.spec.npartitions_out == old.spec.npartitions_out
    assert svc.open_runs() == [new]
    assert transfer_all(new, inputs) == list(range(NIN))
    assert_outputs(unpack(new), inputs)
    svc.close_run(new)
    assert_clean(svc, spill)


def test_two_actors_per_node_own_blocks_and_one_is_recreated_alone(
    ray_session: Any, tmp_path: Path
) -> None:
    options = RunOptions(
        memory_limit=0,  # every shard spills: a killed actor surely leaves files behind
        spill_directory=tmp_path,
        message_bytes=4 * 2**10,
        limiter_timeout=WAIT,
    )
    with ShuffleService(transport="tcp", options=options, timeout=WAIT, actors_per_node=2) as svc:
        first, second = svc.actors()
        (node,) = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert [(a.node_id, a.index) for a in (first, second)] == [(node, 0), (node, 1)]
        assert first.name != second.name and first.address != second.address
        placed = ray.get([a.handle.node_id.remote() for a in (first, second)], timeout=WAIT)
        assert placed == [node, node]

        # Each actor owns, receives and unpacks one contiguous block of the outputs.
        inputs = make_inputs(seed=7)
        handle, outputs = run_shuffle(svc, "two-actors", inputs)
        assert_outputs(outputs, inputs)
        assert handle.spec.participants == (first.name, second.name)
        blocks = {a.name: handle.spec.partitions_of(a.name) for a in (first, second)}
        assert blocks == {first.name: range(3), second.name: range(3, NOUT)}
        infos = {i.participant: i for i in run_infos(svc)}
        assert set(infos) == set(blocks)
        for name, block in blocks.items():
            owned = [df[COLUMN][df[COLUMN].isin(block)] for df in inputs]
            assert infos[name].stats.shards_received == sum(c.nunique() for c in owned)
            assert infos[name].stats.outputs_read == len(block)
            assert infos[name].spill_directory is not None
        svc.close_run(handle)

        # Fewer outputs than actors: the second owns nothing and the run still works.
        ones = [df.assign(**{COLUMN: 0}) for df in inputs]
        single = svc.start_run("one-output", npartitions_out=1, meta=ones[0], column=COLUMN)
        assert single.spec.partitions_of(second.name) == range(0)
        assert transfer_all(single, ones) == list(range(NIN))
        got = ray.get(
            first.handle.get_output_partition.remote("one-output", single.spec.run_id, 0),
            timeout=WAIT,
        )
        pd.testing.assert_frame_equal(got, pd.concat(ones).drop(columns=COLUMN))
        svc.close_run(single)
        assert_clean(svc, tmp_path)

        # One of the two dies mid-run: only its slot gets a new actor, which removes
        # the spill files its predecessor left; the restarted run completes.
        old = start(svc, "lost-one", inputs)
        assert transfer_all(old, inputs[:3]) == [0, 1, 2]
        left = [p for p in tmp_path.iterdir() if p.name.startswith(spill_prefix(second.name))]
        assert left, "the victim spilled nothing"
        ray.kill(second.handle, no_restart=True)
        assert_dies(second.handle, wait=WAIT)
        new = svc.restart_run(old)
        survivor, successor = svc.actors()
        assert survivor == first  # same actor, same address
        assert (successor.node_id, successor.index) == (node, 1)
        assert successor.name not in (first.name, second.name)
        assert new.spec.participants == (first.name, successor.name)
        assert not any(p.exists() for p in left)
        assert transfer_all(new, inputs) == list(range(NIN))
        assert_outputs(unpack(new), inputs)
        svc.close_run(new)
        assert_clean(svc, tmp_path)
        handles = [a.handle for a in svc.actors()]
    for h in handles:
        assert_dies(h, wait=WAIT)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------ two nodes


def two_node_scenario() -> None:
    """Run in a subprocess by ``test_two_nodes``; raises on any failure."""
    import tempfile

    transport: TransportName = "ucx" if ucx_module.is_available() else "tcp"
    # 16 CPUs declared, not real.
    with scenario_cluster(head_cpus=1, node_cpus=[16]):
        with tempfile.TemporaryDirectory() as spill:
            options = RunOptions(memory_limit=8 * 2**10, spill_directory=spill, message_bytes=4096)
            # actors_per_node="auto": one actor per 8 CPUs, at least one (1 and 2).
            with ShuffleService(transport=transport, options=options, timeout=WAIT) as service:
                actors = service.actors()
                alive = [n for n in ray.nodes() if n["Alive"]]
                cpus = {n["NodeID"]: int(n["Resources"]["CPU"]) for n in alive}
                assert sorted(cpus.values()) == [1, 16], cpus
                counts = {n: actors_on_node("auto", node_cpus=c) for n, c in cpus.items()}
                assert sorted(counts.values()) == [1, 2]
                assert Counter(a.node_id for a in actors) == counts, actors
                assert [(a.node_id, a.index) for a in actors] == slots(counts)
                placed = ray.get([a.handle.node_id.remote() for a in actors], timeout=WAIT)
                assert placed == [a.node_id for a in actors]
                inputs = make_inputs(seed=5)
                handle, outputs = run_shuffle(
                    service, "two-nodes", inputs, scheduling_strategy="SPREAD"
                )
                assert_outputs(outputs, inputs)
                infos = run_infos(service)
                assert len(infos) == 3 and all(i.stats.shards_received > 0 for i in infos)
                service.close_run(handle)
                assert_clean(service, Path(spill))
        print(f"two nodes OK over {transport}", flush=True)


@pytest.mark.slow
def test_two_nodes_run_one_actor_per_8_cpus() -> None:
    stdout = run_scenario("tests.shuffle.test_actor_service", "two_node_scenario()", timeout=240)
    assert "two nodes OK" in stdout


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_configured_host_is_where_actors_listen(ray_session: Any, transport: str) -> None:
    with ShuffleService(
        transport=transport, host="127.0.0.1", timeout=WAIT, actors_per_node=1
    ) as svc:
        (actor,) = svc.actors()
        scheme, _, rest = actor.address.partition("://")
        assert scheme == transport and rest.rpartition(":")[0] == "127.0.0.1"
        inputs = make_inputs(seed=5)
        handle, outputs = run_shuffle(svc, "on-loopback", inputs)
        assert_outputs(outputs, inputs)
        svc.close_run(handle)
        handles = [a.handle for a in svc.actors()]
    for h in handles:
        assert_dies(h, wait=WAIT)
