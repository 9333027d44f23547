"""Pure worker-side code: run one group of Dask tasks inside one Ray task.

Imported by Ray workers; keeps to the standard library and dask so that the
function pickled into every task stays small.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from dask._task_spec import GraphNode

Key = Hashable


@dataclass(frozen=True, slots=True)
class GroupSpec:
    keys: tuple[Key, ...]
    nodes: tuple[GraphNode, ...]
    inputs: tuple[Key, ...]
    outputs: tuple[Key, ...]


@dataclass(frozen=True, slots=True)
class GroupStatus:
    """The first return of every group: small, so Ray keeps it in the owner's memory."""

    worker: str  # "host:pid", the worker id dask's callbacks receive


_WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"


def run_group(spec: GroupSpec, args: Sequence[Any]) -> tuple[Any, ...]:
    """Compute ``spec.keys`` in order; return ``(status, *outputs)``.

    In-group intermediates are dropped right after their last in-group use, so a
    long group holds no more than a sequential scheduler would. A failing task's
    exception is re-raised unchanged, with a note naming its key.
    """
    values: dict[Key, Any] = dict(zip(spec.inputs, args, strict=True))
    keep = set(spec.outputs)
    uses: dict[Key, int] = {}
    for node in spec.nodes:
        for d in node.dependencies:
            uses[d] = uses.get(d, 0) + 1
    for key, node in zip(spec.keys, spec.nodes):
        try:
            values[key] = node(values)
        except BaseException as e:
            e.add_note(f"ray_oob_sched: raised while computing dask key {key!r}")
            raise
        for d in node.dependencies:
            uses[d] -= 1
            if uses[d] == 0 and d not in keep:
                del values[d]
    return (GroupStatus(worker=_WORKER_ID), *(values[k] for k in spec.outputs))
