"""Tier 2: several participants' runs fed by client-style senders in one process.

Each participant has its own ``ShuffleManager``; inputs are split and sent as a
transfer task's client sends them (``tests.shuffle.support.Network``), and the wire
copies the frames into the owner's manager. Network variants reorder, duplicate or
fail messages. Every test ends with a cleanup assertion: no open runs, no spill files.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import pickle
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shuffle import _store as shard_store
from shuffle._combine import joined_meta
from shuffle._exceptions import (
    FrameError,
    LimiterTimeoutError,
    ShuffleClosedError,
    ShuffleError,
    StaleRunError,
)
from shuffle._ids import RunId, ShardKey, ShuffleId
from shuffle._manager import UnknownRunError
from shuffle._options import RunOptions
from shuffle._run import DataFrameShuffleRun
from shuffle._spec import ShuffleRunSpec
from shuffle._spill_file import SpillFile
from shuffle.wire._arrow import table_to_buffer
from shuffle.wire._message import Piece, decode_message, encode_message
from tests.shuffle.frames import COLUMN, make_frame, piece_message
from tests.shuffle.support import Mode, Network, SlowDisk


@pytest.fixture
def make_network(spill_root: Path) -> Iterator[Callable[..., Network]]:
    """Build networks whose managers every test must close, leaving no runs behind."""
    networks: list[Network] = []

    def make(
        nparticipants: int = 3,
        *,
        mode: Mode = "direct",
        seed: int = 0,
        **option_overrides: Any,
    ) -> Network:
        options = RunOptions(
            **{
                "memory_limit": None,
                "spill_directory": spill_root,
                "message_bytes": 2000,
                "limiter_timeout": 10.0,
                **option_overrides,
            }
        )
        names = [f"actor-{i}" for i in range(nparticipants)]
        network = Network(names, options=options, mode=mode, seed=seed)
        networks.append(network)
        return network

    yield make
    for network in networks:
        network.assert_clean()


def make_inputs(
    rows: Sequence[int], *, npartitions_out: int, seed: int = 0, skew_key: int | None = None
) -> list[pd.DataFrame]:
    offsets = np.cumsum([0, *rows]).tolist()
    return [
        make_frame(n, npartitions_out=npartitions_out, seed=seed + i, offset=o, skew_key=skew_key)
        for i, (n, o) in enumerate(zip(rows, offsets, strict=False))
    ]


def expected_outputs(
    inputs: Sequence[pd.DataFrame], npartitions_out: int, *, drop_column: bool = True
) -> list[pd.DataFrame]:
    """pandas' answer: rows grouped by partition, in input then original order."""
    whole = pd.concat(inputs)
    parts = [whole[whole[COLUMN] == p] for p in range(npartitions_out)]
    return [p.drop(columns=COLUMN) if drop_column else p for p in parts]


def make_spec(
    network: Network,
    npartitions_out: int,
    *,
    shuffle_id: str = "shuffle-a",
    run_id: int = 1,
    drop_column: bool = True,
) -> ShuffleRunSpec:
    return ShuffleRunSpec(
        shuffle_id=ShuffleId(shuffle_id),
        run_id=RunId(run_id),
        npartitions_out=npartitions_out,
        participants=tuple(network.names),
        drop_column=drop_column,
    )


async def create_runs(
    network: Network, spec: ShuffleRunSpec, meta: pd.DataFrame
) -> dict[str, DataFrameShuffleRun]:
    return {name: await m.get_or_create(spec, meta) for name, m in network.managers.items()}


async def transfer(
    network: Network,
    runs: dict[str, DataFrameShuffleRun],
    inputs: Sequence[pd.DataFrame],
    *,
    placement: Sequence[int] | None = None,
) -> None:
    """Every participant's node sends its inputs one after another, all nodes at once."""
    names = network.names
    placement = placement or [i % len(names) for i in range(len(inputs))]
    run = next(iter(runs.values()))

    async def worker(name: str) -> None:
        for i, df in enumerate(inputs):
            if names[placement[i]] == name:
                await network.send_input(name, df, i, spec=run.spec, meta=run.meta)

    await asyncio.gather(*(worker(name) for name in names))


def barrier(runs: dict[str, DataFrameShuffleRun]) -> None:
    for run in runs.values():
        run.inputs_done()


def unpack(runs: dict[str, DataFrameShuffleRun], spec: ShuffleRunSpec) -> list[pd.DataFrame]:
    return [runs[spec.owner_of(p)].get_output_partition(p) for p in range(spec.npartitions_out)]


async def shuffle(
    network: Network,
    inputs: Sequence[pd.DataFrame],
    spec: ShuffleRunSpec,
    *,
    placement: Sequence[int] | None = None,
) -> tuple[dict[str, DataFrameShuffleRun], list[pd.DataFrame]]:
    runs = await create_runs(network, spec, inputs[0].iloc[:0])
    await transfer(network, runs, inputs, placement=placement)
    barrier(runs)
    return runs, unpack(runs, spec)


def assert_outputs(got: Sequence[pd.DataFrame], expected: Sequence[pd.DataFrame]) -> None:
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        pd.testing.assert_frame_equal(g, e)


# ---------------------------------------------------------------------------- results


@pytest.mark.parametrize("mode", ["direct", "delay", "chaos"])
@pytest.mark.parametrize(
    ("nparticipants", "ninputs", "npartitions_out"),
    [(1, 3, 4), (2, 1, 1), (2, 7, 3), (3, 3, 7), (4, 20, 1), (5, 1, 20), (5, 12, 12)],
)
async def test_shuffle_matches_pandas(
    make_network: Callable[..., Network],
    mode: Mode,
    nparticipants: int,
    ninputs: int,
    npartitions_out: int,
) -> None:
    network = make_network(nparticipants, mode=mode, seed=ninputs)
    rows = [(7 * i) % 40 for i in range(ninputs)]  # includes an empty input partition
    inputs = make_inputs(rows, npartitions_out=npartitions_out)
    spec = make_spec(network, npartitions_out)
    runs, got = await shuffle(network, inputs, spec)
    assert_outputs(got, expected_outputs(inputs, npartitions_out))
    stats = [run.stats for run in runs.values()]
    assert sum(s.shards_received for s in stats) == sum(df[COLUMN].nunique() for df in inputs)
    await network.close()


@settings(
    deadline=None,
    max_examples=40,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    nparticipants=st.integers(1, 5),
    npartitions_out=st.integers(1, 20),
    rows=st.lists(st.integers(0, 50), min_size=1, max_size=20),
    skew=st.booleans(),
    drop_column=st.booleans(),
    memory_limit=st.sampled_from([None, 0, 3000]),
    message_bytes=st.sampled_from([1, 700, 1 << 20]),
    mode=st.sampled_from(["direct", "delay", "chaos"]),
    data=st.data(),
)
def test_random_shuffles_match_pandas(
    nparticipants: int,
    npartitions_out: int,
    rows: list[int],
    skew: bool,
    drop_column: bool,
    memory_limit: int | None,
    message_bytes: int,
    mode: Mode,
    data: st.DataObject,
) -> None:
    skew_key = data.draw(st.integers(0, npartitions_out - 1)) if skew else None
    placement = data.draw(
        st.lists(st.integers(0, nparticipants - 1), min_size=len(rows), max_size=len(rows))
    )
    seed = data.draw(st.integers(0, 2**16))
    inputs = make_inputs(rows, npartitions_out=npartitions_out, seed=seed, skew_key=skew_key)

    async def scenario(root: Path) -> None:
        options = RunOptions(
            memory_limit=memory_limit,
            spill_directory=root,
            message_bytes=message_bytes,
            send_buffer_bytes=4000,  # small: writers wait for their sends
            limiter_timeout=10.0,
            concurrency=2,
        )
        names = [f"p{i}" for i in range(nparticipants)]
        network = Network(names, options=options, mode=mode, seed=seed)
        spec = make_spec(network, npartitions_out, drop_column=drop_column)
        try:
            _, got = await shuffle(network, inputs, spec, placement=placement)
            expected = expected_outputs(inputs, npartitions_out, drop_column=drop_column)
            assert_outputs(got, expected)
        finally:
            await network.close()
        network.assert_clean()

    with tempfile.TemporaryDirectory() as root:
        asyncio.run(scenario(Path(root)))
        assert list(Path(root).iterdir()) == []


async def test_all_empty_inputs_give_meta_shaped_outputs(
    make_network: Callable[..., Network],
) -> None:
    network = make_network(3)
    inputs = make_inputs([0, 0, 0], npartitions_out=5)
    runs, got = await shuffle(network, inputs, make_spec(network, 5))
    meta = inputs[0].iloc[:0].drop(columns=COLUMN)
    for output in got:
        assert output.empty
        assert list(output.columns) == list(meta.columns)
        pd.testing.assert_series_equal(output.dtypes, meta.dtypes)
    assert network.sends == 0
    assert all(run.stats.shards_received == 0 for run in runs.values())
    await network.close()


NON_STRING_LABELS = {
    "int": list(range(9)),
    "float": [0.5, 1.0, 2.5, -3.0, float("inf"), 1e300, 7.0, 8.25, -0.125],
    "tuple": [(c, i) for c in "abcd" for i in (1, 2)] + [("e", 1)],
    "mixed": [0, "0", 0.0, ("0",), None, True, "x", 1, 2.5],
    "duplicated": ["a", "a", "b", "b", 3, 3, "c", "c", "d"],
}


@pytest.mark.parametrize("drop_column", [True, False])
@pytest.mark.parametrize("labels", NON_STRING_LABELS.values(), ids=NON_STRING_LABELS.keys())
async def test_column_labels_of_any_type_survive(
    make_network: Callable[..., Network], labels: list[Any], drop_column: bool
) -> None:
    # Arrow names fields by strings: the labels' types must come back from meta.
    network = make_network(3)
    inputs = [
        df.set_axis([*labels, COLUMN], axis=1).rename_axis(index=7)  # a non-str index name
        for df in make_inputs([30, 0, 25, 40], npartitions_out=5)
    ]
    _, got = await shuffle(network, inputs, make_spec(network, 5, drop_column=drop_column))
    assert_outputs(got, expected_outputs(inputs, 5, drop_column=drop_column))
    for output in got:
        assert [(type(c), c) for c in output.columns] == [
            (type(c), c) for c in inputs[0].columns if not drop_column or c != COLUMN
        ]
    await network.close()


@pytest.mark.parametrize("drop_column", [True, False])
async def test_single_skewed_key_lands_in_one_partition(
    make_network: Callable[..., Network], drop_column: bool
) -> None:
    network = make_network(4, message_bytes=1)  # one shard per message
    inputs = make_inputs([200, 0, 150, 300], npartitions_out=6, skew_key=4)
    spec = make_spec(network, 6, drop_column=drop_column)
    runs, got = await shuffle(network, inputs, spec)
    assert [len(o) for o in got] == [0, 0, 0, 0, 650, 0]
    assert_outputs(got, expected_outputs(inputs, 6, drop_column=drop_column))
    owner = runs[spec.owner_of(4)]
    assert owner.stats.shards_received == 3
    await network.close()


async def test_only_the_needed_outputs_travel_and_are_stored(
    make_network: Callable[..., Network],
) -> None:
    network = make_network(3, message_bytes=1)  # one shard per message
    inputs = make_inputs([40, 0, 25, 33], npartitions_out=6)
    spec = dataclasses.replace(make_spec(network, 6), needed=(1, 4))
    runs = await create_runs(network, spec, inputs[0].iloc[:0])
    await transfer(network, runs, inputs)
    barrier(runs)
    expected = expected_outputs(inputs, 6)
    for p in spec.needed:
        pd.testing.assert_frame_equal(runs[spec.owner_of(p)].get_output_partition(p), expected[p])
    shards = sum(r.stats.shards_received for r in runs.values())
    # One shard per (input, needed output) pair that has rows, none for the others.
    assert shards == sum(df.loc[df[COLUMN].isin(spec.needed), COLUMN].nunique() for df in inputs)
    assert shards > 0
    for p in set(range(6)) - set(spec.needed):  # nothing arrived for the others
        assert runs[spec.owner_of(p)].get_output_partition(p).empty
    await network.close()


async def test_tiny_memory_limit_spills_and_close_deletes_the_files(
    make_network: Callable[..., Network], spill_root: Path
) -> None:
    network = make_network(3, memory_limit=500)
    inputs = make_inputs([60] * 6, npartitions_out=9)
    spec = make_spec(network, 9)
    runs = await create_runs(network, spec, inputs[0].iloc[:0])
    await transfer(network, runs, inputs)
    barrier(runs)
    spilled = [run.spill_directory for run in runs.values()]
    assert all(d is not None and any(d.iterdir()) for d in spilled)
    assert sorted(spill_root.iterdir()) == sorted(spilled)
    assert_outputs(unpack(runs, spec), expected_outputs(inputs, 9))
    for run in runs.values():
        # where the run's time went: receiving, disk writes and reads, output builds
        u = run.usage()
        assert 0 < u.receive_seconds <= u.seconds
        assert u.spill_seconds > 0 and u.read_back_seconds > 0 and u.unpack_seconds > 0
    for name, run in runs.items():
        await network.managers[name].close_run(spec.shuffle_id, spec.run_id)
        assert run.closed and run.spill_directory is None
    assert list(spill_root.iterdir()) == []
    await network.close()


async def test_duplicate_deliveries_and_retried_inputs_are_ignored(
    make_network: Callable[..., Network],
) -> None:
    network = make_network(3, mode="chaos", seed=7)
    inputs = make_inputs([30, 20, 0, 40], npartitions_out=5)
    spec = make_spec(network, 5)
    runs = await create_runs(network, spec, inputs[0].iloc[:0])
    await transfer(network, runs, inputs)
    # A retried transfer task resends input 1 from another participant.
    await network.send_input(network.names[2], inputs[1], 1, spec=spec, meta=inputs[0].iloc[:0])
    barrier(runs)
    received = sum(run.stats.shards_received for run in runs.values())
    await network.replay()  # every message once more, after the barrier
    assert sum(run.stats.shards_received for run in runs.values()) == received
    assert sum(run.stats.duplicates_ignored for run in runs.values()) >= len(network.log)
    assert_outputs(unpack(runs, spec), expected_outputs(inputs, 5))
    await network.close()


async def test_unpacking_releases_each_output_and_holds_at_most_the_budget(
    make_network: Callable[..., Network],
) -> None:
    budget = 3000
    network = make_network(1, memory_limit=budget)
    inputs = make_inputs([80] * 6, npartitions_out=5)
    spec = make_spec(network, 5)
    runs = await create_runs(network, spec, inputs[0].iloc[:0])
    await transfer(network, runs, inputs)
    barrier(runs)
    (run,) = runs.values()
    store = run._store
    assert store.nbytes_disk > 0 and store.nbytes_memory <= budget  # some spilled
    expected = expected_outputs(inputs, 5)
    for p in range(spec.npartitions_out):
        held = store.nbytes_memory + store.nbytes_disk
        read_back = store.bytes_read_back
        got = run.get_output_partition(p)
        pd.testing.assert_frame_equal(got, expected[p])
        taken = held - (store.nbytes_memory + store.nbytes_disk)
        # Only p's shards left the store (and were read back): what stays is within
        # the budget in memory, and shrinks by one output per read.
        assert 0 < taken <= store.bytes_read_back - read_back + budget
        assert store.nbytes_memory <= budget
        assert p not in store.partitions
        assert not (store.directory / f"{p}.bin").exists()
    assert (store.nbytes_memory, store.nbytes_disk) == (0, 0)
    assert list(store.directory.iterdir()) == []
    with pytest.raises(ShuffleClosedError, match="output partition 0 was already handed over"):
        run.get_output_partition(0)  # read once: a lost output restarts the shuffle
    await network.close()


async def test_concurrent_shuffles_on_the_same_managers(
    make_network: Callable[..., Network],
) -> None:
    network = make_network(3, mode="chaos", send_buffer_bytes=3000)
    a = make_inputs([40, 30, 20], npartitions_out=4, seed=1)
    b = make_inputs([25, 0, 35, 15], npartitions_out=7, seed=2)
    spec_a = make_spec(network, 4, shuffle_id="a")
    spec_b = make_spec(network, 7, shuffle_id="b", drop_column=False)
    (_, got_a), (_, got_b) = await asyncio.gather(
        shuffle(network, a, spec_a), shuffle(network, b, spec_b)
    )
    assert_outputs(got_a, expected_outputs(a, 4))
    assert_outputs(got_b, expected_outputs(b, 7, drop_column=False))
    assert {tuple(m.runs) for m in network.managers.values()} == {("a", "b")}
    await network.close()


# ------------------------------------------------------------------ runs and their ids


async def test_newer_run_supersedes_and_stale_messages_are_rejected(
    make_network: Callable[..., Network], spill_root: Path
) -> None:
    network = make_network(3, memory_limit=0)
    inputs = make_inputs([30, 30, 30], npartitions_out=6)
    meta = inputs[0].iloc[:0]
    spec1 = make_spec(network, 6)
    old = await create_runs(network, spec1, meta)
    await transfer(network, old, inputs[:2])
    stale_messages = list(network.log)
    assert stale_messages and any(spill_root.iterdir())

    spec2 = spec1.next_run(run_id=RunId(2))
    new = await create_runs(network, spec2, meta)
    assert list(spill_root.iterdir()) == []  # the old runs' spill files are gone
    # What the superseded runs received stays in their managers' cumulative counters.
    for name, manager in network.managers.items():
        counters, gone = manager.counters(), old[name].usage()
        assert counters.runs_opened == 2
        assert (counters.bytes_received, counters.bytes_spilled) == (
            gone.bytes_received,
            gone.bytes_spilled,
        )
    assert sum(m.counters().pieces_received for m in network.managers.values()) > 0
    for run in old.values():
        assert run.closed
        with pytest.raises(StaleRunError, match=r"run 1 is stale, run 2 superseded it"):
            await run.receive(stale_messages[0][1])
        with pytest.raises(StaleRunError, match=r"run 1 is stale, run 2 superseded it"):
            run.inputs_done()
        with pytest.raises(StaleRunError):
            run.get_output_partition(run.owned.start)
    for destination, wire in stale_messages:
        with pytest.raises(StaleRunError) as info:
            await network.managers[destination].receive(wire)
        assert (info.value.run_id, info.value.current_run_id) == (1, 2)
    for manager in network.managers.values():
        with pytest.raises(StaleRunError):
            await manager.get_or_create(spec1, meta)
        with pytest.raises(StaleRunError):
            manager.get_run(spec1.shuffle_id, spec1.run_id)

    # The new run is untouched by all of that and completes.
    await transfer(network, new, inputs)
    barrier(new)
    assert_outputs(unpack(new, spec2), expected_outputs(inputs, 6))
    await network.close()


async def test_get_or_create_is_idempotent_and_checks_the_spec(
    make_network: Callable[..., Network],
) -> None:
    network = make_network(2)
    manager = network.managers["actor-0"]
    meta = make_frame(0, npartitions_out=3, seed=0)
    spec = make_spec(network, 3)
    run = await manager.get_or_create(spec, meta)
    assert await manager.get_or_create(spec, meta) is run
    assert manager.get_run(spec.shuffle_id, spec.run_id) is run
    different = ShuffleRunSpec(
        shuffle_id=spec.shuffle_id,
        run_id=spec.run_id,
        npartitions_out=4,
        participants=spec.participants,
    )
    with pytest.raises(ValueError, match="differs from"):
        await manager.get_or_create(different, meta)
    outsider = ShuffleRunSpec(
        shuffle_id=ShuffleId("other"), run_id=RunId(1), npartitions_out=3, participants=("x",)
    )
    with pytest.raises(ValueError, match="'actor-0' is not a participant"):
        await manager.get_or_create(outsider, meta)
    assert list(manager.runs) == ["shuffle-a"]  # the refused spec left nothing behind
    with pytest.raises(ValueError, match="partition column '_partitions' is not in meta"):
        await manager.get_or_create(spec.next_run(run_id=RunId(2)), meta.drop(columns=COLUMN))

    await manager.close_run(spec.shuffle_id, spec.run_id)
    await manager.close_run(spec.shuffle_id, spec.run_id)  # idempotent
    assert run.closed and dict(manager.runs) == {}
    with pytest.raises(ShuffleClosedError, match="already closed on 'actor-0'"):
        await manager.get_or_create(spec, meta)
    with pytest.raises(ShuffleClosedError):
        manager.get_run(spec.shuffle_id, spec.run_id)
    # An abandoned run closed before it was created here stays closed.
    await manager.close_run(spec.shuffle_id, RunId(3))
    with pytest.raises(ShuffleClosedError):
        await manager.get_or_create(spec.next_run(run_id=RunId(3)), meta)
    assert (await manager.get_or_create(spec.next_run(run_id=RunId(4)), meta)).run_id == 4
    await network.close()


async def test_manager_rejects_bad_messages_and_keeps_serving(
    make_network: Callable[..., Network],
) -> None:
    network = make_network(3)
    inputs = make_inputs([20, 20, 20], npartitions_out=6)
    spec = make_spec(network, 6)
    runs = await create_runs(network, spec, inputs[0].iloc[:0])
    receiver = network.managers["actor-1"]  # owns partitions 2 and 3
    table = table_to_buffer(pa.Table.from_pandas(pd.DataFrame({"x": [1]})))

    def message(
        *,
        shuffle_id: str = "shuffle-a",
        run_id: int = 1,
        sender: str = "actor-0",
        partition: int = 2,
    ) -> list[Any]:
        return encode_message(
            shuffle_id=ShuffleId(shuffle_id),
            run_id=RunId(run_id),
            sender=sender,
            shards=[(ShardKey(partition, 0), table)],
        ).frames()

    rejected: list[tuple[list[Any], type[Exception], str]] = [
        (message(shuffle_id="never-created"), UnknownRunError, "does not exist on 'actor-1'"),
        (message(run_id=2), UnknownRunError, "run 2 does not exist"),
        (message(partition=4), FrameError, r"output partitions \[4\].*owns only range\(2, 4\)"),
        (message(partition=6), FrameError, "but the run has 6"),
        (message(sender="intruder"), FrameError, "'intruder' is not a participant"),
        ([b"garbage"], FrameError, "bad magic"),
        ([], FrameError, "no header frame"),
        (message()[:1], FrameError, "announces 1 buffers, the message carries 0"),
    ]
    for frames, error, match in rejected:
        with pytest.raises(error, match=match):
            await receiver.receive(frames)
    assert runs["actor-1"].stats.messages_received == 0
    assert runs["actor-1"].exception is None  # a bad message does not fail the run

    await transfer(network, runs, inputs)
    barrier(runs)
    assert_outputs(unpack(runs, spec), expected_outputs(inputs, 6))
    await receiver.close_run(spec.shuffle_id, spec.run_id)
    with pytest.raises(ShuffleClosedError):
        await receiver.receive(message())
    await network.close()
    with pytest.raises(ShuffleClosedError, match="shuffle manager of 'actor-1' is closed"):
        await receiver.receive(message())
    with pytest.raises(ShuffleClosedError):
        await receiver.get_or_create(spec.next_run(run_id=RunId(9)), inputs[0])


async def test_shards_of_inputs_outside_the_spec_are_refused(
    make_network: Callable[..., Network],
) -> None:
    """A run knows its input count: a shard named by input 999999 of 3 (or a joined piece
    covering one) is refused like any bad frame, and adds nothing to the outputs."""
    network = make_network(2)
    inputs = make_inputs([20, 20, 20], npartitions_out=4)
    spec = dataclasses.replace(make_spec(network, 4), npartitions_in=3)
    runs = await create_runs(network, spec, inputs[0].iloc[:0])
    receiver = network.managers["actor-1"]  # owns partitions 2 and 3
    table = table_to_buffer(pa.Table.from_pandas(inputs[0].iloc[:1]))

    def message(input_partition: int, meta: bytes = b"") -> list[Any]:
        payload = Piece(table, meta, table.size) if meta else table
        return encode_message(
            shuffle_id=spec.shuffle_id,
            run_id=spec.run_id,
            sender="actor-0",
            shards=[(ShardKey(2, input_partition), payload)],
        ).frames()

    with pytest.raises(FrameError, match=r"input partitions \[999999\].*has 3 inputs"):
        await receiver.receive(message(999999))
    with pytest.raises(FrameError, match=r"input partitions \[3\]"):
        await receiver.receive(message(3))
    with pytest.raises(FrameError, match="covers input partition 7, but the run has 3"):
        await receiver.receive(message(1, joined_meta([1, 7], b"")))
    assert runs["actor-1"].stats.messages_received == 0
    assert runs["actor-1"].exception is None

    await transfer(network, runs, inputs)
    barrier(runs)
    assert_outputs(unpack(runs, spec), expected_outputs(inputs, 4))
    await network.close()


def test_spec_validates_its_input_count() -> None:
    spec = ShuffleRunSpec(
        shuffle_id=ShuffleId("s"), run_id=RunId(1), npartitions_out=2, participants=("a",)
    )
    assert spec.inputs_out_of_range([0, 5, 2**32]) == []  # unknown count: unchecked
    spec = dataclasses.replace(spec, npartitions_in=64)
    assert spec.inputs_out_of_range([0, 63, 64, 999999, 64]) == [64, 999999]
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="npartitions_in must be an int >= 1"):
            dataclasses.replace(spec, npartitions_in=bad)


# ---------------------------------------------------------------- failures and closing


@pytest.mark.parametrize("mode", ["direct", "chaos"])
async def test_fail_keeps_the_first_failure_and_close_is_idempotent(
    make_network: Callable[..., Network], mode: Mode
) -> None:
    network = make_network(2, mode=mode, memory_limit=0)
    inputs = make_inputs([30, 30], npartitions_out=4)
    spec = make_spec(network, 4)
    runs = await create_runs(network, spec, inputs[0].iloc[:0])
    await transfer(network, runs, inputs)
    run = runs["actor-0"]
    first, second = ShuffleError("first"), ValueError("second")
    await asyncio.gather(run.fail(first), run.fail(second), run.close())
    assert run.exception is first and run.closed and run.spill_directory is None
    await run.close()
    with pytest.raises(ShuffleError, match="first"):
        run.inputs_done()
    with pytest.raises(ShuffleError, match="first"):
        await run.receive([])
    with pytest.raises(ShuffleError, match="first"):
        run.get_output_partition(0)
    # The manager still routes to the failed run, which reports its failure to senders.
    frames = piece_message(spec, sender="actor-1", key=ShardKey(0, 1), rows=inputs[0].iloc[:1])
    with pytest.raises(ShuffleError, match="first"):
        await network.managers["actor-0"].receive(frames)
    await network.close()


async def test_plain_close_makes_every_method_raise_closed(
    make_network: Callable[..., Network],
) -> None:
    network = make_network(2)
    inputs = make_inputs([10], npartitions_out=2)
    runs = await create_runs(network, make_spec(network, 2), inputs[0].iloc[:0])
    run = runs["actor-1"]
    await run.close()
    await run.fail(RuntimeError("after close"))  # changes nothing
    assert run.exception is None
    with pytest.raises(ShuffleClosedError, match=r"'shuffle-a' run 1 is closed"):
        run.inputs_done()
    with pytest.raises(ShuffleClosedError, match=r"'shuffle-a' run 1 is closed"):
        await run.receive([])
    with pytest.raises(ShuffleClosedError):
        run.get_output_partition(1)
    await network.close()


async def test_back_pressure_then_limiter_timeout(make_network: Callable[..., Network]) -> None:
    # The sender's budget: with the receiver holding every message, the sender waits
    # for room, then gives up with the budget's name; a retry once it drains succeeds.
    network = make_network(2, send_buffer_bytes=100, message_bytes=1, limiter_timeout=0.05)
    network.gate = asyncio.Event()
    inputs = make_inputs([80, 80], npartitions_out=2)
    spec = make_spec(network, 2)
    runs = await create_runs(network, spec, inputs[0].iloc[:0])
    with pytest.raises(LimiterTimeoutError, match="'actor-0-send' stayed full"):
        await network.send_input("actor-0", inputs[0], 0, spec=spec, meta=inputs[0].iloc[:0])
    assert network.waiting.is_set()  # a message was held by the peer meanwhile
    network.gate.set()  # the peer accepts again: the retried input goes through
    await network.send_input("actor-0", inputs[0], 0, spec=spec, meta=inputs[0].iloc[:0])
    barrier(runs)
    assert_outputs([runs["actor-1"].get_output_partition(1)], expected_outputs(inputs[:1], 2)[1:])
    await network.close()


async def test_misuse_is_refused_with_a_message(make_network: Callable[..., Network]) -> None:
    network = make_network(2)
    inputs = make_inputs([10, 10], npartitions_out=4)
    spec = make_spec(network, 4)
    meta = inputs[0].iloc[:0]
    runs = await create_runs(network, spec, meta)
    run = runs["actor-0"]  # owns partitions 0 and 1
    with pytest.raises(RuntimeError, match=r"before inputs_done\(\)"):
        run.get_output_partition(0)

    async def send(df: Any, input_partition: int) -> None:
        await network.send_input("actor-0", df, input_partition, spec=spec, meta=meta)

    with pytest.raises(ValueError, match="has columns"):
        await send(inputs[0].drop(columns="i8"), 0)
    with pytest.raises(ValueError, match=r"int in \[0, 2\*\*32\)"):
        await send(inputs[0], -1)
    with pytest.raises(ValueError, match="and below 4"):
        await send(inputs[0].assign(**{COLUMN: 4}), 0)
    with pytest.raises(TypeError, match="expected a pandas or cuDF DataFrame"):
        await send(inputs[0].to_dict(), 0)
    assert network.sends == 0  # refused before anything was sent
    assert run.exception is None  # bad input is the sender's error, not the run's
    barrier(runs)
    with pytest.raises(ValueError, match="partition 2 belongs to 'actor-1'"):
        run.get_output_partition(2)
    assert run.get_output_partition(0).empty
    await network.close()


def test_unknown_run_error_pickles() -> None:
    error = UnknownRunError("s", 3, "actor-0")
    clone = pickle.loads(pickle.dumps(error))
    assert type(clone) is UnknownRunError and str(clone) == str(error)
    assert isinstance(clone, ShuffleError) and isinstance(clone, LookupError)


def test_run_options_are_validated() -> None:
    with pytest.raises(ValueError, match="memory_limit"):
        RunOptions(memory_limit=-1)
    with pytest.raises(ValueError, match="message_bytes and concurrency"):
        RunOptions(concurrency=0)
    with pytest.raises(ValueError, match="send_buffer_bytes"):
        RunOptions(send_buffer_bytes=0)
    with pytest.raises(ValueError, match="limiter_timeout"):
        RunOptions(limiter_timeout=0)


# ---------------------------------------------------------------- spilling


def _payload_nbytes(frames: Sequence[Any]) -> int:
    return sum(e.nbytes for e in decode_message(frames).header.entries)


async def test_receiving_goes_on_while_the_disk_writes_and_waits_past_the_budget(
    make_network: Callable[..., Network], spill_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = SlowDisk(monkeypatch)
    (frame,) = make_inputs([4000], npartitions_out=2)
    rows = frame[frame[COLUMN] == 0]
    probe = ShuffleRunSpec(
        shuffle_id=ShuffleId("probe"), run_id=RunId(1), npartitions_out=2, participants=("a",)
    )
    big, small = (
        _payload_nbytes(piece_message(probe, sender="actor-0", key=ShardKey(0, 0), rows=r))
        for r in (rows, rows.iloc[:1])
    )
    budget = big + small  # the big piece is past the spill mark, big + small within it
    assert big > budget - budget // 8 and budget < shard_store.MAX_HEADROOM
    network = make_network(1, memory_limit=budget)
    spec = make_spec(network, 2)
    run = (await create_runs(network, spec, frame.iloc[:0]))["actor-0"]
    manager = network.managers["actor-0"]

    def message(partition: int, source: int, piece: pd.DataFrame) -> list[Any]:
        return piece_message(spec, sender="actor-0", key=ShardKey(partition, source), rows=piece)

    await manager.receive(message(0, 0, rows))  # spilling starts, in a thread
    assert await asyncio.to_thread(disk.writing.wait, 30)
    await manager.receive(message(1, 0, rows.iloc[:1]))  # stored while the disk writes
    past = asyncio.ensure_future(manager.receive(message(1, 1, rows.iloc[:1])))
    await asyncio.sleep(0)  # let it store its piece
    assert run.usage().memory_bytes == budget + small and not past.done()
    disk.release.set()
    await past  # acked once the write brought memory back within the budget
    usage = run.usage()
    assert usage.disk_bytes == big and usage.memory_bytes == 2 * small
    run.inputs_done()
    pd.testing.assert_frame_equal(run.get_output_partition(0), rows.drop(columns=COLUMN))
    await network.close()


async def test_a_failed_spill_is_the_waiting_senders_error_and_loses_nothing(
    make_network: Callable[..., Network], monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(*args: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device")

    network = make_network(1, memory_limit=0)
    (frame,) = make_inputs([60], npartitions_out=2)
    spec = make_spec(network, 2)
    run = (await create_runs(network, spec, frame.iloc[:0]))["actor-0"]
    parts = [frame[frame[COLUMN] == p] for p in (0, 1)]
    messages = [
        piece_message(spec, sender="actor-0", key=ShardKey(p, 0), rows=parts[p]) for p in (0, 1)
    ]
    monkeypatch.setattr(SpillFile, "append", disk_full)
    with pytest.raises(OSError, match="No space left"):
        await network.managers["actor-0"].receive(messages[0])
    assert run.usage().memory_bytes > 0 and run.exception is None  # kept, run still open
    monkeypatch.undo()
    await network.managers["actor-0"].receive(messages[1])  # space again: all spills
    assert run.usage().memory_bytes == 0
    run.inputs_done()
    for p in (0, 1):
        pd.testing.assert_frame_equal(run.get_output_partition(p), parts[p].drop(columns=COLUMN))
    await network.close()


async def test_a_sender_waiting_for_the_disk_learns_that_the_run_closed(
    make_network: Callable[..., Network], monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = SlowDisk(monkeypatch)
    network = make_network(1, memory_limit=0)  # every message waits for its write
    (frame,) = make_inputs([60], npartitions_out=2)
    spec = make_spec(network, 2)
    run = (await create_runs(network, spec, frame.iloc[:0]))["actor-0"]
    rows = frame[frame[COLUMN] == 0]
    frames = piece_message(spec, sender="actor-0", key=ShardKey(0, 0), rows=rows)
    waiting = asyncio.ensure_future(network.managers["actor-0"].receive(frames))
    assert await asyncio.to_thread(disk.writing.wait, 30)
    assert not waiting.done()
    disk.release.set()
    await run.close()  # waits for the write in progress, then drops everything
    with pytest.raises(ShuffleClosedError):
        await waiting
    assert run.spill_directory is None
    await network.close()
