"""The one place that knows how dask and distributed lay out peer-to-peer graphs.

dask emits transfer -> barrier -> unpack graphs for ``shuffle_method="p2p"``
(dataframe shuffle, set_index, sort_values, groupby with split_out, hash merge)
and ``method="p2p"`` array rechunks (one shuffle per "partial" that dask plans). Their barrier is a
``distributed.shuffle._core.P2PBarrierTask``, recognised here by class, not by key
names. Their functions call into a distributed worker, so this module rewrites
our own copy of the graph (dask itself is never patched):

- a transfer becomes a plain task calling ``shuffle.shell._transfer.transfer``, which
  splits the partition and sends the pieces out-of-band to the shuffle actors;
- the barrier becomes a cheap task that depends on every transfer;
- an unpack becomes an *actor call* (``Unpack``): the owning actor returns the
  output partition, so it becomes an ObjectRef owned by the driver. A merge
  unpack becomes two actor calls and a ``merge_chunk`` task. Unpacks of one run
  owned by one actor share a batch token (``P2PRewrite.batch_of``): fusion puts
  several in one group, fetched by actor calls that return each partition as its
  own object, as many per call as ``fuse.unpack-call-bytes`` allows
  (``unpack_calls``, sized from the barrier's value: a transfer returns its
  input's bytes, the barrier their sum).

A rechunk partial with a small plan (``_rechunk_tasks``) starts no run: its
unpacks become plain gather tasks reading the input chunks they overlap.

A rechunk's chunks are numbered flat (row-major) in the run; the transfer turns
dask's block index into that number, and unpacks name theirs. Shapes not understood
are refused with an error naming the versions, never run another way.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from dask._task_spec import Alias, GraphNode, List, Task, TaskRef
from dask.sizeof import sizeof

from ray_oob_sched._graph import Key, task_ref
from ray_oob_sched._worker import current_scope

if TYPE_CHECKING:
    from shuffle._rechunk import RechunkLayout


class UnsupportedGraphError(ValueError):
    """The graph contains a shape that ray_oob_sched cannot run (yet)."""


@dataclass(frozen=True)
class Unpack:
    """Run as ``actor.unpack(shuffle_id, run_id, [partition, ...], barrier)``."""

    handle: Any  # shuffle.shell._service.RunHandle
    partition: int

    def owner(self) -> str:
        """The participant that holds this output partition in the handle's run."""
        return str(self.handle.spec.owner_of(self.partition))


def output_share(unpack: Unpack, inputs_nbytes: int) -> float:
    """The estimated bytes of one output partition of ``unpack``'s run: an even share
    of what its inputs hold (its barrier's value)."""
    npartitions_out: int = unpack.handle.spec.npartitions_out
    return inputs_nbytes / npartitions_out


def unpack_calls(
    unpacks: Sequence[Unpack], *, inputs_nbytes: int | None = None, max_bytes: int | None = None
) -> list[tuple[str, list[int]]]:
    """The actor calls that fetch ``unpacks`` (one batch): per owning participant, in
    order of first appearance, the positions in ``unpacks`` it serves.

    A batch is planned with one owner; after a restart on fewer actors its partitions
    may belong to several, each of which is asked for its own. With
    ``inputs_nbytes`` (what the run's inputs hold: its barrier's value) and
    ``max_bytes``, an owner's positions are split further so that no call returns
    more than ``max_bytes`` of outputs, estimated as an even share of the inputs: an
    actor holds every output of a call until the call returns.
    """
    sids = {str(u.handle.spec.shuffle_id) for u in unpacks}
    if len(sids) != 1:
        raise ValueError(f"an unpack batch must read one shuffle, got {sorted(sids)}")
    calls: dict[str, list[int]] = {}
    for i, u in enumerate(unpacks):
        calls.setdefault(u.owner(), []).append(i)
    per_call = len(unpacks)
    if inputs_nbytes is not None and max_bytes is not None:
        each = output_share(unpacks[0], inputs_nbytes)
        per_call = max(1, int(max_bytes // each)) if each > 0 else per_call
    return [
        (owner, positions[i : i + per_call])
        for owner, positions in calls.items()
        for i in range(0, len(positions), per_call)
    ]


@dataclass
class P2PRewrite:
    nodes: dict[Key, GraphNode]
    unpacks: dict[Key, Unpack] = field(default_factory=dict)
    handles: list[Any] = field(default_factory=list)  # runs started: close them after
    # The current run per shuffle id; transfer tasks read it when they are pickled.
    runs: dict[str, Any] = field(default_factory=dict)
    # Per shuffle id: its transfer keys and its barrier key (what a restart re-runs).
    transfers: dict[str, tuple[Key, ...]] = field(default_factory=dict)

    def batch_of(self, key: Key) -> tuple[str, str] | None:
        """The batch token of an unpack (its shuffle and owning participant): fusion
        fetches unpacks with one token in one actor call. None for other keys."""
        u = self.unpacks.get(key)
        if u is None:
            return None
        return (str(u.handle.spec.shuffle_id), u.owner())

    def replace_run(self, handle: Any) -> None:
        """Use ``handle``, a new run of its shuffle, for every later submission."""
        sid = str(handle.spec.shuffle_id)
        self.runs[sid] = handle
        self.handles.append(handle)
        for k, u in self.unpacks.items():
            if str(u.handle.spec.shuffle_id) == sid:
                self.unpacks[k] = Unpack(handle, u.partition)


StartRun = Callable[..., Any]  # ShuffleService.start_run


def _versions() -> str:
    import dask
    import distributed

    # As dask's and distributed's __init__ set it ("unknown" when not installed).
    return ", ".join(
        f"{m.__name__} {getattr(m, '__version__', 'unknown')}" for m in (dask, distributed)
    )


def _barrier_class() -> type | None:
    try:
        from distributed.shuffle._core import P2PBarrierTask
    except ImportError:  # no distributed: dask cannot build p2p graphs either
        return None
    return P2PBarrierTask


def p2p_barriers(nodes: Mapping[Key, Any]) -> list[Key]:
    """Keys of the p2p barrier tasks in a task-spec graph."""
    cls = _barrier_class()
    if cls is None:
        return []
    return [k for k, node in nodes.items() if isinstance(node, cls)]


def _unsupported(what: str, key: Key) -> UnsupportedGraphError:
    return UnsupportedGraphError(
        f"{what} (at key {key!r}; {_versions()}) is not supported by ray_oob_sched; "
        "use shuffle_method='tasks' (dataframes) or method='tasks' (rechunks)"
    )


def _barrier_done(run_id: int, *transfers: int) -> int:
    """The bytes the run's inputs held (each transfer returns its input's): the
    driver sizes batched unpacks from it (``unpack_calls``). Unpacks take the run
    (``run_id``) from their handle."""
    return sum(transfers)


def _must_be_actor_call(*_: Any) -> Any:
    raise RuntimeError("a p2p unpack ran as a task; it must run as a shuffle actor call")


def _merge_unpacked(left: Any, right: Any, *args: Any) -> Any:
    from dask.dataframe.multi import merge_chunk

    how, left_on, right_on, result_meta, suffixes, left_index, right_index, indicator = args
    return merge_chunk(
        left,
        right,
        how=how,
        result_meta=result_meta,
        left_on=left_on,
        right_on=right_on,
        suffixes=suffixes,
        left_index=left_index,
        right_index=right_index,
        indicator=indicator,
    )


@dataclass(frozen=True)
class _Transfer:
    """Stands in for distributed's ``shuffle_transfer(df, id, input_partition)`` and
    ``rechunk_transfer(chunk, id, block_index)``."""

    handles: Mapping[str, Any]  # shuffle id -> RunHandle: P2PRewrite.runs, kept current

    def __call__(self, df: Any, shuffle_id: str, input_partition: int | tuple[int, ...]) -> int:
        """Send ``df``; return its size in bytes, which the barrier sums."""
        from shuffle._rechunk import is_rechunk
        from shuffle.shell._transfer import InputBatch, transfer

        handle = self.handles[shuffle_id]
        scope = current_scope()
        if (
            scope is None
            or is_rechunk(handle.meta)
            or not handle.options.combine_bytes
            or isinstance(input_partition, tuple)
        ):
            transfer(df, handle, input_partition)
        else:
            # The inputs of one run that this group computes are sent combined, at the
            # latest when the group ends (``_worker``), before any marker leaves it.
            token = ("shuffle-transfer", handle.spec.shuffle_id, handle.spec.run_id)
            batch: InputBatch = scope.deferred(token, lambda: InputBatch(handle))
            batch.add(df, input_partition)
        return int(sizeof(df))


@dataclass(frozen=True)
class _Known:
    """dask's and distributed's p2p functions and specs: the only shapes we rewrite."""

    shuffle_transfer: Any
    merge_code: Any  # the code object of dask's merge-transfer closures
    shuffle_unpack: Any
    merge_unpack: Any
    df_spec: type[Any]
    rechunk_transfer: Any
    rechunk_unpack: Any
    array_spec: type[Any]
    concatenate_shaped: Any  # dask's merge of small chunks into a transfer's input

    @classmethod
    def load(cls) -> _Known:
        """Imported only for graphs with p2p barriers: they need dask.dataframe."""
        from dask.array.core import concatenate_shaped
        from dask.dataframe.dask_expr._merge import create_assign_index_merge_transfer
        from dask.dataframe.dask_expr._shuffle import _shuffle_transfer
        from distributed.shuffle._merge import merge_unpack
        from distributed.shuffle._rechunk import (
            ArrayRechunkSpec,
            rechunk_transfer,
            rechunk_unpack,
        )
        from distributed.shuffle._shuffle import DataFrameShuffleSpec, shuffle_unpack

        merge = create_assign_index_merge_transfer()
        return cls(
            shuffle_transfer=_shuffle_transfer,
            merge_code=merge.__code__,
            shuffle_unpack=shuffle_unpack,
            merge_unpack=merge_unpack,
            df_spec=DataFrameShuffleSpec,
            rechunk_transfer=rechunk_transfer,
            rechunk_unpack=rechunk_unpack,
            array_spec=ArrayRechunkSpec,
            concatenate_shaped=concatenate_shaped,
        )

    def is_transfer(self, func: Any, *, rechunk: bool) -> bool:
        """Whether ``func`` is a transfer function we replace, for a rechunk or not."""
        if rechunk:
            return func is self.rechunk_transfer
        return func is self.shuffle_transfer or getattr(func, "__code__", None) is self.merge_code

    def unpacks(self, *, rechunk: bool) -> tuple[Any, ...]:
        """The unpack functions we replace, for a rechunk or not."""
        return (self.rechunk_unpack,) if rechunk else (self.shuffle_unpack, self.merge_unpack)


def rewrite(
    nodes: Mapping[Key, GraphNode],
    dependents: Mapping[Key, set[Key]],
    *,
    start_run: StartRun,
    rechunk_as_tasks: Callable[[Any], bool] = lambda layout: False,
) -> P2PRewrite | None:
    """Our runnable copy of a graph with p2p shapes, or None when it has none.

    ``start_run`` (the shuffle service's) is called once per shuffle: it starts
    the run on the actors and returns its handle. Every shape is checked before
    the first run starts, so a refused graph leaves nothing to clean up.
    ``rechunk_as_tasks(layout)`` says which rechunk partials run as gather tasks
    instead (``_rechunk_tasks``): they start no run.
    """
    barriers = p2p_barriers(nodes)
    if not barriers:
        return None
    steps = _Rewriter(nodes=nodes, dependents=dependents, known=_Known.load())
    steps.plan_rechunks(barriers)
    steps.check_shapes(barriers)
    with_runs = steps.gather_small_rechunks(barriers, as_tasks=rechunk_as_tasks)
    steps.start_runs(with_runs, start_run=start_run)
    steps.rewrite_transfers(with_runs)
    steps.rewrite_unpacks(with_runs)
    return steps.out


class _Rewriter:
    """One graph's rewrite: each method is one pass of ``rewrite``, run in that order."""

    def __init__(
        self, *, nodes: Mapping[Key, GraphNode], dependents: Mapping[Key, set[Key]], known: _Known
    ) -> None:
        self.nodes = nodes  # dask's graph, never modified
        self.dependents = dependents
        self.known = known
        self.layouts: dict[Key, RechunkLayout] = {}  # rechunk barrier -> its plan
        self.out = P2PRewrite(nodes=dict(nodes))

    def plan_rechunks(self, barriers: Sequence[Key]) -> None:
        """Plan each rechunk barrier's layout and refuse unknown barrier specs, so a
        rechunk we cannot plan fails before any run starts."""
        from shuffle._rechunk import RechunkLayout

        for b in barriers:
            spec = _spec(self.nodes, b)
            if isinstance(spec, self.known.array_spec):
                try:
                    self.layouts[b] = RechunkLayout(spec.old, spec.new)
                except ValueError as e:
                    raise _unsupported(f"a p2p rechunk that cannot be planned ({e})", b) from None
            elif not isinstance(spec, self.known.df_spec):
                raise _unsupported(f"a p2p {type(spec).__name__}", b)

    def check_shapes(self, barriers: Sequence[Key]) -> None:
        """Refuse transfers and unpacks calling functions we do not replace: they would
        call into a distributed worker that is not there."""
        for b in barriers:
            rechunk = b in self.layouts
            for t in self.nodes[b].dependencies:
                func = getattr(_resolve_alias(self.nodes, t), "func", None)
                if not self.known.is_transfer(func, rechunk=rechunk):
                    raise _unsupported(f"a p2p transfer calling {func!r}", t)
            for u in self.dependents.get(b, ()):
                func = getattr(self.nodes[u], "func", None)
                if func not in self.known.unpacks(rechunk=rechunk):
                    raise _unsupported(f"a p2p unpack calling {func!r}", u)

    def gather_small_rechunks(
        self, barriers: Sequence[Key], *, as_tasks: Callable[[Any], bool]
    ) -> list[Key]:
        """Rewrite the rechunk partials that ``as_tasks`` picks as gather tasks (cheaper
        than a run for small plans); return the barriers that need a run."""
        gathered = [b for b in barriers if b in self.layouts and as_tasks(self.layouts[b])]
        for b in gathered:
            self._gather_rechunk(b, self.layouts[b])
        return [b for b in barriers if b not in gathered]

    def _gather_rechunk(self, barrier: Key, layout: RechunkLayout) -> None:
        """Rewrite one (checked) rechunk partial as gather tasks, one per output chunk.

        A transfer becomes its input chunk (fused with its producer like any task); an
        unpack reads the transfers of the input chunks it overlaps. Where dask merged
        small chunks into a transfer's input first (``concatenate_shaped``), the
        gather task reads those chunks themselves, which saves copying the whole
        array once. The barrier is left without dependents, so the graph's cull
        drops it (and any merge and transfer nobody reads).
        """
        from ray_oob_sched._rechunk_tasks import Grid, gather_chunk, gather_inputs

        by_input: dict[int, Key] = {}
        tiles: dict[int, tuple[Grid, list[Key]]] = {}
        known = all(n is not None for axis in (*layout.old, *layout.new) for n in axis)
        for t in self.nodes[barrier].dependencies:
            node = _resolve_alias(self.nodes, t)
            assert isinstance(node, Task) and node.func is self.known.rechunk_transfer  # checked
            i = layout.flat_input(tuple(node.args[2]))  # (chunk, id, block index)
            by_input[i] = t
            self.out.nodes[t] = Task(t, _pass_chunk, node.args[0])
            merged = self._merged_tiles(node.args[0], ndim=layout.ndim) if known else None
            if merged is not None:
                tiles[i] = merged
        for u in self.dependents.get(barrier, ()):
            # (id, block index, barrier)
            flat = layout.flat_output(tuple(_task(self.nodes, u).args[1]))
            grids: list[Grid] = []
            refs: list[TaskRef] = []
            for i in gather_inputs(layout, flat):
                grid, keys = tiles.get(i, (None, [by_input[i]]))
                grids.append(grid)
                refs.extend(task_ref(k) for k in keys)
            self.out.nodes[u] = Task(u, gather_chunk, layout, flat, tuple(grids), *refs)

    def _merged_tiles(self, chunk: Any, *, ndim: int) -> tuple[tuple[int, ...], list[Key]] | None:
        """The grid and keys of the chunks that dask concatenates into ``chunk`` (a
        transfer's input), or None when it is not such a plain merge."""
        if not isinstance(chunk, (TaskRef, Alias)) or chunk.key not in self.nodes:
            return None
        node = _resolve_alias(self.nodes, chunk.key)
        if type(node) is not Task or node.func is not self.known.concatenate_shaped:
            return None
        parts, grid = (*node.args, None)[:2]
        if not isinstance(parts, List) or not isinstance(grid, (list, tuple)):
            return None
        keys: list[Key] = [p.key for p in parts.args if isinstance(p, (TaskRef, Alias))]
        shape = tuple(int(n) for n in grid)
        if len(keys) != len(parts.args) or len(shape) != ndim or math.prod(shape) != len(keys):
            return None
        return shape, keys

    def start_runs(self, barriers: Sequence[Key], *, start_run: StartRun) -> None:
        """Start one run per shuffle; each handle is recorded as soon as it exists, so
        the caller closes every started run whatever happens next."""
        for b in barriers:
            spec = _spec(self.nodes, b)
            if b in self.layouts:
                layout = self.layouts[b]
                handle = start_run(
                    str(spec.id),
                    npartitions_out=layout.npartitions_out,
                    meta=layout,
                    npartitions_in=layout.npartitions_in,
                )
            else:
                # The graph is culled: its unpacks are the outputs this compute needs. With
                # a selection (``.partitions[...]``) senders drop the other outputs' rows.
                needed = sorted(
                    {
                        _unpack_partition(self.nodes[u], self.known.shuffle_unpack)
                        for u in self.dependents.get(b, ())
                    }
                )
                handle = start_run(
                    str(spec.id),
                    npartitions_out=spec.npartitions,
                    meta=spec.meta,
                    column=spec.column,
                    drop_column=spec.drop_column,
                    needed=None if len(needed) == spec.npartitions else needed,
                    # One transfer per input partition, numbered from 0 (dask's layout).
                    npartitions_in=len(self.nodes[b].dependencies),
                )
            self.out.handles.append(handle)  # the caller closes these, whatever happens next
            self.out.runs[str(spec.id)] = handle

    def rewrite_transfers(self, barriers: Sequence[Key]) -> None:
        """Make transfers send out-of-band through ``_Transfer`` and each barrier a cheap
        task over its transfers; record what a restart of each shuffle re-runs."""
        transfer_fn = _Transfer(self.out.runs)  # the live dict: restarts update it
        merge_transfer_fns: dict[int, Any] = {}  # one swapped closure per dask closure
        for b in barriers:
            spec = _spec(self.nodes, b)
            handle = self.out.runs[str(spec.id)]
            transfers = sorted(self.nodes[b].dependencies, key=repr)
            for t in transfers:
                node = _resolve_alias(self.nodes, t)
                assert isinstance(node, Task)  # checked
                if node.func is self.known.shuffle_transfer or (
                    node.func is self.known.rechunk_transfer
                ):
                    self.out.nodes[t] = Task(t, transfer_fn, *node.args)
                    continue
                fn = merge_transfer_fns.get(id(node.func))
                if fn is None:
                    assert isinstance(node.func, types.FunctionType)  # checked: has merge code
                    fn = merge_transfer_fns[id(node.func)] = _with_transfer(node.func, transfer_fn)
                self.out.nodes[t] = Task(t, fn, *node.args)
            self.out.nodes[b] = Task(
                b, _barrier_done, handle.spec.run_id, *(task_ref(t) for t in transfers)
            )
            self.out.transfers[str(spec.id)] = (*transfers, b)

    def rewrite_unpacks(self, barriers: Sequence[Key]) -> None:
        """Make unpacks actor calls on their run (``Unpack``), so outputs leave the
        actors as driver-owned objects; a merge unpack becomes two and a merge task."""
        for b in barriers:
            for u in self.dependents.get(b, ()):
                node = _task(self.nodes, u)
                if node.func is self.known.rechunk_unpack:
                    sid, index = node.args[0], node.args[1]
                    partition = self.layouts[b].flat_output(tuple(index))
                    self.out.nodes[u] = Task(u, _must_be_actor_call, task_ref(b))
                    self.out.unpacks[u] = Unpack(self.out.runs[str(sid)], partition)
                elif node.func is self.known.shuffle_unpack:
                    sid, partition = node.args[0], node.args[1]
                    self.out.nodes[u] = Task(u, _must_be_actor_call, task_ref(b))
                    self.out.unpacks[u] = Unpack(self.out.runs[str(sid)], int(partition))
                else:  # merge_unpack, checked
                    self._rewrite_merge_unpack(u, node)

    def _rewrite_merge_unpack(self, key: Key, node: Task) -> None:
        """One merge unpack as an actor call per side and a ``merge_chunk`` task; it is
        a dependent of both its barriers, so the second visit finds it done."""
        current = self.out.nodes[key]
        if isinstance(current, Task) and current.func is _merge_unpacked:
            return
        sid_l, sid_r, partition, bar_l, bar_r, *rest = node.args
        parts: list[TaskRef] = []
        for side, sid, bar in (("left", sid_l, bar_l), ("right", sid_r, bar_r)):
            if side == "right" and sid == sid_l:  # a self-merge: both sides are one shuffle
                parts.append(parts[0])  # an output partition leaves its actor once
                continue
            unpack_key = ("ray-oob-unpack", side, key)
            barrier_key = bar.key if isinstance(bar, (Alias, TaskRef)) else bar
            self.out.nodes[unpack_key] = Task(
                unpack_key, _must_be_actor_call, task_ref(barrier_key)
            )
            self.out.unpacks[unpack_key] = Unpack(self.out.runs[str(sid)], int(partition))
            parts.append(task_ref(unpack_key))
        self.out.nodes[key] = Task(key, _merge_unpacked, *parts, *rest)


def _spec(nodes: Mapping[Key, GraphNode], barrier: Key) -> Any:
    """The ``ShuffleSpec`` of a ``P2PBarrierTask`` (distributed's, untyped here)."""
    return cast(Any, nodes[barrier]).spec


def _task(nodes: Mapping[Key, GraphNode], key: Key) -> Task:
    node = nodes[key]
    assert isinstance(node, Task)  # checked by _Rewriter.check_shapes
    return node


def _pass_chunk(chunk: Any) -> Any:
    return chunk


def _unpack_partition(node: Any, shuffle_unpack: Any) -> int:
    """The output partition a (checked) shuffle or merge unpack task reads."""
    if node.func is shuffle_unpack:  # shuffle_unpack(id, partition, barrier)
        return int(node.args[1])
    return int(node.args[2])  # merge_unpack(id_left, id_right, partition, ...)


def _resolve_alias(nodes: Mapping[Key, GraphNode], key: Key) -> GraphNode:
    node = nodes[key]
    seen = {key}
    while isinstance(node, Alias) and node.target in nodes and node.target not in seen:
        seen.add(node.target)
        node = nodes[node.target]
    return node


def _with_transfer(func: types.FunctionType, transfer: Any) -> types.FunctionType:
    """dask's merge-transfer closure with its ``merge_transfer`` free variable swapped.

    A new function object from dask's own code; dask's function is untouched.
    """
    cells = tuple(
        types.CellType(transfer) if name == "merge_transfer" else cell
        for name, cell in zip(func.__code__.co_freevars, func.__closure__ or (), strict=True)
    )
    if "merge_transfer" not in func.__code__.co_freevars:
        raise _unsupported("a merge transfer without a merge_transfer variable", func.__qualname__)
    return types.FunctionType(
        func.__code__, func.__globals__, func.__name__, func.__defaults__, cells
    )
