from __future__ import annotations

import pickle
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shuffle._exceptions import (
    BufferClosedError,
    FrameError,
    LimiterTimeoutError,
    ShuffleClosedError,
    ShuffleError,
    StaleRunError,
)
from shuffle._ids import RunId, RunIdMinter, ShardKey, ShuffleId
from shuffle._spec import ShuffleRunSpec, owner_of, partitions_of


def make_spec(**overrides: object) -> ShuffleRunSpec:
    fields: dict[str, object] = {
        "shuffle_id": ShuffleId("shuffle-abc"),
        "run_id": RunId(3),
        "npartitions_out": 10,
        "participants": ("a", "b", "c"),
    }
    return ShuffleRunSpec(**{**fields, **overrides})  # type: ignore[arg-type]


def test_run_id_minter_is_strictly_increasing() -> None:
    mint = RunIdMinter()
    assert [mint() for _ in range(4)] == [1, 2, 3, 4]
    assert RunIdMinter(start=7)() == 7


def test_run_id_minter_never_repeats_across_threads() -> None:
    mint = RunIdMinter()
    minted: list[list[int]] = [[] for _ in range(4)]

    def work(out: list[int]) -> None:
        out.extend(mint() for _ in range(500))

    threads = [threading.Thread(target=work, args=(out,)) for out in minted]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    everything = [i for out in minted for i in out]
    assert sorted(everything) == list(range(1, 2001))
    assert all(out == sorted(out) for out in minted)


def test_run_id_minter_rejects_start_below_one() -> None:
    with pytest.raises(ValueError, match="start at 1"):
        RunIdMinter(start=0)


def test_shard_key_is_a_named_pair() -> None:
    key = ShardKey(output_partition=4, input_partition=1)
    assert key == (4, 1)
    assert key.output_partition == 4 and key.input_partition == 1


@pytest.mark.parametrize(
    ("npartitions", "nparticipants", "expected"),
    [
        (10, 3, [range(4), range(4, 7), range(7, 10)]),
        (9, 3, [range(3), range(3, 6), range(6, 9)]),
        (1, 1, [range(1)]),
        (2, 4, [range(1), range(1, 1), range(1, 2), range(2, 2)]),
        (5, 1, [range(5)]),
    ],
)
def test_partitions_of_known_layouts(
    npartitions: int, nparticipants: int, expected: list[range]
) -> None:
    participants = [f"actor-{i}" for i in range(nparticipants)]
    got = [
        partitions_of(p, npartitions=npartitions, participants=participants) for p in participants
    ]
    assert got == expected


@given(npartitions=st.integers(1, 400), nparticipants=st.integers(1, 40))
def test_owner_of_and_partitions_of_are_inverse_balanced_blocks(
    npartitions: int, nparticipants: int
) -> None:
    participants = tuple(f"actor-{i}" for i in range(nparticipants))
    blocks = [
        partitions_of(p, npartitions=npartitions, participants=participants) for p in participants
    ]
    # Contiguous blocks, in participant order, covering every partition exactly once.
    assert [p for block in blocks for p in block] == list(range(npartitions))
    assert max(map(len, blocks)) - min(map(len, blocks)) <= 1
    for participant, block in zip(participants, blocks, strict=True):
        for partition in block:
            assert (
                owner_of(partition, npartitions=npartitions, participants=participants)
                == participant
            )


@pytest.mark.parametrize("partition", [-1, 10, 11])
def test_owner_of_rejects_out_of_range_partitions(partition: int) -> None:
    with pytest.raises(ValueError, match=f"partition {partition} is out of range for 10"):
        owner_of(partition, npartitions=10, participants=["a"])


def test_partitions_of_rejects_strangers() -> None:
    with pytest.raises(ValueError, match="'z' is not a participant"):
        partitions_of("z", npartitions=10, participants=["a", "b"])


def test_spec_methods_agree_with_functions() -> None:
    spec = make_spec(participants=["a", "b", "c"])
    assert spec.participants == ("a", "b", "c")  # stored as a tuple
    assert hash(spec) == hash(make_spec())
    assert [spec.owner_of(p) for p in range(10)] == list("aaaabbbccc")
    assert spec.partitions_of("b") == range(4, 7)
    assert spec.column == "_partitions" and spec.drop_column


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"shuffle_id": ""}, "shuffle_id must be a non-empty str"),
        ({"run_id": 0}, "run_id must be an int >= 1"),
        ({"run_id": True}, "run_id must be an int >= 1"),
        ({"npartitions_out": 0}, "npartitions_out must be >= 1"),
        ({"participants": ()}, "at least one participant"),
        ({"participants": ("a", "b", "a")}, "participants must be unique"),
        ({"needed": (3, 10)}, r"needed output partitions \(3, 10\) must lie in \[0, 10\)"),
        ({"needed": (-1,)}, r"needed output partitions \(-1,\) must lie in"),
    ],
)
def test_spec_rejects_invalid_fields(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_spec(**overrides)


def test_spec_stores_needed_partitions_sorted_and_unique() -> None:
    assert make_spec().needed is None
    assert make_spec(needed=[7, 2, 7]).needed == (2, 7)
    assert make_spec(needed=()).needed == ()  # nothing asked for: every row is dropped


def test_spec_is_frozen() -> None:
    spec = make_spec()
    with pytest.raises(AttributeError):
        spec.run_id = RunId(4)  # type: ignore[misc]


def test_check_run_id_accepts_own_run() -> None:
    make_spec(run_id=RunId(3)).check_run_id(3)


@pytest.mark.parametrize(("incoming", "old", "new"), [(2, 2, 3), (5, 3, 5)])
def test_check_run_id_names_the_stale_run(incoming: int, old: int, new: int) -> None:
    with pytest.raises(StaleRunError) as info:
        make_spec(run_id=RunId(3)).check_run_id(incoming)
    assert (info.value.shuffle_id, info.value.run_id, info.value.current_run_id) == (
        "shuffle-abc",
        old,
        new,
    )
    assert f"run {old} is stale, run {new} superseded it" in str(info.value)


def test_next_run_moves_forward_only() -> None:
    spec = make_spec(run_id=RunId(3))
    restarted = spec.next_run(run_id=RunId(4), participants=["a", "c"])
    assert (restarted.run_id, restarted.participants) == (4, ("a", "c"))
    assert restarted.npartitions_out == spec.npartitions_out
    assert spec.next_run(run_id=RunId(9)).participants == spec.participants
    with pytest.raises(ValueError, match="run id above 3, got 3"):
        spec.next_run(run_id=RunId(3))


@pytest.mark.parametrize(
    ("error", "fragments"),
    [
        (StaleRunError("sh-1", 2, 5), ["'sh-1'", "run 2", "run 5", "redo it"]),
        (ShuffleClosedError("sh-1", 4, "barrier passed"), ["'sh-1'", "run 4", "barrier"]),
        (ShuffleClosedError("sh-1", 4), ["'sh-1' run 4 is closed and", "restart"]),
        (FrameError("bad magic"), ["malformed shuffle frame: bad magic", "version"]),
        (LimiterTimeoutError("comms", 1.5, 300, 200), ["'comms'", "1.5 s", "300", "200"]),
        (BufferClosedError("buffer-x"), ["'buffer-x' is closed", "new run"]),
    ],
)
def test_errors_explain_themselves_and_survive_pickling(
    error: ShuffleError, fragments: list[str]
) -> None:
    for fragment in fragments:
        assert fragment in str(error)
    clone = pickle.loads(pickle.dumps(error))  # Ray ships errors between processes
    assert type(clone) is type(error)
    assert str(clone) == str(error) and clone.args == error.args
    assert isinstance(clone, ShuffleError)


def test_errors_fit_builtin_hierarchies() -> None:
    assert isinstance(FrameError("x"), ValueError)
    assert isinstance(LimiterTimeoutError("x", 1, 1, 1), TimeoutError)
