"""Pure: shuffle progress as the compute loop feeds it, and the status and totals
built from it and the usage actors report."""

from __future__ import annotations

import dataclasses

import pytest

from ray_oob_sched._status import ShuffleProgress, run_status, run_totals
from shuffle._exceptions import (
    FrameError,
    ShuffleClosedError,
    StaleRunError,
    UnknownRunError,
)
from shuffle._usage import ParticipantCounters, RunUsage, refusal_reason


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def usage(participant: str, *, shuffle_id: str = "s", run_id: int = 1, **counts: int) -> RunUsage:
    fields = dict.fromkeys(
        (
            "messages_received",
            "pieces_received",
            "bytes_received",
            "memory_bytes",
            "disk_bytes",
            "device_bytes",
            "bytes_spilled",
            "bytes_read_back",
        ),
        0,
    )
    fields.update(counts)
    return RunUsage(
        shuffle_id=shuffle_id,
        run_id=run_id,
        kind="shuffle",
        participant=participant,
        seconds=1.0,
        **fields,
    )


def progress(clock: Clock) -> ShuffleProgress:
    return ShuffleProgress(
        transfers={"s": [("t", 0), ("t", 1), ("t", 2)], "r": [("rt", 0)]},
        unpacks={"s": [("u", 0), ("u", 1)]},
        clock=clock,
    )


def test_progress_counts_finished_transfers_and_unpacks_per_shuffle() -> None:
    clock = Clock()
    p = progress(clock)
    p.finished([("t", 0), ("other", 0), ("t", 2)])  # one group: two transfers, a plain task
    p.finished([("u", 1)])
    snap = p.snapshot()
    assert (snap["s"].inputs_received, snap["s"].inputs_expected) == (2, 3)
    assert (snap["s"].outputs_done, snap["s"].outputs_expected) == (1, 2)
    assert (snap["r"].inputs_received, snap["r"].inputs_expected) == (0, 1)
    assert (snap["r"].outputs_done, snap["r"].outputs_expected) == (0, 0)


def test_a_restart_sends_inputs_again_and_restarts_the_clock() -> None:
    clock = Clock()
    p = progress(clock)
    p.finished([("t", 0), ("t", 1), ("u", 0)])
    clock.now = 105.0
    p.restarted("s")
    snap = p.snapshot()["s"]
    assert (snap.inputs_received, snap.outputs_done, snap.restarts) == (0, 1, 1)
    assert snap.started == 105.0
    assert p.snapshot()["r"].restarts == 0


def test_run_status_keeps_its_own_runs_usage_only() -> None:
    clock = Clock()
    p = progress(clock)
    p.finished([("t", 1)])
    usages = [
        usage("b", bytes_received=30, pieces_received=3, memory_bytes=10, disk_bytes=20),
        usage("a", bytes_received=5, pieces_received=1, memory_bytes=5),
        usage("a", run_id=0, bytes_received=999),  # an older run of the same shuffle
        usage("a", shuffle_id="r", bytes_received=999),
    ]
    status = run_status(
        p.snapshot()["s"],
        shuffle_id="s",
        run_id=1,
        kind="shuffle",
        usages=usages,
        node_of={"a": "n1", "b": "n2"},
        now=clock.now + 2.5,
    )
    assert [(a.actor, a.node_id, a.pieces_received) for a in status.actors] == [
        ("a", "n1", 1),
        ("b", "n2", 3),
    ]
    assert (status.bytes_received, status.memory_bytes, status.disk_bytes) == (35, 15, 20)
    assert (status.inputs_received, status.inputs_expected, status.elapsed) == (1, 3, 2.5)


def test_run_totals_sum_the_final_usage_and_give_a_rate() -> None:
    p = progress(Clock())
    totals = run_totals(
        p.snapshot()["s"],
        shuffle_id="s",
        run_id=1,
        kind="shuffle",
        usages=[
            usage("a", bytes_received=3 * 10**9, pieces_received=7, bytes_spilled=100),
            usage("b", bytes_received=10**9, pieces_received=1, bytes_read_back=40),
            usage("b", run_id=2, bytes_received=10**9),
        ],
        seconds=2.0,
    )
    assert (totals.inputs, totals.outputs, totals.pieces_received) == (3, 2, 8)
    assert (totals.bytes_spilled, totals.bytes_read_back) == (100, 40)
    assert totals.gb_per_s == pytest.approx(2.0)
    empty = run_totals(
        p.snapshot()["r"], shuffle_id="r", run_id=1, kind="rechunk", usages=[], seconds=0.0
    )
    assert (empty.spill_seconds, empty.receive_seconds) == (0.0, 0.0)
    assert (empty.kind, empty.bytes_received, empty.gb_per_s) == ("rechunk", 0, 0.0)


def test_participant_counters_add_and_report_growth() -> None:
    before = ParticipantCounters(runs_opened=1, bytes_received=10)
    now = before + ParticipantCounters.of_runs([usage("a", bytes_received=5, pieces_received=2)])
    assert now == ParticipantCounters(runs_opened=1, bytes_received=15, pieces_received=2)
    assert now.deltas(before) == {"bytes_received": 5, "pieces_received": 2}
    assert now.deltas(now) == {}


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (StaleRunError("s", 1, 2), "stale_run"),
        (UnknownRunError("s", 3, "a"), "unknown_run"),
        (ShuffleClosedError("s", 1), "closed_run"),
        (FrameError("bad magic"), "frame"),
        (OSError("disk full"), "other"),
    ],
)
def test_refusals_have_a_bounded_reason(error: Exception, reason: str) -> None:
    assert refusal_reason(error) == reason


def test_run_totals_add_the_actors_disk_and_unpack_seconds_and_take_the_last_receive() -> None:
    def timed(participant: str, **seconds: float) -> RunUsage:
        return dataclasses.replace(usage(participant), **seconds)

    totals = run_totals(
        progress(Clock()).snapshot()["s"],
        shuffle_id="s",
        run_id=1,
        kind="shuffle",
        usages=[
            timed("a", spill_seconds=1.5, read_back_seconds=0.5, receive_seconds=4.0),
            timed("b", spill_seconds=2.0, receive_seconds=6.0, unpack_seconds=3.0),
            dataclasses.replace(usage("b", run_id=2), spill_seconds=100.0),  # another run
        ],
        seconds=8.0,
    )
    assert (totals.spill_seconds, totals.read_back_seconds) == (3.5, 0.5)
    # the receive phase ends with the last actor's last message
    assert (totals.receive_seconds, totals.unpack_seconds) == (6.0, 3.0)
