"""Pure: what a shuffle restart re-runs, and which groups must keep their inputs.

A shuffle actor that dies mid-run takes the shards it received with it. The shell
starts a new run of the shuffle (a new run id, which supersedes the old run on every
actor) and the state machine submits again:

- every submitted group with a transfer or barrier task of the shuffle, finished
  ones too: what they sent is gone;
- the shuffle's unpack groups not finished yet (finished unpacks' partitions have
  left the actors already, as objects owned by the driver);
- every group in flight that consumes an output of an unfinished group above, and
  so on: its input is (or will be) an error.

Groups not submitted yet need nothing: they are submitted later, with the new run.
Shuffles whose transfer or barrier tasks share a group (fusion puts them together,
e.g. both sides of a merge) form one *component*: re-running such a group sends to
all of them, so they restart together.

For a group to be submitted again its inputs must still be in Ray, while the
scheduler normally drops a ref as soon as its last consumer is submitted. So, when
restarts are allowed, groups that may be re-run *hold* their inputs: groups with
transfer or barrier tasks until their component is complete (every such group and
every unpack of its shuffles finished), other groups that may be re-run (unpacks and
everything downstream of a shuffle) until they finish themselves. Ray pins a
pending task's arguments anyway, so the second kind costs only the delay until the
driver sees the task finish; the first kind keeps a shuffle's inputs alive until its
outputs are out. Released refs are not recomputed through Ray's lineage: a dropped
ref cannot be asked for again, and a driver-put input has no lineage.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ray_oob_sched._fuse import Group
from ray_oob_sched._graph import Key


@dataclass(frozen=True, slots=True)
class ShuffleTasks:
    """The keys of one p2p shuffle of a graph, by what a restart does with them."""

    transfers: frozenset[Key]  # its transfer tasks and its barrier
    unpacks: frozenset[Key]  # its unpack actor calls


class RestartLimitError(Exception):
    """A shuffle would be restarted more often than ``max_restarts`` allows."""

    def __init__(self, shuffle_id: str, restarts: int) -> None:
        super().__init__(shuffle_id, restarts)
        self.shuffle_id = shuffle_id
        self.restarts = restarts

    def __str__(self) -> str:
        return f"shuffle {self.shuffle_id!r} was restarted {self.restarts} times already"


class ShuffleLayout:
    """Which groups feed, read, or depend on which shuffles; fixed for one compute."""

    def __init__(self, groups: Sequence[Group], shuffles: Mapping[str, ShuffleTasks]) -> None:
        group_of = {k: g.index for g in groups for k in g.keys}
        feeds: dict[int, set[str]] = {}
        unpack_of: dict[int, str] = {}
        for sid, tasks in shuffles.items():
            for k in tasks.transfers:
                if k in group_of:
                    feeds.setdefault(group_of[k], set()).add(sid)
            for k in tasks.unpacks:
                if k in group_of:
                    unpack_of[group_of[k]] = sid
        #: group -> the shuffles whose transfer or barrier tasks it runs
        self.feeds: dict[int, frozenset[str]] = {i: frozenset(s) for i, s in feeds.items()}
        #: unpack group -> its shuffle
        self.unpack_of: dict[int, str] = unpack_of

        # Components: union-find over the shuffles that share a group.
        parent = {s: s for s in shuffles}

        def find(s: str) -> str:
            while parent[s] != s:
                parent[s] = parent[parent[s]]
                s = parent[s]
            return s

        for sids in feeds.values():
            first, *rest = sorted(sids)
            for s in rest:
                parent[find(s)] = find(first)
        members: dict[str, set[str]] = {}
        for s in shuffles:
            members.setdefault(find(s), set()).add(s)
        #: shuffle -> every shuffle that restarts with it (itself included)
        self.component: dict[str, frozenset[str]] = {
            s: frozenset(members[find(s)]) for s in shuffles
        }
        #: component -> the groups that must finish for it to be complete
        self.component_groups: dict[frozenset[str], frozenset[int]] = {}
        for comp in set(self.component.values()):
            self.component_groups[comp] = frozenset(
                [i for i, s in feeds.items() if s & comp]
                + [i for i, s in unpack_of.items() if s in comp]
            )

        # May be re-run: feeds or reads a shuffle, or consumes what such a group
        # makes (groups are in plan order, so producers come first).
        producer = {k: g.index for g in groups for k in g.outputs} if shuffles else {}
        risk: set[int] = set()
        for g in groups if shuffles else ():
            if (
                g.index in self.feeds
                or g.index in unpack_of
                or any(producer.get(k, -1) in risk for k in g.inputs)
            ):
                risk.add(g.index)
        self.at_risk: frozenset[int] = frozenset(risk)

    def component_of_group(self, index: int) -> frozenset[str] | None:
        """The component a group belongs to (for completion), or None."""
        sids = self.feeds.get(index)
        if sids:
            return self.component[next(iter(sids))]
        sid = self.unpack_of.get(index)
        return None if sid is None else self.component[sid]


def plan_restart(
    layout: ShuffleLayout,
    groups: Sequence[Group],
    seeds: Iterable[str],
    *,
    in_flight: Collection[int],
    finished: Collection[int],
) -> tuple[frozenset[str], list[int]]:
    """The shuffles to restart with ``seeds`` and the groups to submit again, in order.

    Only submitted groups (``in_flight`` or ``finished``) are candidates; see the
    module docstring for the rules.
    """
    shuffles: set[str] = set()
    for s in seeds:
        shuffles |= layout.component[s]
    finished_set = set(finished)
    submitted = sorted(set(in_flight) | finished_set)
    while True:
        redo = {i for i in submitted if layout.feeds.get(i, frozenset()) & shuffles}
        redo |= {
            i for i in submitted if i not in finished_set and layout.unpack_of.get(i) in shuffles
        }
        stale = {k for i in redo if i not in finished_set for k in groups[i].outputs}
        for i in submitted:  # plan order: a producer's staleness is known first
            if i in finished_set or i in redo:
                continue
            if any(k in stale for k in groups[i].inputs):
                redo.add(i)
                stale.update(groups[i].outputs)
        more = {s for i in redo for f in layout.feeds.get(i, ()) for s in layout.component[f]}
        if more <= shuffles:
            return frozenset(shuffles), sorted(redo)
        shuffles |= more


class ShuffleActorLostError(RuntimeError):
    """A shuffle actor died mid-run and the shuffle may not be restarted (again).

    Raised from the error that showed the loss (an actor or transport error).
    ``nodes``: the nodes the lost actors ran on; ``lost_nodes``: those of them that
    left the cluster (the actors died with them).
    """

    def __init__(
        self,
        shuffle_id: str,
        run_id: int,
        actors: Sequence[str],
        restarts: int,
        limit: int,
        *,
        nodes: Sequence[str] = (),
        lost_nodes: Sequence[str] = (),
    ) -> None:
        super().__init__(shuffle_id, run_id, tuple(actors), restarts, limit)
        self.shuffle_id = shuffle_id
        self.run_id = run_id
        self.actors = tuple(actors)
        self.restarts = restarts
        self.limit = limit
        self.nodes = tuple(nodes)
        self.lost_nodes = tuple(lost_nodes)

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickles with its keywords (the base class pickles positional args only).
        return (_lost_error, (self.args, self.nodes, self.lost_nodes))

    def __str__(self) -> str:
        where = f" on node(s) {list(self.nodes)}" if self.nodes else ""
        if self.lost_nodes:
            where += f" (node(s) {list(self.lost_nodes)} left the cluster)"
        return (
            f"shuffle {self.shuffle_id!r} (run {self.run_id}) lost shuffle actor(s) "
            f"{list(self.actors)}{where} mid-run after {self.restarts} restart(s), the limit "
            f"(ray-oob-sched.shuffle.max-restarts = {self.limit}); the error that showed "
            "the loss is the cause. Find out why the actor died (node memory, Ray's logs) "
            "or allow more restarts"
        )


def _lost_error(
    args: tuple[Any, ...], nodes: Sequence[str], lost_nodes: Sequence[str]
) -> ShuffleActorLostError:
    return ShuffleActorLostError(*args, nodes=nodes, lost_nodes=lost_nodes)
