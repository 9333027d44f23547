"""Sans-I/O scheduler state machine: events in, instructions out.

Groups (see ``_fuse``) are submitted in their planned order, which is a
topological order of the group DAG: when a group is submitted, every group that
produces one of its inputs has been submitted already, so its inputs exist as
ObjectRefs and Ray itself waits for them to be computed. The limits on
submission are the number of groups in flight (submitted, not finished), which
keeps the running frontier close to dask.order's memory-friendly order, and
``after``: a group listed there waits, and the plan's submission with it, until
another group has finished (a batch of shuffle outputs is sized from what its
shuffle's barrier returns); ``in_caller``: a group the shell runs in the caller's
process (``_caller``) waits, the plan with it, until every group that makes one of
its inputs has finished (the shell then runs it at once, and its outputs exist
before any later group is submitted); and the output ``window``: a batch of shuffle outputs
waits, the plan with it, while the outputs of earlier batches whose consumers are
all submitted, and not all finished, exceed ``max_bytes``. An actor makes outputs
faster than tasks consume them; without it every output of a large shuffle could
wait in Ray's object store at once. Only outputs whose consumers are submitted
count, so a batch never waits for consumers that wait for it.

Ownership: the shell keeps one ObjectRef per live key. A key is released (its ref
dropped) right after the last group that consumes it has been submitted, unless it
is a requested output or a group that a shuffle restart may re-run still holds it
(``_restart``). Ray's reference counting keeps the object alive for the submitted
consumers and frees it when they are done.

Shuffle restarts (``restart``): the shell reports shuffles that lost an actor; the
machine answers ``RestartShuffles`` (start new runs), ``Abandon`` (stop these
groups in flight, ignore their results), then ``Submit``s of the groups to run
again, in plan order, ahead of the groups never submitted.

``view`` is the dict that dask's local callbacks (ProgressBar, Profiler, Cache)
read: the same keys as ``dask.local``'s state, with ``ready`` always empty because
readiness is Ray's business here.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ray_oob_sched._fuse import Group
from ray_oob_sched._graph import Key
from ray_oob_sched._restart import (
    RestartLimitError,
    ShuffleLayout,
    ShuffleTasks,
    plan_restart,
)


@dataclass(frozen=True, slots=True)
class Submit:
    group: Group


@dataclass(frozen=True, slots=True)
class Release:
    keys: tuple[Key, ...]


@dataclass(frozen=True, slots=True)
class RestartShuffles:
    """Start a new run of each shuffle, superseding (and dropping) its current one."""

    shuffle_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Abandon:
    """Cancel these groups in flight; their results no longer count."""

    groups: tuple[int, ...]


Instruction = Submit | Release | RestartShuffles | Abandon


@dataclass(frozen=True)
class OutputWindow:
    """Back-pressure on shuffle outputs waiting for their consumers (module doc)."""

    groups: frozenset[int]  # batches of shuffle outputs, each listed in ``after``
    max_bytes: int
    #: A batch's estimated output bytes; called once it may be submitted (its
    #: ``after`` group has finished).
    bytes_of: Callable[[int], int]


class SchedulerState:
    """The state of one compute. ``shuffles`` (shuffle id -> its keys) and
    ``max_restarts`` (per shuffle) enable shuffle restarts; without them nothing
    is held and ``restart`` always raises ``RestartLimitError``."""

    def __init__(
        self,
        groups: Sequence[Group],
        *,
        outputs: Iterable[Key],
        sources: Iterable[Key] = (),
        max_in_flight: int,
        shuffles: Mapping[str, ShuffleTasks] | None = None,
        max_restarts: int = 0,
        after: Mapping[int, int] | None = None,
        window: OutputWindow | None = None,
        in_caller: frozenset[int] = frozenset(),
    ) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
        if max_restarts < 0:
            raise ValueError(f"max_restarts must be at least 0, got {max_restarts}")
        self._groups = groups
        self._max_in_flight = max_in_flight
        self._after = dict(after or {})  # group -> the group that must finish first
        for i, j in self._after.items():
            if not 0 <= j < i < len(groups):
                raise ValueError(f"group {i} cannot wait for group {j}: not an earlier group")
        producer = {k: g.index for g in groups for k in g.outputs} if in_caller or window else {}
        #: Groups run in the caller -> the groups making their inputs.
        self._makers = {
            i: frozenset(producer[k] for k in groups[i].inputs if k in producer) for i in in_caller
        }
        self._window = window
        self._consumers: dict[int, frozenset[int]] = {}  # window group -> its consumers
        self._window_bytes: dict[int, int] = {}  # window group submitted -> its bytes
        if window is not None:
            consumers: dict[int, set[int]] = {i: set() for i in window.groups}
            for g in groups:
                for k in g.inputs:
                    p = producer.get(k)
                    if p in consumers:
                        consumers[p].add(g.index)
            self._consumers = {i: frozenset(c) for i, c in consumers.items()}
        self._outputs = frozenset(outputs)
        self._pending = list(range(len(groups)))  # a heap of group indices: plan order
        self._in_flight: set[int] = set()
        self._finished: set[int] = set()
        self._unsubmitted: dict[Key, int] = {}  # consumers not submitted, per key
        for g in groups:
            for k in g.inputs:
                self._unsubmitted[k] = self._unsubmitted.get(k, 0) + 1
        self._released: set[Key] = set()
        self.layout = ShuffleLayout(groups, shuffles or {})
        self.max_restarts = max_restarts
        self._retain = max_restarts > 0  # hold inputs of groups a restart may re-run
        self._held: dict[Key, int] = {}  # holding groups, per key
        self._holding: set[int] = set()
        #: restarts so far, per shuffle id
        self.restarts: dict[str, int] = {}
        self._left: dict[frozenset[str], set[int]] = {
            c: set(gs) for c, gs in self.layout.component_groups.items()
        }
        self.view: dict[str, Any] = {
            "waiting": {k for g in groups for k in g.keys},
            "ready": set(),
            "running": set(),
            "finished": set(sources),
            "released": set(),
        }

    @property
    def done(self) -> bool:
        return len(self._finished) == len(self._groups)

    @property
    def in_flight(self) -> frozenset[int]:
        return frozenset(self._in_flight)

    def start(self) -> list[Instruction]:
        return self._fill()

    def group_finished(self, index: int) -> list[Instruction]:
        if index not in self._in_flight:
            raise RuntimeError(f"group {index} finished but was not in flight")
        self._in_flight.remove(index)
        self._finished.add(index)
        keys = self._groups[index].keys
        self.view["running"].difference_update(keys)
        self.view["finished"].update(keys)
        freed: list[Key] = []
        if index in self._holding and index not in self.layout.feeds:
            freed += self._unhold(index)
        comp = self.layout.component_of_group(index)
        if comp is not None:
            left = self._left[comp]
            left.discard(index)
            if not left:  # complete: no restart can re-run its feeding groups now
                for i in sorted(self.layout.component_groups[comp]):
                    if i in self._holding:
                        freed += self._unhold(i)
        out: list[Instruction] = [self._release(freed)] if freed else []
        return out + self._fill()

    def may_restart(self, index: int) -> bool:
        """Whether a shuffle restart could re-run group ``index`` (so its failure
        may come from a lost shuffle actor)."""
        return index in self.layout.at_risk

    def incomplete_shuffles(self) -> list[str]:
        """Shuffles a restart could still help: their component is not complete."""
        return sorted(s for comp, left in self._left.items() if left for s in comp)

    def restart(self, shuffle_ids: Iterable[str]) -> list[Instruction]:
        """Restart ``shuffle_ids`` (and their components): see the module docstring.

        Raises ``RestartLimitError``, changing nothing, if one of them was restarted
        ``max_restarts`` times already.
        """
        shuffles, redo = plan_restart(
            self.layout,
            self._groups,
            shuffle_ids,
            in_flight=self._in_flight,
            finished=self._finished,
        )
        for s in sorted(shuffles):
            if self.restarts.get(s, 0) >= self.max_restarts:
                raise RestartLimitError(s, self.restarts.get(s, 0))
        for i in redo:
            for k in self._groups[i].inputs:
                if k in self._released:  # a hold should have prevented this
                    raise RuntimeError(
                        f"cannot re-run group {i} for a shuffle restart: its input "
                        f"{k!r} was released"
                    )
        for s in shuffles:
            self.restarts[s] = self.restarts.get(s, 0) + 1
        out: list[Instruction] = [RestartShuffles(tuple(sorted(shuffles)))]
        abandoned = tuple(i for i in redo if i in self._in_flight)
        if abandoned:
            out.append(Abandon(abandoned))
        for i in redo:
            g = self._groups[i]
            self._window_bytes.pop(i, None)  # counted again when it is resubmitted
            self._in_flight.discard(i)
            self._finished.discard(i)
            heapq.heappush(self._pending, i)
            for k in g.inputs:
                self._unsubmitted[k] += 1
            if i in self._holding:
                self._unhold(i)  # frees nothing: the inputs are unsubmitted again
            comp = self.layout.component_of_group(i)
            if comp is not None:
                self._left[comp].add(i)
            self.view["running"].difference_update(g.keys)
            self.view["finished"].difference_update(g.keys)
            self.view["waiting"].update(g.keys)
        return out + self._fill()

    def _fill(self) -> list[Instruction]:
        out: list[Instruction] = []
        view = self.view
        while self._pending and len(self._in_flight) < self._max_in_flight:
            first = self._after.get(self._pending[0])
            if first is not None and first not in self._finished:
                break  # resumes from group_finished: the earlier group is in flight
            makers = self._makers.get(self._pending[0])
            if makers is not None and not makers <= self._finished:
                break  # resumes from group_finished: a maker of its inputs is in flight
            weight = self._window_weight(self._pending[0])
            if weight is not None and not self._window_admits(weight):
                break  # resumes from group_finished: a consumer is in flight
            g = self._groups[heapq.heappop(self._pending)]
            if weight is not None:
                self._window_bytes[g.index] = weight
            self._in_flight.add(g.index)
            view["waiting"].difference_update(g.keys)
            view["running"].update(g.keys)
            out.append(Submit(g))
            self._released.difference_update(g.outputs)  # re-run: fresh refs
            if self._retain and g.index in self.layout.at_risk:
                self._holding.add(g.index)
                for k in g.inputs:
                    self._held[k] = self._held.get(k, 0) + 1
            freed = []
            for k in g.inputs:
                self._unsubmitted[k] -= 1
                if self._releasable(k):
                    freed.append(k)
            # A re-run group's outputs may have no consumer left to submit.
            freed += [k for k in g.outputs if self._releasable(k)]
            if freed:
                out.append(self._release(freed))
        return out

    def _window_weight(self, index: int) -> int | None:
        if self._window is None or index not in self._window.groups:
            return None
        return max(0, int(self._window.bytes_of(index)))

    def _window_admits(self, weight: int) -> bool:
        """Whether a batch of ``weight`` bytes fits beside the outputs waiting for
        consumers that are all submitted (module doc); forgets batches whose
        consumers all finished."""
        assert self._window is not None
        waiting = 0
        for j, nbytes in list(self._window_bytes.items()):
            consumers = self._consumers[j]
            if not consumers:
                continue  # requested outputs: they wait for the caller, not a consumer
            if consumers <= self._finished:
                del self._window_bytes[j]
            elif all(c in self._in_flight or c in self._finished for c in consumers):
                waiting += nbytes
        return waiting == 0 or waiting + weight <= self._window.max_bytes

    def _unhold(self, index: int) -> list[Key]:
        self._holding.remove(index)
        freed = []
        for k in self._groups[index].inputs:
            self._held[k] -= 1
            if self._releasable(k):
                freed.append(k)
        return freed

    def _releasable(self, key: Key) -> bool:
        return (
            key not in self._outputs
            and key not in self._released
            and self._unsubmitted.get(key, 0) == 0
            and self._held.get(key, 0) == 0
        )

    def _release(self, keys: list[Key]) -> Release:
        self._released.update(keys)
        self.view["released"].update(keys)
        return Release(tuple(keys))
