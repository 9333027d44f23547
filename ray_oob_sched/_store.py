"""Pure: ``da.store`` into targets that live in the caller's memory.

``dask.array.store`` puts ``load_store_chunk(x, out, index, region=, lock=, ...)``
calls into the graph, usually inside blockwise subgraphs, with the target ``out``
as graph data. A Ray worker gets a pickled copy of that data: writing into a numpy
array there fails (read-only) and into an ``np.memmap`` silently writes a private
copy. So before anything runs, ``rewrite`` finds every store call and

- a target workers open themselves (a zarr array on a path or a remote store, h5py,
  TileDB) is left to the workers;
- any other target object lives in the caller's memory (a numpy array, an
  ``np.memmap``, a zarr array in a ``MemoryStore``, an object of the caller's own
  class) and is replaced by a ``DriverTarget`` stand-in: the worker stages each
  chunk in its group (``GroupScope.stage``), the chunks ride back with the group's
  status as it finishes, and the driver writes them into the real target under the
  caller's lock (``StoreTargets.write``): streamed, never all held at once, as dask's
  local schedulers write it;
- a target made by a task (``delayed``) is refused with
  ``UnsupportedStoreTargetError``: it would exist only in a worker.

A task that returns the stand-in (``return_stored=True`` without
``load_stored``: what ``store(..., return_stored=True)`` persists) is reported in
the status; once every write is done, the driver puts the real target into Ray
once and that key's result becomes it.

The locks of driver targets are replaced by ``False`` in the graph (a
``threading.Lock`` cannot travel) and held by the driver around its writes.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from dask._task_spec import DataNode, GraphNode, Task, TaskRef, _execute_subgraph
from dask.array.core import load_store_chunk

from ray_oob_sched._graph import Key
from ray_oob_sched._worker import StagedWrite, current_scope

#: Modules whose array objects workers open themselves (they pickle by path).
WORKER_OPENABLE = ("zarr", "h5py", "tiledb")
#: zarr's stores that keep the data in the process that made them.
IN_MEMORY_STORES = frozenset({"MemoryStore", "KVStore", "GpuMemoryStore", "ManagedMemoryStore"})


class UnsupportedStoreTargetError(TypeError):
    """``da.store`` into a target that ray_oob_sched can write neither in the
    workers nor on the driver."""


class DriverTarget:
    """Stands in, inside tasks, for a store target in the caller's memory.

    ``load_store_chunk`` writes ``out[index] = x`` (region already applied) and,
    with ``load_stored``, reads ``out[index]`` back; both happen in the same task.
    """

    __slots__ = ("_last", "dtype", "shape", "token")
    #: Seen by ``run_group`` when a task returns the stand-in (``return_stored``).
    is_store_target = True

    def __init__(self, token: int, dtype: Any, shape: tuple[int, ...] | None) -> None:
        self.token = token
        self.dtype = dtype
        self.shape = shape
        self._last: tuple[Any, Any] | None = None

    def __reduce__(self) -> tuple[Any, ...]:
        return (DriverTarget, (self.token, self.dtype, self.shape))

    def __setitem__(self, index: Any, value: Any) -> None:
        scope = current_scope()
        if scope is None:
            raise RuntimeError("a driver store target was written outside a ray_oob_sched task")
        scope.stage(StagedWrite(self.token, index, value))
        self._last = (index, value)

    def __getitem__(self, index: Any) -> Any:
        if self.shape is None:  # a target of the caller's own class, without a shape
            raise UnsupportedStoreTargetError(
                "a task reads back a store target that has no shape (load_stored=True); "
                "give the target class shape and dtype attributes, or use load_stored=False"
            )
        if self._last is None or not _same_index(self._last[0], index):
            raise UnsupportedStoreTargetError(
                "a task reads a store target that lives in the caller's memory before "
                "the driver has written it (da.store(..., return_stored=True, "
                "load_stored=False) used in the same compute); compute the store first, "
                "or use load_stored=True"
            )
        shape = np.broadcast_to(np.empty((), bool), self.shape)[index].shape
        return np.array(np.broadcast_to(np.asarray(self._last[1], self.dtype), shape))


def _same_index(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 -- arrays as indices: compare by identity
        return a is b


class StoreTargets:
    """The driver side: real targets and their locks, by token."""

    def __init__(self) -> None:
        self._targets: dict[int, tuple[Any, Any]] = {}  # token -> (target, lock)
        #: Whether some store call writes a target the workers open themselves
        #: (whose shared shards ``_store_order`` then orders).
        self.to_workers = False
        #: Keys whose task may return a stand-in (``return_stored`` without
        #: ``load_stored``): their consumers read the real target (``_caller``).
        self.stand_ins: set[Key] = set()
        #: Keys whose task uses such a stand-in itself (a fused consumer): they run
        #: in the caller's process, on their original node (``originals``).
        self.readers: set[Key] = set()
        #: Nodes as dask made them, before their store targets were swapped: what a
        #: task run in the caller's process runs, writing the real target directly.
        self.originals: dict[Key, GraphNode] = {}

    def __bool__(self) -> bool:
        return bool(self._targets)

    def target(self, token: int) -> Any:
        """The real target a stand-in with ``token`` replaced."""
        return self._targets[token][0]

    def add(self, target: Any, lock: Any) -> DriverTarget:
        token = id(target)
        self._targets.setdefault(token, (target, lock))
        return self.stand_in(token)

    def stand_in(self, token: int) -> DriverTarget:
        """The stand-in of the target with ``token``."""
        target = self._targets[token][0]
        shape = getattr(target, "shape", None)
        return DriverTarget(
            token, getattr(target, "dtype", None), None if shape is None else tuple(shape)
        )

    def token_of(self, value: Any) -> int | None:
        """The token of ``value`` if it is one of the real targets."""
        entry = self._targets.get(id(value))
        return id(value) if entry is not None and entry[0] is value else None

    def write(self, writes: Sequence[StagedWrite]) -> None:
        """Write staged chunks into their targets, each under the caller's lock."""
        for w in writes:
            target, lock = self._targets[w.token]
            if lock:
                lock.acquire()
            try:
                target[w.index] = w.value
            finally:
                if lock:
                    lock.release()


def rewrite(nodes: Mapping[Key, GraphNode]) -> tuple[dict[Key, GraphNode], StoreTargets]:
    """``nodes`` with the store calls into driver targets rewritten (module doc)."""
    stores = StoreTargets()
    subs: dict[int, Any] = {}  # id of a target or its lock -> what replaces it
    for key, call, scope in store_calls(nodes):
        if _check_store(call, scope, stores, subs) and _returns_target(call, scope):
            (stores.stand_ins if scope.returned(call) else stores.readers).add(key)
    if not subs:
        return dict(nodes), stores
    swapped = {k: _swap(node, subs) for k, node in nodes.items()}
    stores.originals = {k: node for k, node in nodes.items() if swapped[k] is not node}
    return swapped, stores


@dataclass(frozen=True)
class _Scope:
    """Resolves keys at one level: a subgraph's inputs, its inner nodes, the graph."""

    inputs: Mapping[Key, Any]
    inner: Mapping[Key, Any]
    top: Mapping[Key, GraphNode]
    #: The inner key whose value the top-level task returns (a subgraph's output);
    #: None at the top level, where the node is the task; ``_NOT_RETURNED`` inside a
    #: subgraph that is not the task's output.
    returns: Any = None

    def returned(self, node: Task) -> bool:
        """Whether ``node`` (at this level) gives the value of the top-level task."""
        return self.returns is None or node.key == self.returns

    def resolve(self, arg: Any) -> Any:
        """The value ``arg`` stands for when it is data; ``_COMPUTED`` when a task
        computes it."""
        if isinstance(arg, DataNode):
            return arg.value
        if isinstance(arg, TaskRef):
            key = arg.key
            if key in self.inner:
                return self.resolve(self.inner[key])
            if key in self.inputs:
                return self.inputs[key]
            node = self.top.get(key)
            return node.value if isinstance(node, DataNode) else _COMPUTED
        if isinstance(arg, GraphNode):
            return _COMPUTED
        return arg


_COMPUTED = object()
_NOT_RETURNED = object()


def store_calls(nodes: Mapping[Key, GraphNode]) -> Iterator[tuple[Key, Task, _Scope]]:
    """Every ``load_store_chunk`` call in ``nodes``, also inside fused subgraphs: the
    top-level key that runs it, the call, and the scope its arguments resolve in."""
    top = _Scope({}, {}, nodes)
    for key, node in nodes.items():
        for call, scope in _calls(node, top):
            yield key, call, scope


def _calls(node: Any, scope: _Scope) -> Iterator[tuple[Task, _Scope]]:
    if type(node) is not Task:
        return
    if node.func is load_store_chunk:
        yield node, scope
    elif node.func is _execute_subgraph:
        inner, outkey, inkeys, *deps = node.args
        inputs = {k: scope.resolve(d) for k, d in zip(inkeys, deps, strict=True)}
        returns = outkey if scope.returned(node) else _NOT_RETURNED
        for child in inner.values():
            yield from _calls(child, _Scope(inputs, inner, scope.top, returns))


def store_arg(call: Task, name: str, position: int) -> Any:
    """An argument of a ``load_store_chunk`` call, given by keyword or position."""
    return call.kwargs[name] if name in call.kwargs else call.args[position]


def _returns_target(call: Task, scope: _Scope) -> bool:
    """Whether a store call returns its target (``return_stored`` without
    ``load_stored``)."""
    return bool(scope.resolve(store_arg(call, "return_stored", 5))) and not scope.resolve(
        store_arg(call, "load_stored", 6)
    )


def _check_store(node: Task, scope: _Scope, stores: StoreTargets, subs: dict[int, Any]) -> bool:
    """Check one store call's target; True if the driver writes it (a stand-in
    replaces it)."""
    out_arg = store_arg(node, "out", 1)
    target = scope.resolve(out_arg)
    if target is _COMPUTED:
        raise UnsupportedStoreTargetError(
            f"da.store into a target computed by a task ({out_arg!r}, e.g. a delayed "
            "target): it would be written in a Ray worker and lost; pass the target "
            "object itself (an array in the caller's memory is written on the driver, "
            "a zarr/h5py array on disk by the workers)"
        )
    if worker_openable(target):
        stores.to_workers = True
        return False
    lock = scope.resolve(node.kwargs.get("lock", False))
    if id(target) not in subs:
        subs[id(target)] = stores.add(target, lock if lock is not _COMPUTED else None)
    if lock and lock is not _COMPUTED:
        subs[id(lock)] = False  # held by the driver around its writes
    return True


def worker_openable(target: Any) -> bool:
    """Whether workers write ``target`` themselves: an array of a library that pickles
    it by path, unless its data lives in the caller's memory (zarr's in-memory
    stores: a worker would write into its own copy)."""
    if type(target).__module__.split(".")[0] not in WORKER_OPENABLE:
        return False
    store = getattr(target, "store", None)
    if isinstance(store, dict):  # zarr 2 accepts a plain dict as its store
        return False
    return type(store).__name__ not in IN_MEMORY_STORES


def _swap(node: Any, subs: Mapping[int, Any]) -> Any:
    """``node`` with every piece of data whose id is in ``subs`` replaced."""
    if isinstance(node, DataNode):
        new = subs.get(id(node.value), node.value)
        return node if new is node.value else DataNode(node.key, new)
    if type(node) is Task:
        args = tuple(_swap_arg(a, subs) for a in node.args)
        kwargs = {k: _swap_arg(v, subs) for k, v in node.kwargs.items()}
        if all(a is b for a, b in zip(args, node.args, strict=False)) and all(
            kwargs[k] is v for k, v in node.kwargs.items()
        ):
            return node
        return Task(node.key, node.func, *args, **kwargs)
    return node


def _swap_arg(arg: Any, subs: Mapping[int, Any]) -> Any:
    if isinstance(arg, GraphNode):
        return _swap(arg, subs)
    if type(arg) is dict:  # a subgraph's inner nodes
        new = {k: _swap_arg(v, subs) for k, v in arg.items()}
        return arg if all(new[k] is v for k, v in arg.items()) else new
    if isinstance(arg, (bool, int, float, str, bytes, type(None), TaskRef)):
        return arg
    return subs.get(id(arg), arg)
