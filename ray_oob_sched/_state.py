"""Sans-I/O scheduler state machine: events in, instructions out.

Groups (see ``_fuse``) are submitted in their planned order, which is a
topological order of the group DAG: when a group is submitted, every group that
produces one of its inputs has been submitted already, so its inputs exist as
ObjectRefs and Ray itself waits for them to be computed. The only limit on
submission is the number of groups in flight (submitted, not finished), which
keeps the running frontier close to dask.order's memory-friendly order.

Ownership: the shell keeps one ObjectRef per live key. A key is released (its ref
dropped) right after the last group that consumes it has been submitted, unless it
is a requested output. Ray's reference counting keeps the object alive for the
submitted consumers and frees it when they are done.

``view`` is the dict that dask's local callbacks (ProgressBar, Profiler, Cache)
read: the same keys as ``dask.local``'s state, with ``ready`` always empty because
readiness is Ray's business here.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ray_oob_sched._fuse import Group

Key = Hashable


@dataclass(frozen=True, slots=True)
class Submit:
    group: Group


@dataclass(frozen=True, slots=True)
class Release:
    keys: tuple[Key, ...]


Instruction = Submit | Release


class SchedulerState:
    def __init__(
        self,
        groups: Sequence[Group],
        *,
        outputs: Iterable[Key],
        sources: Iterable[Key] = (),
        max_in_flight: int,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
        self._groups = groups
        self._max_in_flight = max_in_flight
        self._next = 0
        self._in_flight: set[int] = set()
        self._finished = 0
        outputs = set(outputs)
        # Index of the last consuming group, per key; keys released after it.
        last_use: dict[Key, int] = {}
        for g in groups:
            for k in g.inputs:
                last_use[k] = g.index
        self._release_after: dict[int, list[Key]] = {}
        for k, i in last_use.items():
            if k not in outputs:
                self._release_after.setdefault(i, []).append(k)
        self.view: dict[str, Any] = {
            "waiting": {k for g in groups for k in g.keys},
            "ready": set(),
            "running": set(),
            "finished": set(sources),
            "released": set(),
        }

    @property
    def done(self) -> bool:
        return self._finished == len(self._groups)

    @property
    def in_flight(self) -> frozenset[int]:
        return frozenset(self._in_flight)

    def start(self) -> list[Instruction]:
        return self._fill()

    def group_finished(self, index: int) -> list[Instruction]:
        if index not in self._in_flight:
            raise RuntimeError(f"group {index} finished but was not in flight")
        self._in_flight.remove(index)
        self._finished += 1
        keys = self._groups[index].keys
        self.view["running"].difference_update(keys)
        self.view["finished"].update(keys)
        return self._fill()

    def _fill(self) -> list[Instruction]:
        out: list[Instruction] = []
        view = self.view
        while self._next < len(self._groups) and len(self._in_flight) < self._max_in_flight:
            g = self._groups[self._next]
            self._next += 1
            self._in_flight.add(g.index)
            view["waiting"].difference_update(g.keys)
            view["running"].update(g.keys)
            out.append(Submit(g))
            released = self._release_after.pop(g.index, None)
            if released:
                view["released"].update(released)
                out.append(Release(tuple(released)))
        return out
