"""Pure: dask's partd-based disk shuffles, run on one node and removed afterwards.

dask's disk shuffle (``shuffle_method="disk"``) and bag's disk groupby
(``groupby(..., shuffle="disk")``) share one partd store, a directory on the local
disk of whichever worker runs the task that creates it: tasks append to it, a
barrier waits, tasks read it back. A task on another node would create an empty
directory of the same path and read nothing, and partd removes its directories only
when the process exits, which Ray's long-lived workers rarely do. So:

- ``find`` names the tasks that create a store (*creators*: ``maybe_buffered_partd``,
  partd's store classes, also nested, as in bag's ``partd.Python(partd.File())``) and
  the tasks that take one as input (*users*);
- ``pin`` runs creators and users on one node (``choose_node``: the driver's if it
  can run them, else an alive node that can), never retried: a re-run append would
  write its rows twice;
- ``keep`` wraps each creator so that its store outlives the creating process's copy
  (``keep_store``); after the compute, success or not, the driver runs ``drop_stores``
  on that node and waits for it.
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dask._task_spec import GraphNode, Task

from ray_oob_sched._graph import Key
from ray_oob_sched._p2p import UnsupportedGraphError


@dataclass(frozen=True)
class DiskStores:
    """The partd stores of a graph: who creates them and who reads or writes them."""

    creators: frozenset[Key]
    users: frozenset[Key]

    @property
    def pinned(self) -> frozenset[Key]:
        """Keys that must run on the stores' node."""
        return self.creators | self.users


@dataclass(frozen=True)
class NodeInfo:
    """A Ray node as ``choose_node`` sees it: id, alive, total resources."""

    node_id: str
    alive: bool
    resources: Mapping[str, float]


def _store_makers() -> tuple[type, ...]:
    """partd's store interface and dask's store factory; () when partd is not loaded.

    A graph holding either has imported its module, so none is imported here (that
    would cost an array-only program the import of pandas)."""
    partd_core = sys.modules.get("partd.core")
    if partd_core is None:
        return ()
    shuffle = sys.modules.get("dask.dataframe.shuffle")
    factory = getattr(shuffle, "maybe_buffered_partd", None)
    return (partd_core.Interface, *([factory] if isinstance(factory, type) else []))


def _creates_store(obj: Any, makers: tuple[type, ...]) -> bool:
    """Whether calling ``obj`` makes a partd store: a store class (or a partial of
    one, as ``partd.Python``) or a ``maybe_buffered_partd`` instance."""
    while isinstance(obj, functools.partial):
        obj = obj.func
    if isinstance(obj, type):
        return issubclass(obj, makers[0])
    return isinstance(obj, makers[1:])


def _calls_creator(node: Task, makers: tuple[type, ...]) -> bool:
    """Whether a task, or a task nested in its arguments, makes a partd store; also
    through ``apply(partd.File, ...)``, which bag writes when a temporary directory
    is configured."""
    if _creates_store(node.func, makers):
        return True
    for a in (*node.args, *node.kwargs.values()):
        if isinstance(a, Task):
            if _calls_creator(a, makers):
                return True
        elif not isinstance(a, GraphNode) and _creates_store(a, makers):
            return True
    return False


def find(
    nodes: Mapping[Key, GraphNode], dependents: Mapping[Key, Iterable[Key]]
) -> DiskStores | None:
    """The graph's partd stores, or None when it has none."""
    makers = _store_makers()
    if not makers:
        return None
    # A store is made from nothing: tasks with inputs are not looked into.
    creators = frozenset(
        k
        for k, node in nodes.items()
        if isinstance(node, Task) and not node.dependencies and _calls_creator(node, makers)
    )
    if not creators:
        return None
    users = frozenset(d for k in creators for d in dependents.get(k, ()))
    return DiskStores(creators=creators, users=users - creators)


def keep(nodes: Mapping[Key, GraphNode], creators: Iterable[Key]) -> dict[Key, GraphNode]:
    """``nodes`` with each creator's result passed through ``keep_store``."""
    out = dict(nodes)
    for k in creators:
        node = nodes[k]
        assert isinstance(node, Task)
        inner = Task(None, node.func, *node.args, **node.kwargs)
        out[k] = Task(k, keep_store, inner)
    return out


def need(options: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """The most of each Ray resource that one task with one of ``options`` asks for
    (a task without options asks for one CPU, as Ray's default)."""
    out: dict[str, float] = {}
    for opts in options:
        asked = {
            "CPU": float(opts.get("num_cpus", 1)),
            "GPU": float(opts.get("num_gpus") or 0),
            "memory": float(opts.get("memory") or 0),
            **{r: float(v) for r, v in (opts.get("resources") or {}).items()},
        }
        for r, v in asked.items():
            if v > 0:
                out[r] = max(out.get(r, 0.0), v)
    return out


def choose_node(nodes: Sequence[NodeInfo], *, driver: str | None, need: Mapping[str, float]) -> str:
    """The node to run a compute's disk shuffles on: the driver's when it has what the
    tasks need, else the alive node with the most CPUs that has it (ties: node id).

    A task pinned to a node that can never run it would wait forever, so a graph no
    node can run is refused before anything runs.
    """

    def fits(n: NodeInfo) -> bool:
        return n.alive and all(n.resources.get(r, 0.0) >= v for r, v in need.items() if v > 0)

    for n in nodes:
        if n.node_id == driver and fits(n):
            return n.node_id
    able = sorted(
        (n for n in nodes if fits(n)), key=lambda n: (-n.resources.get("CPU", 0.0), n.node_id)
    )
    if not able:
        raise UnsupportedGraphError(
            "dask's disk shuffle (shuffle_method='disk', or a bag groupby with "
            "shuffle='disk') runs all its tasks on one node, and no alive node has the "
            f"resources they ask for ({dict(need)}); use shuffle_method='p2p' (which "
            "enable() selects) or 'tasks', or ask for fewer resources"
        )
    return able[0].node_id


def pin(
    per_key: Mapping[Key, Mapping[str, Any]], keys: Iterable[Key], *, strategy: Any
) -> dict[Key, dict[str, Any]]:
    """``per_key`` with ``keys`` run under ``strategy`` (a node affinity) and, unless
    their options say otherwise, never retried (a re-run append duplicates rows)."""
    out = {k: dict(v) for k, v in per_key.items()}
    for k in keys:
        opts = out.setdefault(k, {})
        opts["scheduling_strategy"] = strategy
        opts.setdefault("max_retries", 0)
    return out


def _files(store: Any) -> list[Any]:
    """The ``partd.File`` stores inside a (wrapped) partd store."""
    import partd

    found: list[Any] = []
    todo, seen = [store], set()
    while todo:
        obj = todo.pop()
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, partd.File):
            found.append(obj)
        # Encode, PandasBlocks, Numpy... wrap ``partd``; Buffer has ``fast``/``slow``.
        todo.extend(getattr(obj, name, None) for name in ("partd", "fast", "slow"))
    return found


def store_paths(store: Any) -> list[str]:
    """The directories a partd store keeps its data in."""
    return [f.path for f in _files(store)]


def keep_store(store: Any) -> Any:
    """Run around each creator, in its worker: ``store``, made to outlive this copy.

    ``partd.File()`` without a path removes its directory when the object that made
    it is garbage collected (bag's disk groupby relies on that), here as soon as the
    creating task returns, while other tasks still use the store. ``drop_stores``
    removes the directory instead, so it also leaves partd's list of directories to
    remove at exit, which would grow in a long-lived worker.
    """
    import partd.file

    for f in _files(store):
        if getattr(f, "_explicitly_given_path", True) is False:
            f._explicitly_given_path = True
        if f.path in partd.file.cleanup_files:
            partd.file.cleanup_files.remove(f.path)
    return store


def drop_stores(store: Any) -> list[str]:
    """Run on the store's node after the compute: remove its directories; returns them.

    Unpickling the store (re)creates its directory if missing, so this also holds
    when a task already dropped it."""
    paths = store_paths(store)
    for path in paths:
        if os.path.isdir(path):
            shutil.rmtree(path)
    return paths
