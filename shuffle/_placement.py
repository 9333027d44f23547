"""Pure: how many shuffle actors each node runs, and in which order they take part.

One actor per node makes its process the serial bottleneck of a node's shuffles: it
receives, stores, concatenates and serialises every output partition the node owns.
Several actors per node spread that work over processes. ``actors_per_node`` is a
positive int, or ``"auto"``: the node's CPU count (Ray's ``CPU`` resource), clamped to
``[1, AUTO_MAX_ACTORS_PER_NODE]``: beyond a few, more actors cost a process and a
listener each and shrink every actor's memory budget without adding parallelism.

A node's actors are its *slots* ``(node id, index)``, ``index`` in ``0 .. k-1``. Runs
list participants in slot order (by node, then index), so range sharding
(``_spec.owner_of``) gives each actor a contiguous block of output partitions and
each node the union of its actors' blocks, also contiguous.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal, TypeAlias

__all__ = [
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
    return min(AUTO_MAX_ACTORS_PER_NODE, max(1, cpus))


def slots(counts: Mapping[str, int]) -> list[Slot]:
    """Every node's slots, ``counts[node]`` of them, ordered by node then index."""
    return [(node, i) for node in sorted(counts) for i in range(counts[node])]
