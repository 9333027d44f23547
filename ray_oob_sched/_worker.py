"""Pure worker-side code: run one group of Dask tasks inside one Ray task.

Imported by Ray workers; keeps to the standard library and dask so that the
function pickled into every task stays small.

A task of the group may leave work to the group's end through ``current_scope()``:
a shuffle transfer stages its input there, and the transfers of one run are sent
together (``shuffle.shell._transfer.InputBatch``). The group's values leave the worker
only when ``run_group`` returns, after every deferred ``finish``; a task inside the
group that reads a deferred key first finishes what is pending.
"""

from __future__ import annotations

import contextvars
import os
import socket
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from dask._task_spec import GraphNode

from ray_oob_sched._graph import Key
from ray_oob_sched._task_warnings import Recorder, TaskWarning
from ray_oob_sched._taskconfig import applied
from shuffle._tracebacks import PACKAGE_DIR, drop_frame_locals


@dataclass(frozen=True, slots=True)
class GroupSpec:
    keys: tuple[Key, ...]
    nodes: tuple[GraphNode, ...]
    inputs: tuple[Key, ...]
    outputs: tuple[Key, ...]


@dataclass(frozen=True, slots=True)
class TaskContext:
    """What every group of one compute runs under; built once per compute."""

    config: bytes  # the caller's dask config (``_taskconfig.snapshot``)
    forward_warnings: bool  # record warnings and return them with the status


@dataclass(frozen=True, slots=True)
class StagedWrite:
    """A chunk for a store target in the caller's memory (``_store``)."""

    token: int  # which target
    index: Any
    value: Any


@dataclass(frozen=True, slots=True)
class GroupStatus:
    """The first return of every group: small, so Ray keeps it in the owner's memory."""

    worker: str  # "host:pid", the worker id dask's callbacks receive
    warnings: tuple[TaskWarning, ...] = ()  # distinct warnings its tasks raised
    writes: tuple[StagedWrite, ...] = ()  # chunks the driver writes into store targets
    targets: tuple[tuple[Key, int], ...] = ()  # outputs that are such a target's stand-in


_WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"
#: Frames of this package and of the shuffle's whose locals a failure drops.
_OWN_DIRS = (os.path.join(os.path.dirname(os.path.abspath(__file__)), ""), PACKAGE_DIR)


class Deferred(Protocol):
    def finish(self) -> None:
        """Complete the deferred work; raise if it failed."""


class GroupScope:
    """Work left by the tasks of one group to its end, by token, in first-use order."""

    def __init__(self) -> None:
        self.key: Key = None  # the key being computed
        self._pending: dict[Hashable, tuple[Deferred, list[Key]]] = {}
        self._keys: set[Key] = set()
        self.staged: list[StagedWrite] = []

    def stage(self, write: StagedWrite) -> None:
        """Leave a chunk for the driver to write; it returns with the status."""
        self.staged.append(write)

    def deferred(self, token: Hashable, factory: Callable[[], Deferred]) -> Any:
        """The pending item of ``token`` (made by ``factory`` on first use); the key
        being computed counts as deferred until the item finishes."""
        entry = self._pending.get(token)
        if entry is None:
            entry = self._pending[token] = (factory(), [])
        entry[1].append(self.key)
        self._keys.add(self.key)
        return entry[0]

    def needs_finish(self, dependencies: Any) -> bool:
        return bool(self._keys) and not self._keys.isdisjoint(dependencies)

    def finish(self) -> None:
        """Finish every pending item in order; a failure names the keys it held."""
        pending, self._pending, self._keys = self._pending, {}, set()
        for item, keys in pending.values():
            try:
                item.finish()
            except BaseException as e:
                shown = ", ".join(map(repr, keys[:5])) + (", ..." if len(keys) > 5 else "")
                e.add_note(f"ray_oob_sched: raised while finishing dask keys {shown}")
                raise


_SCOPE: contextvars.ContextVar[GroupScope | None] = contextvars.ContextVar(
    "ray_oob_sched_group_scope", default=None
)


def current_scope() -> GroupScope | None:
    """The scope of the group running in this thread, if any."""
    return _SCOPE.get()


def run_group(
    spec: GroupSpec, args: Sequence[Any], *, context: TaskContext | None = None
) -> tuple[Any, ...]:
    """Compute ``spec.keys`` in order; return ``(status, *outputs)``.

    In-group intermediates are dropped right after their last in-group use, so a
    long group holds no more than a sequential scheduler would. A failing task's
    exception is re-raised unchanged, with a note naming its key. Deferred work
    (module docstring) is finished before the outputs leave. With a ``context``,
    the tasks run under the caller's dask config and their warnings come back in
    the status.
    """
    try:
        if context is None:
            return _run(spec, args, None)
        with applied(context.config):
            if not context.forward_warnings:
                return _run(spec, args, None)
            with Recorder() as recorder:
                return _run(spec, args, recorder)
    except BaseException as e:
        # The failed group's frames hold its inputs (views of Ray's object store) and
        # staged transfers that may hold the failure: a cycle that would keep the
        # inputs pinned until the worker's garbage collector runs.
        drop_frame_locals(e, dirs=_OWN_DIRS)
        # This frame, still running, stays in the traceback: Ray's failure path may keep
        # the error in a cycle of its own, so the frame must not hold the inputs either.
        del spec, args, context
        raise


def _run(spec: GroupSpec, args: Sequence[Any], recorder: Recorder | None) -> tuple[Any, ...]:
    values: dict[Key, Any] = dict(zip(spec.inputs, args, strict=True))
    keep = set(spec.outputs)
    uses: dict[Key, int] = {}
    for node in spec.nodes:
        for d in node.dependencies:
            uses[d] = uses.get(d, 0) + 1
    scope = GroupScope()
    token = _SCOPE.set(scope)
    try:
        for key, node in zip(spec.keys, spec.nodes, strict=False):
            if scope.needs_finish(node.dependencies):
                scope.finish()
            scope.key = key
            try:
                values[key] = node(values)
            except BaseException as e:
                e.add_note(f"ray_oob_sched: raised while computing dask key {key!r}")
                raise
            if recorder is not None:
                recorder.after(key)
            for d in node.dependencies:
                uses[d] -= 1
                if uses[d] == 0 and d not in keep:
                    del values[d]
        scope.finish()
        if recorder is not None:
            recorder.after(scope.key)  # raised while finishing deferred work
    finally:
        _SCOPE.reset(token)
    found = recorder.warnings() if recorder is not None else ()
    outputs = [values[k] for k in spec.outputs]
    targets = tuple(
        (k, v.token)
        for k, v in zip(spec.outputs, outputs, strict=False)
        if getattr(v, "is_store_target", False)
    )
    status = GroupStatus(
        worker=_WORKER_ID, warnings=found, writes=tuple(scope.staged), targets=targets
    )
    return (status, *outputs)
