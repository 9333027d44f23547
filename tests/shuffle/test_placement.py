"""Tier 1: how many shuffle actors a node runs, their order, and their memory share."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shuffle._options import AUTO_MEMORY_FRACTION, RunOptions, auto_memory_limit
from shuffle._spec import partitions_of
from shuffle.shell._placement import (
    AUTO_CPUS_PER_ACTOR,
    AUTO_MAX_ACTORS_PER_NODE,
    actors_on_node,
    check_actors_per_node,
    slots,
)


@pytest.mark.parametrize(
    ("cpus", "expected"),
    [(0, 1), (0.5, 1), (2, 1), (15.9, 1), (16, 2), (24, 3), (32, 4), (40, 4), (256, 4)],
)
def test_auto_is_one_actor_per_8_cpus_clamped_to_one_to_four(cpus: float, expected: int) -> None:
    assert (AUTO_CPUS_PER_ACTOR, AUTO_MAX_ACTORS_PER_NODE) == (8, 4)
    assert actors_on_node("auto", node_cpus=cpus) == expected


@pytest.mark.parametrize("setting", [1, 3, 7])
def test_a_number_is_taken_whatever_the_cpus(setting: int) -> None:
    assert actors_on_node(setting, node_cpus=0) == setting
    assert actors_on_node(setting, node_cpus=64) == setting


@pytest.mark.parametrize("bad", [0, -2, 1.5, "2", "many", True, None])
def test_bad_values_are_refused_naming_the_setting(bad: Any) -> None:
    with pytest.raises(ValueError, match=r"actors-per-node must be an integer >= 1 or 'auto'"):
        check_actors_per_node(bad, name="actors-per-node")
    with pytest.raises(ValueError, match="actors_per_node"):
        actors_on_node(bad, node_cpus=2)


def test_slots_are_ordered_by_node_then_index() -> None:
    assert slots({"n2": 1, "n1": 3}) == [("n1", 0), ("n1", 1), ("n1", 2), ("n2", 0)]
    assert slots({}) == []


@given(
    counts=st.dictionaries(st.sampled_from("abcdef"), st.integers(1, 4), min_size=2),
    data=st.data(),
    npartitions=st.integers(1, 200),
)
def test_a_lost_node_has_no_slots_and_the_survivors_own_every_partition(
    counts: dict[str, int], data: st.DataObject, npartitions: int
) -> None:
    """Ray may report a lost node alive for a while: its slots go all the same, and
    the next run's participants, the surviving nodes' actors, own every partition."""
    lost = data.draw(st.sets(st.sampled_from(sorted(counts)), max_size=len(counts) - 1))
    order = slots(counts, lost=lost)
    assert order == [s for s in slots(counts) if s[0] not in lost]
    assert {node for node, _ in order} == set(counts) - lost
    participants = [f"{node}.{i}" for node, i in order]
    owned = [
        p
        for name in participants
        for p in partitions_of(name, npartitions=npartitions, participants=participants)
    ]
    assert owned == list(range(npartitions))


@given(
    counts=st.dictionaries(st.sampled_from("abcdef"), st.integers(1, 4), min_size=1),
    npartitions=st.integers(1, 200),
)
def test_every_actor_and_every_node_owns_one_contiguous_block(
    counts: dict[str, int], npartitions: int
) -> None:
    order = slots(counts)
    participants = [f"{node}.{i}" for node, i in order]
    blocks = [
        partitions_of(p, npartitions=npartitions, participants=participants) for p in participants
    ]
    # Blocks follow each other in slot order and cover every partition once...
    assert [p for block in blocks for p in block] == list(range(npartitions))
    # ... and a node's actors are adjacent, so the node's partitions are contiguous too.
    nodes = [node for node, _ in order]
    assert nodes == sorted(nodes)


def test_an_auto_memory_limit_is_split_among_the_actors_of_a_node() -> None:
    pytest.importorskip("ray")
    from shuffle.shell._actor import ShuffleActor, resolve_memory_limit

    auto = RunOptions(memory_limit="auto", message_bytes=1000)
    for k in (1, 2, 4):
        resolved = resolve_memory_limit(auto, actors_on_node=k)
        assert resolved.memory_limit == auto_memory_limit(AUTO_MEMORY_FRACTION / k)
        assert resolved.message_bytes == 1000  # everything else unchanged
    fixed = RunOptions(memory_limit=12345)
    assert resolve_memory_limit(fixed, actors_on_node=4) is fixed  # only "auto" is shared
    with pytest.raises(ValueError, match="actors_on_node must be an int >= 1"):
        resolve_memory_limit(auto, actors_on_node=0)

    # The actor resolves it once, in its own process (on its node), for all its runs.
    actor = ShuffleActor(
        name="a0",
        secret=b"s" * 32,
        transport="tcp",
        host="127.0.0.1",
        options=auto,
        actors_on_node=2,
    )
    assert actor.options.memory_limit == auto_memory_limit(AUTO_MEMORY_FRACTION / 2)
    assert actor._manager.options.memory_limit == actor.options.memory_limit


def test_the_service_tells_each_actor_how_many_share_its_node(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip("ray")
    from shuffle.shell import _service

    created: list[dict[str, Any]] = []
    monkeypatch.setattr(
        _service, "create_shuffle_actor", lambda **kwargs: created.append(kwargs) or object()
    )
    service = _service.ShuffleService(actors_per_node=3)
    assert service.actors_per_node == 3
    service._node_actors = {"big": 3, "small": 1}
    names = [service._create(node, "10.0.0.1")[0] for node in ("big", "big", "small", "big")]
    assert [c["actors_on_node"] for c in created] == [3, 3, 1, 3]
    assert len(set(names)) == len(names)  # every actor, re-created ones too, has a new name
    service._closed = True  # nothing was started


@pytest.mark.parametrize("bad", [0, "2", 2.0, "lots"])
def test_the_service_refuses_a_bad_actors_per_node(bad: Any) -> None:
    pytest.importorskip("ray")
    from shuffle.shell._service import ShuffleService

    with pytest.raises(ValueError, match="actors_per_node must be an integer >= 1 or 'auto'"):
        ShuffleService(actors_per_node=bad)
