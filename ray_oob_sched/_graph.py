"""Pure graph handling: normalise what dask hands to ``get``, validate, cull, order.

Nothing here imports Ray. The output is a :class:`Graph`: task-spec nodes for the
keys that the requested outputs need, their dependencies and dependents, and a
topological order that follows ``dask.order`` priorities (memory-friendly order).
"""

from __future__ import annotations

import heapq
import threading
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import dask.config
from dask._task_spec import GraphNode, TaskRef, convert_legacy_graph
from dask.core import flatten
from dask.highlevelgraph import HighLevelGraph
from dask.order import order as dask_order
from dask.typing import Key as DaskKey

#: What names a task in a dask graph (the whole package uses this one alias).
Key = Hashable


class InvalidGraphError(ValueError):
    """The graph cannot run: a cycle, or a task depending on a key that is absent."""


@dataclass(frozen=True)
class Graph:
    nodes: Mapping[Key, GraphNode]
    dependencies: Mapping[Key, frozenset[Key]]
    dependents: Mapping[Key, set[Key]]
    # Every key of ``nodes`` once, dependencies first, ties broken by dask.order.
    order: tuple[Key, ...]
    outputs: frozenset[Key]
    # Keys the graph uses but does not define, resolved by the caller (futures of
    # persisted collections): key -> whatever ``resolve`` returned.
    external: Mapping[Key, Any]


def to_task_spec(dsk: Any) -> dict[Key, GraphNode]:
    """The task-spec dict for whatever dask passes as ``dsk`` (expr, HLG, dict)."""
    return materialize(dsk)[0]


_MATERIALIZE_LOCK = threading.Lock()


def materialize(dsk: Any) -> tuple[dict[Key, GraphNode], dict[str, dict[Key, Any]]]:
    """The task-spec graph of ``dsk`` and its per-key annotations.

    dask's low-level linear fusion flattens the high-level graph into a plain
    dict, which drops every layer annotation (dask 2026.8): it is switched off
    here, where it is redundant anyway because the plan fuses tasks itself.
    Blockwise fusion, which keeps annotations, still runs. Annotations are read
    after optimisation, from the object dask gave us: expressions compute them
    from their optimised layers.
    """
    # dask.config.set changes process-wide state: serialise our use of it so two
    # computes in two threads cannot restore each other's value.
    with _MATERIALIZE_LOCK, dask.config.set({"optimization.fuse.active": False}):
        raw = dsk if isinstance(dsk, Mapping) else dsk.__dask_graph__()
        annotations = _annotations_of(dsk)
    if isinstance(raw, HighLevelGraph):
        raw = raw.to_dict()
    return convert_legacy_graph(raw), annotations


def _annotations_of(dsk: Any) -> dict[str, dict[Key, Any]]:
    if hasattr(dsk, "__dask_annotations__"):
        return dict(dsk.__dask_annotations__())
    out: dict[str, dict[Key, Any]] = {}
    if isinstance(dsk, HighLevelGraph):
        for layer in dsk.layers.values():
            for name, value in (layer.annotations or {}).items():
                per_key = out.setdefault(name, {})
                for k in layer:
                    per_key[k] = value(k) if callable(value) else value
    return out


def task_ref(key: Key) -> TaskRef:
    """A reference to ``key`` in a graph node's arguments."""
    # Our keys are Hashable; a graph's keys are dask's Key (str, int, float or tuple).
    return TaskRef(cast(DaskKey, key))


def output_keys(keys: Any) -> list[Key]:
    """The flat list of keys in a (possibly nested) ``keys`` argument."""
    if isinstance(keys, list):
        return list(flatten(keys))
    return [keys]


def _no_resolve(key: Key) -> None:
    return None


def build(
    nodes: Mapping[Key, GraphNode],
    keys: Iterable[Key],
    *,
    resolve: Callable[[Key], Any | None] = _no_resolve,
) -> Graph:
    """Validate, cull to what ``keys`` need, and order.

    A key that the graph uses (or that is requested) but does not define is asked
    of ``resolve``; None means it is missing. Raises KeyError for a requested key
    that is missing (the contract of dask's ``get``) and InvalidGraphError for
    dangling dependencies and cycles.
    """
    outputs = frozenset(keys)
    external: dict[Key, Any] = {}

    def is_external(k: Key) -> bool:
        if k in external:
            return True
        found = resolve(k)
        if found is None:
            return False
        external[k] = found
        return True

    for k in outputs:
        if k not in nodes and not is_external(k):
            raise KeyError(f"requested key {k!r} is not in the graph")

    # Cull: walk back from the outputs, checking every edge on the way.
    dependencies: dict[Key, frozenset[Key]] = {}
    stack = [k for k in outputs if k in nodes]
    while stack:
        k = stack.pop()
        if k in dependencies:
            continue
        deps = frozenset(nodes[k].dependencies)
        for d in deps:
            if d in nodes:
                if d not in dependencies:
                    stack.append(d)
            elif not is_external(d):
                raise InvalidGraphError(
                    f"task {k!r} depends on key {d!r}, which is not in the graph "
                    "(nor a live persisted result of ray_oob_sched); add a task or "
                    "data for it"
                )
        dependencies[k] = deps

    dependents: dict[Key, set[Key]] = {k: set() for k in (*dependencies, *external)}
    for k, deps in dependencies.items():
        for d in deps:
            dependents[d].add(k)

    culled = {k: nodes[k] for k in dependencies}
    internal = {k: deps.difference(external) for k, deps in dependencies.items()}
    topo = _toposort(culled, internal, dependents)
    return Graph(
        nodes=culled,
        dependencies=dependencies,
        dependents=dependents,
        order=topo,
        outputs=outputs,
        external=external,
    )


def _toposort(
    nodes: Mapping[Key, GraphNode],
    dependencies: Mapping[Key, frozenset[Key]],
    dependents: Mapping[Key, set[Key]],
) -> tuple[Key, ...]:
    """Kahn's algorithm with dask.order priorities deciding among ready keys.

    dask.order assumes an acyclic graph, so cycles are found first by Kahn's walk
    over plain counts; only then is dask.order asked for priorities.
    """
    missing = {k: len(d) for k, d in dependencies.items()}
    ready = [k for k, n in missing.items() if n == 0]
    seen = 0
    frontier = list(ready)
    while frontier:
        k = frontier.pop()
        seen += 1
        for dep in dependents[k]:
            missing[dep] -= 1
            if missing[dep] == 0:
                frontier.append(dep)
    if seen != len(nodes):
        raise InvalidGraphError(f"the graph has a cycle: {_find_cycle(dependencies)}")

    # dask.order annotates its keys with dask's own Key type and the dependencies as sets;
    # it only hashes and iterates them, so any hashable keys and frozensets do.
    priority: dict[Any, int] = (
        dask_order(
            cast("Mapping[DaskKey, Any]", nodes),
            cast("Mapping[DaskKey, set[DaskKey]]", dependencies),
        )
        if len(nodes) > 1
        else {}
    )
    missing = {k: len(d) for k, d in dependencies.items()}
    heap = [(priority.get(k, 0), i, k) for i, k in enumerate(ready)]
    heapq.heapify(heap)
    tie = len(heap)
    out: list[Key] = []
    while heap:
        _, _, k = heapq.heappop(heap)
        out.append(k)
        for dep in dependents[k]:
            missing[dep] -= 1
            if missing[dep] == 0:
                tie += 1
                heapq.heappush(heap, (priority.get(dep, 0), tie, dep))
    return tuple(out)


def _find_cycle(dependencies: Mapping[Key, frozenset[Key]]) -> list[Key]:
    """One cycle, as a list of keys, by an iterative depth-first search."""
    state: dict[Key, int] = {}  # 1: on the current path, 2: finished
    for root in dependencies:
        if root in state:
            continue
        path: list[Key] = []
        stack: list[tuple[Key, Any]] = [(root, iter(dependencies[root]))]
        state[root] = 1
        path.append(root)
        while stack:
            k, it = stack[-1]
            for d in it:
                if state.get(d) == 1:
                    return [*path[path.index(d) :], d]
                if d not in state:
                    state[d] = 1
                    path.append(d)
                    stack.append((d, iter(dependencies[d])))
                    break
            else:
                state[k] = 2
                path.pop()
                stack.pop()
    return []
