"""Pure: writes into one zarr shard (or chunk) by several tasks run one at a time.

zarr writes a whole shard (unsharded: a whole chunk) at once: a write that covers
part of one reads the shard, changes its part and writes it back. Two tasks that
do so at the same time in different processes lose one of the writes (a chunk of
``da.store`` that does not line up with the target's shards, e.g. 3 x 3 chunks
into 18 x 18 shards). dask's synchronous scheduler writes one chunk after another;
workers write in parallel. So before anything runs, ``chain_shared_writes`` finds
the store calls into worker-written zarr arrays and, for every shard that a call
covers only in part, orders the tasks that write into that shard: each such task
also takes the previous one's result as an argument (``after_writes``), so Ray
starts it only once that write is done. Tasks whose shards nobody else touches
(chunks aligned to the shards, the usual case) are left alone, and writes into
different shards still run in parallel.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

from dask._task_spec import GraphNode, List, Task
from dask.array.optimization import fuse_slice

from ray_oob_sched._graph import Key, task_ref
from ray_oob_sched._store import store_arg, store_calls, worker_openable

__all__ = ["after_writes", "chain_shared_writes", "write_units"]

#: A shard (or chunk) of one target: (id of the target, its grid coordinates).
Unit = tuple[int, tuple[int, ...]]


def after_writes(previous: list[Any], result: Any) -> Any:
    """The result of a store task that waited for the writes in ``previous``."""
    return result


def chain_shared_writes(
    nodes: Mapping[Key, GraphNode], order: Sequence[Key]
) -> dict[Key, GraphNode] | None:
    """``nodes`` with each task that shares a partly written zarr shard made to wait
    for the previous writer of that shard (in ``order``, a topological order of
    ``nodes``); None when no shard is shared."""
    writers: dict[Unit, set[Key]] = {}
    partial: set[Unit] = set()
    for key, call, scope in store_calls(nodes):
        target = scope.resolve(store_arg(call, "out", 1))
        if not worker_openable(target) or not hasattr(target, "chunks"):
            continue
        index = _fused_index(scope.resolve(store_arg(call, "index", 2)), call, scope)
        shape, shard = tuple(target.shape), _unit_shape(target)
        units = write_units(index, shape, shard)
        if units is None:  # an index we cannot read: take it as touching every shard
            whole, part = write_units((), shape, shard) or ([], [])
            whole, part = [], whole + part
        else:
            whole, part = units
        for u in itertools.chain(whole, part):
            writers.setdefault((id(target), u), set()).add(key)
        partial.update((id(target), u) for u in part)
    previous: dict[Key, set[Key]] = {}
    position = {k: i for i, k in enumerate(order)}
    for shared in partial:
        chain = sorted(writers[shared], key=position.__getitem__)
        for first, then in itertools.pairwise(chain):
            previous.setdefault(then, set()).add(first)
    if not previous:
        return None
    out = dict(nodes)
    for then, firsts in previous.items():
        refs = List(*(task_ref(k) for k in sorted(firsts, key=position.__getitem__)))
        out[then] = Task(then, after_writes, refs, nodes[then])
    return out


def _unit_shape(target: Any) -> tuple[int, ...]:
    shards = getattr(target, "shards", None)  # zarr 3; None when unsharded
    return tuple(shards if shards is not None else target.chunks)


def _fused_index(index: Any, call: Task, scope: Any) -> Any:
    """The index ``load_store_chunk`` writes at: ``region`` and ``index`` fused."""
    region = scope.resolve(store_arg(call, "region", 3))
    if not region:
        return index
    if not index:
        return region
    try:
        return fuse_slice(region, index)
    except Exception:  # noqa: BLE001 -- unreadable: the caller treats it as unknown
        return None


def write_units(
    index: Any, shape: tuple[int, ...], unit: tuple[int, ...]
) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]] | None:
    """The shards (grid coordinates) that writing ``shape``'s ``index`` covers whole
    and in part; None if ``index`` is not a tuple of slices of step 1."""
    if index is None or index == ():
        index = tuple(slice(None) for _ in shape)
    if not isinstance(index, tuple):
        index = (index,)
    if len(index) > len(shape) or not all(isinstance(s, slice) for s in index):
        return None
    index = index + tuple(slice(None) for _ in range(len(shape) - len(index)))
    spans: list[tuple[range, set[int]]] = []
    for s, n, u in zip(index, shape, unit, strict=True):
        start, stop, step = s.indices(n)
        if step != 1:
            return None
        if stop <= start:
            return [], []
        first, last = start // u, (stop - 1) // u
        edges = {i for i, cut in ((first, start % u), (last, _cut_at(stop, n, u))) if cut}
        spans.append((range(first, last + 1), edges))
    whole: list[tuple[int, ...]] = []
    part: list[tuple[int, ...]] = []
    for coords in itertools.product(*(r for r, _ in spans)):
        cut = any(c in edges for c, (_, edges) in zip(coords, spans, strict=True))
        (part if cut else whole).append(coords)
    return whole, part


def _cut_at(stop: int, n: int, u: int) -> int:
    """Nonzero when a write ending at ``stop`` ends inside a unit (the array's last,
    shorter unit counts as whole when the write reaches the end)."""
    return 0 if stop == n else stop % u
