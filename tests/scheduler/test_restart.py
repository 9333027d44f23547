"""Tier 1: shuffle restarts in the state machine, asserted on instruction lists (no Ray)."""

from __future__ import annotations

import pickle

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest

from ray_oob_sched import _p2p
from ray_oob_sched._fuse import Group
from ray_oob_sched._restart import RestartLimitError, ShuffleActorLostError, ShuffleTasks
from ray_oob_sched._state import Abandon, Release, RestartShuffles, SchedulerState, Submit
from tests.scheduler.support import graph_of
from tests.scheduler.test_p2p import FakeHandle, FakeService, FakeSpec


def _g(index, keys, inputs=(), outputs=None):
    return Group(index, tuple(keys), tuple(inputs), tuple(keys if outputs is None else outputs), ())


# One shuffle "S" of two inputs (sources d0, d1): transfers t0, t1, barrier b,
# unpacks u0, u1, a merge m of both (requested), and an unrelated group x.
GROUPS = [
    _g(0, ["t0"], ["d0"]),
    _g(1, ["t1"], ["d1"]),
    _g(2, ["b"], ["t0", "t1"]),
    _g(3, ["u0"], ["b"]),
    _g(4, ["u1"], ["b"]),
    _g(5, ["m"], ["u0", "u1"]),
    _g(6, ["x"], ["d2"]),
]
S = {"S": ShuffleTasks(transfers=frozenset({"t0", "t1", "b"}), unpacks=frozenset({"u0", "u1"}))}


def _state(max_restarts=1, max_in_flight=10, groups=GROUPS, shuffles=S):
    return SchedulerState(
        groups,
        outputs={"m", "x"},
        sources={"d0", "d1", "d2"},
        max_in_flight=max_in_flight,
        shuffles=shuffles,
        max_restarts=max_restarts,
    )


def _submits(*indices, groups=GROUPS):
    return [Submit(groups[i]) for i in indices]


def test_without_restarts_keys_go_right_after_their_last_consumer_is_submitted():
    state = _state(max_restarts=0)
    assert state.start() == [
        Submit(GROUPS[0]), Release(("d0",)),
        Submit(GROUPS[1]), Release(("d1",)),
        Submit(GROUPS[2]), Release(("t0", "t1")),
        Submit(GROUPS[3]),
        Submit(GROUPS[4]), Release(("b",)),
        Submit(GROUPS[5]), Release(("u0", "u1")),
        Submit(GROUPS[6]), Release(("d2",)),
    ]  # fmt: skip
    with pytest.raises(RestartLimitError, match="'S' was restarted 0 times"):
        state.restart(["S"])


def test_transfer_inputs_are_held_until_the_shuffle_is_complete():
    state = _state()
    # Only the unrelated group's input goes at submission.
    assert state.start() == [*_submits(0, 1, 2, 3, 4, 5), Submit(GROUPS[6]), Release(("d2",))]
    for i in (0, 1, 2, 6):
        assert state.group_finished(i) == []
    assert state.group_finished(3) == []  # u1 still reads b
    assert state.incomplete_shuffles() == ["S"]
    # The last unpack: b is free, and the shuffle is complete, so are its inputs.
    assert state.group_finished(4) == [Release(("b", "d0", "d1", "t0", "t1"))]
    assert state.incomplete_shuffles() == []
    assert state.group_finished(5) == [Release(("u0", "u1"))]
    assert state.done


def test_restart_during_transfers_reruns_the_shuffle_and_its_readers():
    state = _state()
    state.start()
    state.group_finished(0)
    state.group_finished(6)
    # t1 failed: everything of the shuffle runs again, finished t0 included, and the
    # merge in flight (its inputs will be errors); x is left alone.
    assert state.restart(["S"]) == [
        RestartShuffles(("S",)),
        Abandon((1, 2, 3, 4, 5)),
        *_submits(0, 1, 2, 3, 4, 5),
    ]
    assert state.in_flight == {0, 1, 2, 3, 4, 5} and state.restarts == {"S": 1}
    assert state.view["waiting"] == set() and "x" in state.view["finished"]
    for i in (0, 1, 2, 3):
        assert state.group_finished(i) == []
    assert state.group_finished(4) == [Release(("b", "d0", "d1", "t0", "t1"))]
    assert state.group_finished(5) == [Release(("u0", "u1"))]
    assert state.done


def test_restart_during_unpacks_keeps_the_finished_ones():
    state = _state()
    state.start()
    for i in (0, 1, 2, 3, 6):
        state.group_finished(i)
    assert state.restart(["S"]) == [
        RestartShuffles(("S",)),
        Abandon((4, 5)),  # u0 left the actor already: it and its output stay
        *_submits(0, 1, 2, 4, 5),
    ]
    for i in (0, 1, 2):
        assert state.group_finished(i) == []
    assert state.group_finished(4) == [Release(("b", "d0", "d1", "t0", "t1"))]
    assert state.group_finished(5) == [Release(("u0", "u1"))]
    assert state.done


def test_restarts_are_bounded_per_shuffle_and_a_refusal_changes_nothing():
    state = _state(max_restarts=1)
    state.start()
    state.restart(["S"])
    before = (state.in_flight, dict(state.restarts))
    with pytest.raises(RestartLimitError) as info:
        state.restart(["S"])
    assert (info.value.shuffle_id, info.value.restarts) == ("S", 1)
    assert (state.in_flight, state.restarts) == before


def test_resubmissions_go_first_within_the_window():
    state = _state(max_in_flight=3)
    assert state.start() == _submits(0, 1, 2)
    assert state.group_finished(0) == [Submit(GROUPS[3])]
    # 1, 2, 3 in flight; 0 finished; 4, 5, 6 never submitted, so not abandoned.
    assert state.restart(["S"]) == [
        RestartShuffles(("S",)),
        Abandon((1, 2, 3)),
        *_submits(0, 1, 2),
    ]
    assert state.group_finished(0) == [Submit(GROUPS[3])]
    assert state.group_finished(1) == [Submit(GROUPS[4])]


def test_shuffles_whose_transfers_share_a_group_restart_together():
    groups = [
        _g(0, ["ta", "tb"], ["d0"]),  # transfers of both shuffles, fused
        _g(1, ["ba"], ["ta"]),
        _g(2, ["bb"], ["tb"]),
        _g(3, ["ua"], ["ba"]),
        _g(4, ["ub"], ["bb"]),
    ]
    shuffles = {
        "A": ShuffleTasks(transfers=frozenset({"ta", "ba"}), unpacks=frozenset({"ua"})),
        "B": ShuffleTasks(transfers=frozenset({"tb", "bb"}), unpacks=frozenset({"ub"})),
    }
    state = SchedulerState(
        groups, outputs={"ua", "ub"}, sources={"d0"}, max_in_flight=10,
        shuffles=shuffles, max_restarts=1,
    )  # fmt: skip
    state.start()
    for i in (0, 1, 2, 4):  # B is complete on its own, but shares group 0 with A
        state.group_finished(i)
    assert state.incomplete_shuffles() == ["A", "B"]
    assert state.restart(["A"]) == [
        RestartShuffles(("A", "B")),
        Abandon((3,)),
        *_submits(0, 1, 2, groups=groups),
        Release(("bb",)),  # B's unpack is done: its new barrier output has no reader
        Submit(groups[3]),
    ]
    assert state.restarts == {"A": 1, "B": 1}


def test_only_groups_a_restart_could_rerun_may_restart():
    state = _state()
    assert [i for i in range(7) if state.may_restart(i)] == [0, 1, 2, 3, 4, 5]


def test_which_errors_may_mean_a_lost_shuffle_actor():
    from ray.exceptions import ActorDiedError, RayTaskError

    from ray_oob_sched._executor import may_be_actor_loss
    from shuffle._transport import BrokenTransportError, EndOfStream, TransportUsageError

    assert may_be_actor_loss(ActorDiedError())
    for cause in (BrokenTransportError("reset"), EndOfStream(), TimeoutError("no ack")):
        assert may_be_actor_loss(RayTaskError("transfer", "tb", cause))
    for cause in (KeyError("user"), TransportUsageError("bad address")):
        assert not may_be_actor_loss(RayTaskError("transfer", "tb", cause))
    assert not may_be_actor_loss(ValueError("not from Ray"))


# ------------------------------------------- the rewrite's view of a real dask graph


def _rewrite(collection):
    g = graph_of(collection)
    service = FakeService()
    return _p2p.rewrite(g.nodes, g.dependents, start_run=service.start_run), service


def test_rewrite_names_each_shuffles_tasks_and_replace_run_swaps_the_handle():
    pdf = pd.DataFrame({"k": np.arange(60) % 7, "v": np.arange(60.0)})
    rw, service = _rewrite(dd.from_pandas(pdf, npartitions=4).shuffle("k", shuffle_method="p2p"))
    (old,) = service.started
    (sid,) = rw.transfers
    (barrier,) = [k for k, n in rw.nodes.items() if getattr(n, "func", None) is _p2p._barrier_done]
    assert rw.transfers[sid][-1] == barrier
    assert set(rw.transfers[sid][:-1]) == set(rw.nodes[barrier].dependencies)
    new = FakeHandle(FakeSpec(sid, 9), old.npartitions_out, old.column)
    rw.replace_run(new)
    assert rw.runs == {sid: new} and rw.handles == [old, new]  # both closed at the end
    assert {u.handle for u in rw.unpacks.values()} == {new}
    transfer = rw.nodes[rw.transfers[sid][0]].func
    assert transfer.handles[sid] is new  # what transfer tasks submitted from now on get


def test_an_actor_lost_with_its_node_names_the_node_and_survives_pickling():
    err = ShuffleActorLostError(
        "shuffle-abc", 4, ["shuffle-n2-7"], 1, 1, nodes=["n2full"], lost_nodes=["n2full"]
    )
    text = str(err)
    assert "['shuffle-n2-7'] on node(s) ['n2full']" in text
    assert "(node(s) ['n2full'] left the cluster)" in text
    back = pickle.loads(pickle.dumps(err))
    assert (back.actors, back.nodes, back.lost_nodes) == (err.actors, err.nodes, err.lost_nodes)
    assert str(back) == text
    assert "node(s)" not in str(ShuffleActorLostError("s", 1, ["a"], 0, 0))
