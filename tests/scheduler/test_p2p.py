"""Tier 1: recognising and rewriting dask's p2p transfer/barrier/unpack graphs (no Ray)."""

from __future__ import annotations

from dataclasses import dataclass

import dask.array as da
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest

from ray_oob_sched import _graph, _p2p
from shuffle._rechunk import RechunkLayout, is_rechunk
from shuffle._spec import owner_of
from tests.scheduler.support import graph_of


@dataclass(frozen=True)
class FakeSpec:
    shuffle_id: str
    run_id: int
    participants: tuple[str, ...] = ("a", "b")
    npartitions_out: int = 4

    def owner_of(self, partition: int) -> str:
        return owner_of(partition, npartitions=self.npartitions_out, participants=self.participants)


@dataclass(eq=False)
class FakeHandle:
    spec: FakeSpec
    npartitions_out: int
    column: str | None
    needed: tuple[int, ...] | None = None
    meta: object = None
    npartitions_in: int | None = None


class FakeService:
    def __init__(self):
        self.started: list[FakeHandle] = []

    def start_run(
        self,
        shuffle_id,
        *,
        npartitions_out,
        meta,
        column=None,
        drop_column=None,
        needed=None,
        npartitions_in=None,
    ):
        if is_rechunk(meta):
            assert column is None and npartitions_out == meta.npartitions_out
        else:
            assert column in meta.columns and drop_column
        spec = FakeSpec(shuffle_id, len(self.started) + 1, npartitions_out=npartitions_out)
        h = FakeHandle(spec, npartitions_out, column, None if needed is None else tuple(needed))
        h.meta = meta
        h.npartitions_in = npartitions_in
        self.started.append(h)
        return h


def _frame(n=100, parts=4):
    pdf = pd.DataFrame({"k": np.arange(n) % 7, "v": np.arange(n, dtype=float)})
    return dd.from_pandas(pdf, npartitions=parts)


def test_graph_without_p2p_is_left_alone():
    g = graph_of(_frame().shuffle("k", shuffle_method="tasks"))
    service = FakeService()
    assert _p2p.rewrite(g.nodes, g.dependents, start_run=service.start_run) is None
    assert not service.started


def test_shuffle_becomes_transfers_barrier_and_actor_unpacks():
    g = graph_of(_frame(parts=4).shuffle("k", shuffle_method="p2p", npartitions=3))
    service = FakeService()
    rw = _p2p.rewrite(g.nodes, g.dependents, start_run=service.start_run)
    (handle,) = service.started
    assert rw.handles == [handle] and handle.npartitions_out == 3
    assert handle.needed is None  # every output is asked for
    assert sorted(u.partition for u in rw.unpacks.values()) == [0, 1, 2]
    assert all(u.handle is handle for u in rw.unpacks.values())
    (barrier,) = _p2p.p2p_barriers(g.nodes)
    new_barrier = rw.nodes[barrier]
    assert new_barrier.func is _p2p._barrier_done
    assert len(new_barrier.dependencies) == 4  # one transfer per input partition
    # ... numbered 0..3, which actors check shards against.
    assert handle.npartitions_in == 4
    assert sorted(g.nodes[t].args[2] for t in new_barrier.dependencies) == [0, 1, 2, 3]
    for t in new_barrier.dependencies:
        assert isinstance(rw.nodes[t].func, _p2p._Transfer)
    # The rewritten graph is complete and valid; the unpacks depend on the barrier.
    new = _graph.build(rw.nodes, list(g.outputs))
    for u in rw.unpacks:
        assert new.dependencies[u] == {barrier}
    assert not _p2p.p2p_barriers(rw.nodes)


def test_unpacks_share_a_batch_token_per_shuffle_and_owning_actor():
    g = graph_of(_frame(parts=4).shuffle("k", shuffle_method="p2p", npartitions=6))
    rw = _p2p.rewrite(g.nodes, g.dependents, start_run=FakeService().start_run)
    (handle,) = rw.handles
    by_partition = {u.partition: rw.batch_of(k) for k, u in rw.unpacks.items()}
    sid = str(handle.spec.shuffle_id)
    # Range sharding over participants a, b: partitions 0-2 on a, 3-5 on b.
    assert by_partition == {p: (sid, "a" if p < 3 else "b") for p in range(6)}
    (barrier,) = _p2p.p2p_barriers(g.nodes)
    assert rw.batch_of(barrier) is None  # only unpacks batch


def _unpack(partition, *, participants, sid="s"):
    spec = FakeSpec(sid, 1, participants=participants, npartitions_out=8)
    return _p2p.Unpack(FakeHandle(spec, 8, None), partition)


def test_unpack_calls_ask_each_owner_for_its_partitions_in_order():
    # Planned on one owner; a restart on four actors spreads partitions 0, 1, 5 over two.
    batch = [_unpack(p, participants=("a", "b", "c", "d")) for p in (5, 0, 1)]
    assert _p2p.unpack_calls(batch) == [("c", [0]), ("a", [1, 2])]
    same = [_unpack(p, participants=("a",)) for p in (3, 4)]
    assert _p2p.unpack_calls(same) == [("a", [0, 1])]
    with pytest.raises(ValueError, match="one shuffle"):
        _p2p.unpack_calls([same[0], _unpack(1, participants=("a",), sid="t")])


def test_unpack_calls_return_at_most_max_bytes_of_estimated_outputs_each():
    batch = [_unpack(p, participants=("a",)) for p in range(5)]
    # 8 outputs share 80 bytes of inputs: 10 each, so 25 bytes allow 2 per call.
    assert _p2p.unpack_calls(batch, inputs_nbytes=80, max_bytes=25) == [
        ("a", [0, 1]),
        ("a", [2, 3]),
        ("a", [4]),
    ]
    # Outputs larger than max_bytes (or max_bytes 0) go one per call.
    assert _p2p.unpack_calls(batch, inputs_nbytes=8000, max_bytes=25) == [
        ("a", [i]) for i in range(5)
    ]
    assert _p2p.unpack_calls(batch, inputs_nbytes=80, max_bytes=0) == [("a", [i]) for i in range(5)]
    # Small outputs (or no inputs at all): the planned batch, one call per owner.
    assert _p2p.unpack_calls(batch, inputs_nbytes=80, max_bytes=1000) == [("a", list(range(5)))]
    assert _p2p.unpack_calls(batch, inputs_nbytes=0, max_bytes=25) == [("a", list(range(5)))]


def test_transfers_return_their_inputs_bytes_and_the_barrier_sums_them():
    g = graph_of(_frame(parts=4).shuffle("k", shuffle_method="p2p", npartitions=6))
    rw = _p2p.rewrite(g.nodes, g.dependents, start_run=FakeService().start_run)
    (barrier,) = _p2p.p2p_barriers(g.nodes)
    assert rw.nodes[barrier](dict.fromkeys(rw.nodes[barrier].dependencies, 5)) == 20


def test_selected_output_partitions_unpack_and_receive_only_those():
    lazy = _frame(parts=4).shuffle("k", shuffle_method="p2p", npartitions=4).partitions[[3, 1]]
    g = graph_of(lazy)
    service = FakeService()
    rw = _p2p.rewrite(g.nodes, g.dependents, start_run=service.start_run)
    assert sorted(u.partition for u in rw.unpacks.values()) == [1, 3]
    (handle,) = service.started
    assert handle.needed == (1, 3)  # senders drop the rows of partitions 0 and 2
    assert handle.npartitions_in == 4  # every input still sends


def test_selected_merge_outputs_are_the_needed_ones_of_both_sides():
    left = _frame(parts=3)
    right = dd.from_pandas(pd.DataFrame({"k": range(7), "w": range(7)}), npartitions=2)
    merged = left.merge(right, on="k", shuffle_method="p2p", broadcast=False, npartitions=5)
    service = FakeService()
    # Not merged.partitions[[0, 4]]: dask 2026.8's HashJoinP2P names filtered outputs
    # by partition number, which no scheduler can run (distributed's neither).
    delayed = merged.to_delayed()
    g = graph_of(delayed[0], delayed[4])
    _p2p.rewrite(g.nodes, g.dependents, start_run=service.start_run)
    assert [h.needed for h in service.started] == [(0, 4), (0, 4)]


def test_merge_unpacks_both_sides_then_merges():
    left = _frame(parts=3)
    right = dd.from_pandas(pd.DataFrame({"k": range(7), "w": range(7)}), npartitions=2)
    g = graph_of(left.merge(right, on="k", shuffle_method="p2p", broadcast=False))
    service = FakeService()
    rw = _p2p.rewrite(g.nodes, g.dependents, start_run=service.start_run)
    assert len(service.started) == 2
    assert sorted(h.npartitions_in for h in service.started) == [2, 3]
    merges = [k for k, n in rw.nodes.items() if getattr(n, "func", None) is _p2p._merge_unpacked]
    assert merges
    for m in merges:
        sides = rw.nodes[m].dependencies
        assert len(sides) == 2 and all(s in rw.unpacks for s in sides)
        assert {rw.unpacks[s].handle for s in sides} == set(service.started)
    for b in _p2p.p2p_barriers(g.nodes):
        for t in rw.nodes[b].dependencies:
            fn = rw.nodes[t].func
            assert fn.__code__ is g.nodes[t].func.__code__ and fn is not g.nodes[t].func


def test_a_self_merge_unpacks_each_output_partition_once():
    df = _frame(parts=2)
    g = graph_of(df.merge(df, left_on=("k",), right_on=("k",), shuffle_method="p2p"))
    service = FakeService()
    rw = _p2p.rewrite(g.nodes, g.dependents, start_run=service.start_run)
    assert len(service.started) == 1  # both sides are one shuffle of the same frame
    merges = [k for k, n in rw.nodes.items() if getattr(n, "func", None) is _p2p._merge_unpacked]
    assert merges
    for m in merges:
        (side,) = rw.nodes[m].dependencies  # read twice, unpacked once
        assert side in rw.unpacks
    partitions = [u.partition for u in rw.unpacks.values()]
    assert len(partitions) == len(set(partitions)) == len(merges)


def test_p2p_rechunk_becomes_a_run_per_stage_with_flat_chunk_numbers():
    x = da.ones((40, 30), chunks=(40, 3)).rechunk((4, 30), method="p2p")
    g = graph_of(x)
    service = FakeService()
    rw = _p2p.rewrite(g.nodes, g.dependents, start_run=service.start_run)
    (handle,) = service.started
    layout = handle.meta
    assert isinstance(layout, RechunkLayout)
    assert layout.new == ((4,) * 10, (30,))  # dask may pre-merge the inputs (its "prechunking")
    # Unpacks name every output chunk once, by its flat (row-major) number.
    assert sorted(u.partition for u in rw.unpacks.values()) == list(range(10))
    (barrier,) = _p2p.p2p_barriers(g.nodes)
    transfers = rw.nodes[barrier].dependencies
    assert len(transfers) == layout.npartitions_in == handle.npartitions_in
    assert all(isinstance(rw.nodes[t].func, _p2p._Transfer) for t in transfers)
    assert not _p2p.p2p_barriers(rw.nodes)


def test_unknown_p2p_shapes_are_refused_before_any_run_starts():
    x = da.ones((40, 40), chunks=(40, 4)).rechunk((4, 40), method="p2p")
    g = graph_of(x)
    (barrier,) = _p2p.p2p_barriers(g.nodes)
    t = next(iter(g.nodes[barrier].dependencies))
    nodes = dict(g.nodes)
    nodes[t] = type(nodes[t])(t, print, *nodes[t].args)  # a transfer dask never emits
    service = FakeService()
    with pytest.raises(_p2p.UnsupportedGraphError, match=r"transfer calling .*distributed 20"):
        _p2p.rewrite(nodes, g.dependents, start_run=service.start_run)
    assert not service.started


@dataclass(eq=False)
class RoutedHandle:
    spec: FakeSpec
    meta: object
    options: object


@pytest.mark.parametrize(
    "in_group, combine_bytes, meta, index, expected",
    [
        (True, 1 << 20, pd.DataFrame({"k": []}), 3, "batch"),
        (False, 1 << 20, pd.DataFrame({"k": []}), 3, "alone"),  # no group, no one to flush
        (True, 0, pd.DataFrame({"k": []}), 3, "alone"),  # combining switched off
        (True, 1 << 20, RechunkLayout(((2, 2),), ((4,),)), (1,), "alone"),  # array chunks
    ],
)
def test_transfers_in_a_group_are_staged_for_its_end_unless_they_cannot_be(
    monkeypatch, in_group, combine_bytes, meta, index, expected
):
    import shuffle.shell._transfer as transfer_module
    from ray_oob_sched._worker import GroupSpec, run_group
    from shuffle._options import RunOptions

    calls: list = []

    class FakeBatch:
        def __init__(self, handle):
            self.handle = handle

        def add(self, df, i):
            calls.append(("batch", i))
            return i

        def finish(self):
            calls.append(("finish",))

    monkeypatch.setattr(transfer_module, "InputBatch", FakeBatch)
    monkeypatch.setattr(
        transfer_module, "transfer", lambda df, h, i: calls.append(("alone", i)) or 7
    )
    handle = RoutedHandle(FakeSpec("s", 1), meta, RunOptions(combine_bytes=combine_bytes))
    call = _p2p._Transfer({"s": handle})
    if in_group:
        from dask._task_spec import Task

        spec = GroupSpec(("t",), (Task("t", call, "df", "s", index),), (), ("t",))
        run_group(spec, ())
    else:
        call("df", "s", index)
    assert calls[0][0] == expected
    if expected == "batch":
        assert calls == [("batch", 3), ("finish",)]  # finished at the group's end
