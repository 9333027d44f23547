"""Pure planning: cut the ordered graph into groups, one Ray task per group.

A Ray task costs about a millisecond of scheduling overhead, while most Dask tasks
(a getitem, an add of two small chunks, one level of a tree reduction) cost far
less. Running a run of consecutive tasks of the topological order as one Ray task
pays that overhead once, and the values that never leave the group never enter
Ray's object store.

Groups are cut from the order (less the unfusable keys moved ahead, below) into
two open intervals: tasks that need nothing from a closed group, and tasks that
need something from one (a partial sum of chunks made earlier). Mixed, every group
would wait for the one before it (``(x + x.T).sum()`` ran as one chain of groups on
any number of CPUs); apart, the first kind still run in parallel. An interval that
needs the other open one closes after it, so every edge between groups points
forward and the groups form a DAG whatever the graph. The interval length is set
so that there are at least ``tasks_per_cpu`` groups per cluster CPU (expensive
tasks keep spreading over the cluster) and at most ``max_tasks`` Dask tasks per
group. A full interval's last task that feeds the next task and needs nothing of
the interval moves on with it rather than be cut from it (a shuffle's input and its
transfer: cut, the input would wait in Ray's store until the shuffle ends). Tasks
with different Ray options never share a group; a task marked
unfusable (a shuffle's unpack, an actor call) runs alone, and, when it needs
nothing from the interval being filled, is placed before it instead of cutting it.
Unfusable keys with the same *batch token* placed ahead of one interval share one
group instead (a shuffle's unpacks from one actor: one actor call returns several
output partitions, each still its own object).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass

from ray_oob_sched._graph import Graph, Key


@dataclass(frozen=True, slots=True)
class Group:
    index: int
    keys: tuple[Key, ...]  # in execution order
    inputs: tuple[Key, ...]  # produced by earlier groups or given as sources
    outputs: tuple[Key, ...]  # needed by later groups or requested
    options: Hashable  # token of the Ray options shared by all keys


def group_size(ntasks: int, *, cluster_cpus: float, max_tasks: int, tasks_per_cpu: int) -> int:
    """Dask tasks per group: as large as allowed while keeping the cluster busy."""
    target_groups = max(1, math.ceil(cluster_cpus * tasks_per_cpu))
    return max(1, min(max_tasks, math.ceil(ntasks / target_groups)))


def plan(
    graph: Graph,
    *,
    sources: frozenset[Key],
    size: int,
    options_of: Mapping[Key, Hashable],
    fusable: Callable[[Key], bool] = lambda k: True,
    max_hoisted: int = 8,
    batch_of: Callable[[Key], Hashable | None] = lambda k: None,
    max_batch: int = 1,
) -> list[Group]:
    """Groups covering every key of ``graph`` except ``sources`` (already in Ray).

    An unfusable key that needs nothing from the open interval becomes its group
    *before* that interval closes, so it does not cut it. In dask's order a shuffle's
    unpacks interleave with their consumers (unpack 0, its getitem, unpack 1, ...):
    without this, every consumer would be a Ray task of its own (256 of them in a
    256-partition shuffle) instead of a few groups of ``size``. About
    ``max_hoisted`` keys at most go ahead of one interval: Ray fetches all of a group's
    arguments before it starts, and each is a whole output partition.

    An unfusable key whose ``batch_of`` token (None: none) equals that of a group
    already placed ahead of the open interval joins that group, up to ``max_batch``
    keys, when everything it needs lies in earlier groups; joining still counts
    towards ``max_hoisted``.
    """
    chunks: list[list[Key]] = []
    placed: dict[Key, int] = {}  # key -> index of its chunk (closed chunks only)
    batches: dict[Hashable, int] = {}  # token -> chunk ahead of current it may join
    leaf = _Interval()  # tasks needing nothing from closed chunks
    joined = _Interval()  # tasks needing something from a closed chunk
    hoisted = 0  # keys placed ahead of the open intervals
    current_opts: Hashable = None

    def close(keys: list[Key]) -> int:
        chunks.append(keys)
        placed.update(dict.fromkeys(keys, len(chunks) - 1))
        return len(chunks) - 1

    def close_joined() -> None:
        # Its tasks may need the open leaf interval: that one goes first.
        if joined.needs_any(leaf.members, graph):
            close(leaf.take())
        close(joined.take())

    def close_all() -> None:
        if joined.keys:
            close_joined()
        if leaf.keys:
            close(leaf.take())

    def interval_for(deps: frozenset[Key]) -> _Interval:
        # A task that needs a closed chunk waits for it; kept apart from the tasks
        # that need nothing closed, those still run in parallel with that chunk.
        return leaf if all(d in leaf.members or d in sources for d in deps) else joined

    def place_alone(k: Key) -> None:
        at = close([k])
        token = batch_of(k)
        if token is not None:
            batches[token] = at

    def join_batch(k: Key) -> bool:
        token = batch_of(k)
        at = batches.get(token) if token is not None else None
        if at is None or len(chunks[at]) >= max_batch:
            return False
        if any(placed.get(d, -1) >= at for d in graph.dependencies[k]):
            return False  # k would run before something it needs
        chunks[at].append(k)
        placed[k] = at
        return True

    for k in graph.order:
        if k in sources:
            continue
        opts = options_of.get(k, ())
        deps = graph.dependencies[k]
        if not fusable(k):
            if (
                hoisted < max_hoisted
                and leaf.members.isdisjoint(deps)
                and joined.members.isdisjoint(deps)
            ):
                # Ahead of the open intervals; every edge still points forward.
                if not join_batch(k):
                    place_alone(k)
                hoisted += 1
                continue
            close_all()
            batches.clear()
            place_alone(k)
            hoisted = 1 if max_hoisted else 0  # k feeds the next interval as if hoisted
            continue
        if (leaf.keys or joined.keys) and opts != current_opts:
            close_all()
            batches.clear()  # a batch feeds one interval, as max_hoisted means
            hoisted = 0
        current_opts = opts
        target = interval_for(deps)
        moved = None
        if (
            size > 1
            and len(target.keys) >= size
            and target.keys[-1] in deps
            and target.members.isdisjoint(graph.dependencies[target.keys[-1]])
        ):
            # The full interval's last task feeds k and needs nothing of the interval:
            # it moves on with k. A cut between them would send its value through
            # Ray's store (into a shuffle's transfer: held there until the shuffle
            # ends, for a restart).
            moved = target.pop()
        # Twice at most: a full leaf closes, k joins.
        while len(target.keys) >= size or moved is not None:
            if target is joined:
                close_joined()
                batches.clear()
                hoisted = 0
            else:
                close(leaf.take())
                if not joined.keys:
                    batches.clear()
                    hoisted = 0
            if moved is not None:
                target.add(moved)
                moved = None
            target = interval_for(deps)
        target.add(k)
    close_all()
    return [_make_group(i, keys, graph, options_of) for i, keys in enumerate(chunks)]


class _Interval:
    """An open run of keys that will become one group."""

    def __init__(self) -> None:
        self.keys: list[Key] = []
        self.members: set[Key] = set()

    def add(self, k: Key) -> None:
        self.keys.append(k)
        self.members.add(k)

    def pop(self) -> Key:
        """Remove and return the last key."""
        k = self.keys.pop()
        self.members.discard(k)
        return k

    def take(self) -> list[Key]:
        keys, self.keys, self.members = self.keys, [], set()
        return keys

    def needs_any(self, others: set[Key], graph: Graph) -> bool:
        return any(not others.isdisjoint(graph.dependencies[k]) for k in self.keys)


def _make_group(
    index: int, keys: Sequence[Key], graph: Graph, options_of: Mapping[Key, Hashable]
) -> Group:
    members = set(keys)
    inputs: dict[Key, None] = {}  # ordered set: stable argument order
    outputs: list[Key] = []
    for k in keys:
        for d in graph.dependencies[k]:
            if d not in members:
                inputs[d] = None
        if k in graph.outputs or not graph.dependents[k] <= members:
            outputs.append(k)
    return Group(
        index=index,
        keys=tuple(keys),
        inputs=tuple(inputs),
        outputs=tuple(outputs),
        options=options_of.get(keys[0], ()),
    )
