"""Pure: how many shuffle actors each node runs, and in which order they take part.

One actor per node makes its process the serial bottleneck of a node's shuffles: it
receives, stores, concatenates and serialises every output partition the node owns.
Several actors per node spread that work over processes, but each costs a process,
a listener and its own messages: every transfer sends one message per actor. On the
project's 2-core VM two actors were slower than one (64 x 16 MiB: 3.2-3.6 s against
3.1-3.5 s; 256 x 1 MiB: 6.0-6.6 s against 4.0-4.6 s), because the senders already
keep both cores busy. ``actors_per_node`` is a positive int, or ``"auto"``: one actor
per ``AUTO_CPUS_PER_ACTOR`` CPUs of the node (Ray's ``CPU`` resource), clamped to
``[1, AUTO_MAX_ACTORS_PER_NODE]``: a node needs more receivers only when it has many
more senders than one receiving process keeps up with (not measured beyond 2 cores).

A node's actors are its *slots* ``(node id, index)``, ``index`` in ``0 .. k-1``. Runs
list participants in slot order (by node, then index), so range sharding
(``_spec.owner_of``) gives each actor a contiguous block of output partitions and
each node the union of its actors' blocks, also contiguous.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import Literal, TypeAlias

__all__ = [
    "AUTO_CPUS_PER_ACTOR",
    "AUTO_MAX_ACTORS_PER_NODE",
    "ActorsPerNode",
    "Slot",
    "actors_on_node",
    "check_actors_per_node",
    "slots",
]

ActorsPerNode: TypeAlias = int | Literal["auto"]
#: ``(node id, index on that node)``: one shuffle actor's place.
Slot: TypeAlias = tuple[str, int]
#: ``"auto"`` runs one actor per this many CPUs of a node (at least one).
AUTO_CPUS_PER_ACTOR = 8
#: ``"auto"`` runs at most this many actors on a node, whatever its CPU count.
AUTO_MAX_ACTORS_PER_NODE = 4


def check_actors_per_node(value: object, *, name: str = "actors_per_node") -> ActorsPerNode:
    """``value`` if it is a positive int or ``"auto"``; else ``ValueError`` naming ``name``."""
    if value == "auto":
        return "auto"
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1 or 'auto', got {value!r}")
    return value


def actors_on_node(setting: ActorsPerNode, *, node_cpus: float) -> int:
    """The actors a node with ``node_cpus`` CPUs (Ray's resource) runs under ``setting``."""
    if setting != "auto":
        return check_actors_per_node(setting)  # type: ignore[return-value]
    cpus = math.floor(node_cpus) if math.isfinite(node_cpus) else 1
    return min(AUTO_MAX_ACTORS_PER_NODE, max(1, cpus // AUTO_CPUS_PER_ACTOR))


def slots(counts: Mapping[str, int], *, lost: Collection[str] = ()) -> list[Slot]:
    """Every node's slots, ``counts[node]`` of them, ordered by node then index; none
    on ``lost`` nodes (gone, though Ray may still report them alive), so the runs
    started next share every output partition among the surviving nodes."""
    return [(node, i) for node in sorted(counts) if node not in lost for i in range(counts[node])]
