"""The dask ``get`` protocol on Ray: wires graph, plan, state machine and executor.

``RaySchedule.get`` is what ``dask.config.set(scheduler=...)`` takes. Its
``persist`` method is dask's documented hook for schedulers with their own persist
(``dask.base.persist`` looks for ``schedule.__self__.persist``): it runs the graph
without fetching and rebuilds the collections around ``RayFuture``s, so no data
reaches the driver and dropping the collection frees the objects.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import pickle
import threading
import time
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import dask.base
import ray
import ray.util.client
from dask._task_spec import DataNode, Task
from dask.base import get_annotations
from dask.callbacks import local_callbacks, unpack_callbacks
from dask.core import literal
from dask.sizeof import sizeof

from ray_oob_sched import _caller, _graph, _p2p, _partd, _store, _store_order, _taskconfig
from ray_oob_sched._config import SchedulerConfig, ServiceOptions, ShuffleConfig
from ray_oob_sched._executor import (
    RayExecutor,
    UnpicklableGroupError,
    barrier_value,
    may_be_actor_loss,
    user_error,
)
from ray_oob_sched._fuse import Group, group_size, plan
from ray_oob_sched._futures import REGISTRY, RayFuture
from ray_oob_sched._graph import Key
from ray_oob_sched._keywords import sort_keywords, warn_ignored
from ray_oob_sched._options import options_token, per_key_options
from ray_oob_sched._owned import owned
from ray_oob_sched._prestart import Prestart
from ray_oob_sched._rechunk_tasks import rechunk_as_tasks
from ray_oob_sched._refs import RefTable
from ray_oob_sched._restart import RestartLimitError, ShuffleActorLostError, ShuffleTasks
from ray_oob_sched._runtime import RayRuntime
from ray_oob_sched._state import (
    Abandon,
    Instruction,
    OutputWindow,
    Release,
    RestartShuffles,
    SchedulerState,
)
from ray_oob_sched._status import (
    ShuffleProgress,
    ShuffleRunTotals,
    ShuffleStatus,
    run_status,
    run_totals,
)
from ray_oob_sched._task_warnings import Forwarder
from ray_oob_sched._worker import GroupSpec, GroupStatus, TaskContext, run_group
from shuffle._tracebacks import drop_frame_locals

if TYPE_CHECKING:
    from shuffle.shell._service import ShuffleService

logger = logging.getLogger("ray_oob_sched")


@dataclass(frozen=True)
class RunStats:
    """What the last successful compute did: for demos, benchmarks and users."""

    dask_tasks: int  # tasks run (after culling); data already in Ray not counted
    ray_tasks: int  # Ray tasks submitted (one per group of fused tasks)
    objects: int  # task outputs that became objects in Ray
    from_store: int  # keys already in Ray: persisted results, large data put once
    shuffles: int  # p2p shuffles run through the out-of-band shuffle actors
    seconds: float
    restarts: int = 0  # shuffle restarts after a shuffle actor died mid-run
    in_caller: int = 0  # dask tasks run in the caller's process (``_caller``)
    #: per shuffle (its last run): inputs, pieces and bytes received, spilled, seconds
    shuffle_runs: tuple[ShuffleRunTotals, ...] = ()

    @property
    def shuffle_bytes(self) -> int:
        """Payload bytes the shuffle actors received over every shuffle of the compute."""
        return sum(r.bytes_received for r in self.shuffle_runs)

    @property
    def shuffle_gb_per_s(self) -> float:
        """``shuffle_bytes`` per second of the whole compute, in GB/s (10**9 bytes)."""
        return self.shuffle_bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


class RaySchedule:
    """A Dask scheduler that runs graphs as Ray tasks. Use ``get``, ``persist``."""

    def __init__(self) -> None:
        self.runtime = RayRuntime()
        self.last_stats: RunStats | None = None
        self._shuffle_service: ShuffleService | None = None  # on first use
        self._service_options: ServiceOptions | None = None  # what it was started with
        self._prestart: Prestart | None = None
        # Computes running shuffles now (several threads may compute at once).
        self._active: dict[int, tuple[ShuffleProgress, _p2p.P2PRewrite]] = {}
        self._active_lock = threading.Lock()

    # A scheduler is a service with a lock, Ray handles and actors: copies of
    # dask.config (dask deep-copies it) share it, and the package's instance pickles
    # by reference.
    def __copy__(self) -> RaySchedule:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> RaySchedule:
        return self

    def __reduce__(self) -> str:
        if self is not DEFAULT:
            raise TypeError(
                "only ray_oob_sched's own scheduler (ray_oob_sched.get) can be pickled; "
                "a RaySchedule made by hand holds a lock and Ray state"
            )
        return "DEFAULT"

    def shuffle_service(self) -> ShuffleService:
        """The out-of-band shuffle service (actors start on first use, or ahead of it:
        ``prestart``)."""
        service = self._service()
        if self._prestart is not None:
            self._prestart.wait()  # its actors() must not overlap ours
        return service

    def prestart(self) -> None:
        """Start the shuffle actors and ready the workers' senders in the background
        (``_prestart``), once, if Ray is running, no service exists yet, and
        ``shuffle.prestart`` is on. Never blocks."""
        if self._shuffle_service is not None or not ray.is_initialized():
            return
        if ray.util.client.ray.is_connected():
            return  # refused at the first compute
        cfg = ShuffleConfig.from_dask_config()
        if cfg.prestart:
            self._prestart = Prestart(
                self._service(),
                warm_tasks=lambda: int(self.runtime.cluster_cpus()),
                timeout=cfg.timeout,
            )

    def _service(self) -> ShuffleService:
        if self._shuffle_service is None:
            from shuffle.shell._service import ShuffleService

            options = ShuffleConfig.from_dask_config().service_options()
            self._shuffle_service = ShuffleService(**options)
            self._service_options = options
        return self._shuffle_service

    def _reconfigure(self, options: ServiceOptions) -> None:
        """Stop the service if its settings are no longer dask.config's, so that the next
        use starts one with ``options``. Only between shuffles: a compute running a
        shuffle keeps the actors its runs live on (the caller holds ``_active_lock``)."""
        if self._shuffle_service is None or options == self._service_options:
            return
        if self._active:
            logger.warning(
                "shuffle settings changed while other computes run shuffles; this "
                "compute uses the running shuffle actors, with the settings they started with"
            )
            return
        logger.info("shuffle settings changed: restarting the shuffle actors")
        self.close()

    def close(self) -> None:
        """Stop the shuffle actors (they also die with the driver), also those started
        ahead of use."""
        prestart, self._prestart = self._prestart, None
        if prestart is not None:
            try:
                prestart.wait()
            except TimeoutError as e:
                logger.warning("closing the shuffle service: %s", e)
        if self._shuffle_service is not None:
            self._shuffle_service.close()
            self._shuffle_service = None
        if prestart is not None:
            prestart.stop()

    def shuffle_status(self, *, timeout: float = 2.0) -> ShuffleStatus:
        """The shuffles running now, with their progress and bytes per actor.

        Callable from any thread while computes run. Asks every shuffle actor once,
        with one ``timeout`` (seconds); actors that do not answer in time are listed in
        ``unanswered`` and their bytes left out.
        """
        if not timeout > 0:
            raise ValueError(f"shuffle_status: timeout must be > 0 seconds, got {timeout!r}")
        with self._active_lock:
            active = list(self._active.values())
        service = self._shuffle_service
        if not active or service is None:
            return ShuffleStatus(runs=())
        usage = service.usage(timeout=timeout)
        usages = [u for runs in usage.runs.values() for u in runs]
        out = []
        for progress, p2p in active:
            now = progress.clock()
            for sid, prog in progress.snapshot().items():
                handle = p2p.runs[sid]
                out.append(
                    run_status(
                        prog,
                        shuffle_id=sid,
                        run_id=int(handle.spec.run_id),
                        kind=_kind(handle),
                        usages=usages,
                        node_of=usage.node_of,
                        now=now,
                    )
                )
        return ShuffleStatus(runs=tuple(out), unanswered=usage.unanswered)

    def get(
        self,
        dsk: Any,
        keys: Any,
        *,
        callbacks: Any = None,
        ray_remote_args: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Compute ``keys`` of ``dsk`` on Ray and return their values."""
        return self._run(
            dsk,
            keys,
            result="values",
            callbacks=callbacks,
            ray_remote_args=ray_remote_args,
            **kwargs,
        )

    def get_refs(self, dsk: Any, keys: Any, **kwargs: Any) -> Any:
        """Like ``get``, but return ObjectRefs (in the shape of ``keys``), not values."""
        return self._run(dsk, keys, result="refs", **kwargs)

    def get_futures(self, dsk: Any, keys: Any, **kwargs: Any) -> Any:
        """Like ``get``, but return RayFutures, which later graphs may refer to."""
        return self._run(dsk, keys, result="futures", **kwargs)

    def persist(
        self, collections: Sequence[Any], optimize_graph: bool = True, **kwargs: Any
    ) -> list[Any]:
        """dask's persist hook: collections whose graphs hold RayFutures."""
        # A partial has no ``persist``, so dask.base.persist takes its own path
        # and rebuilds the collections around the futures we return.
        schedule = functools.partial(self.get_futures)
        return list(
            dask.base.persist(
                *collections, optimize_graph=optimize_graph, scheduler=schedule, **kwargs
            )
        )

    def _run(
        self,
        dsk: Any,
        keys: Any,
        *,
        result: Literal["values", "refs", "futures"],
        callbacks: Any = None,
        ray_remote_args: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        start = time.perf_counter()
        self.last_stats = None
        self.runtime.refuse_ray_client()  # before any work, also on invalid graphs
        keywords = sort_keywords(kwargs)
        warn_ignored(keywords.ignored, stacklevel=3)  # counted from here: keep it in _run
        prepared = self._prepare(
            dsk,
            keys,
            annotations=keywords.annotations,
            ray_remote_args=ray_remote_args,
            literal_outputs=result == "values",
        )
        refs = RefTable()
        shuffles = _Shuffles()
        disk = _DiskRefs()
        try:
            graph = prepared.graph
            if prepared.has_p2p:
                graph = self._start_shuffles(prepared, shuffles=shuffles)
            _seed_refs(graph, refs=refs, config=prepared.config)
            planned = _plan(graph, prepared=prepared, refs=refs, shuffles=shuffles)
            out, ran_here = self._execute(
                planned,
                prepared=prepared,
                refs=refs,
                shuffles=shuffles,
                disk=disk,
                callbacks=callbacks,
                fetch=result == "values",
            )
        except BaseException as e:
            _clear_ray_frames(e)
            raise
        finally:
            self._end_compute(refs=refs, shuffles=shuffles, disk=disk, prepared=prepared)
        self.last_stats = _finish_stats(
            planned, shuffles=shuffles, seconds=time.perf_counter() - start, in_caller=ran_here
        )
        if result == "futures":
            out = {k: REGISTRY.register(RayFuture(k, r)) for k, r in out.items()}
        return _nested(keys, {**out, **prepared.literals})

    def _prepare(
        self,
        dsk: Any,
        keys: Any,
        *,
        annotations: Mapping[str, Any],
        ray_remote_args: dict[str, Any] | None,
        literal_outputs: bool,
    ) -> _Prepared:
        """Materialise and check the graph, resolve every key's Ray options and read the
        config: all that can refuse a compute does so here, before anything runs.

        With ``literal_outputs``, requested keys that are plain data in the graph are
        returned as the objects themselves, as dask's local schedulers return them,
        not as copies made by a round trip through Ray."""
        nodes, graph_annotations = _graph.materialize(dsk)
        flat = _graph.output_keys(keys)
        literals = _literal_outputs(nodes, flat) if literal_outputs else {}
        flat = [k for k in flat if k not in literals]
        nodes, stores = _store.rewrite(nodes)  # before anything runs: may refuse a target
        graph = _graph.build(nodes, flat, resolve=REGISTRY.lookup)
        if stores.to_workers:  # partial writes into shared zarr shards: one at a time
            chained = _store_order.chain_shared_writes(graph.nodes, graph.order)
            if chained is not None:
                graph = _graph.build(chained, flat, resolve=REGISTRY.lookup)
        disk = _partd.find(graph.nodes, graph.dependents)
        if disk is not None:
            graph = dataclasses.replace(graph, nodes=_partd.keep(graph.nodes, disk.creators))
        has_p2p = bool(_p2p.p2p_barriers(graph.nodes))

        per_key = per_key_options(
            graph.order,
            graph_annotations,
            compute_annotations={**get_annotations(), **annotations},
            compute_remote_args=ray_remote_args,
        )
        # Validates every option set with Ray before anything is submitted.
        options_of, executor = _executor_for(per_key)

        self.runtime.ensure()
        strategy = None
        if disk is not None:
            strategy = self._disk_node(disk, per_key)
            per_key = _partd.pin(per_key, disk.pinned, strategy=strategy)
            options_of, executor = _executor_for(per_key)
        self.prestart()
        cpus = self.runtime.cluster_cpus()
        config = SchedulerConfig.from_dask_config(cluster_cpus=cpus)
        in_caller = _caller.caller_keys(
            graph.nodes,
            graph.dependents,
            stand_ins=stores.stand_ins,
            readers=stores.readers,
            exclude=disk.pinned if disk is not None else frozenset(),
        )
        if in_caller and not config.run_in_caller:
            raise _caller.refusal(*next(iter(in_caller.items())))
        return _Prepared(
            graph=graph,
            flat=flat,
            stores=stores,
            executor=executor,
            options_of={**options_of, **dict.fromkeys(in_caller, _caller.IN_CALLER)},
            config=config,
            cpus=cpus,
            has_p2p=has_p2p,
            disk=disk,
            disk_strategy=strategy,
            literals=literals,
        )

    def _disk_node(self, disk: _partd.DiskStores, per_key: Mapping[Key, Any]) -> Any:
        """The scheduling strategy that pins a compute's disk shuffles to one node."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        node = _partd.choose_node(
            self.runtime.nodes(),
            driver=self.runtime.driver_node(),
            need=_partd.need(per_key.get(k, {}) for k in disk.pinned),
        )
        return NodeAffinitySchedulingStrategy(node_id=node, soft=False)

    def _start_shuffles(self, prepared: _Prepared, *, shuffles: _Shuffles) -> _graph.Graph:
        """Rewrite the p2p shapes, starting their runs, and list them as active (for
        ``shuffle_status``); return the graph to run. Fills ``shuffles`` as it goes,
        so the cleanup closes whatever started."""
        shuffle_config = ShuffleConfig.from_dask_config()
        with self._active_lock:
            self._reconfigure(shuffle_config.service_options())
        shuffles.max_restarts = shuffle_config.max_restarts
        as_tasks = functools.partial(
            rechunk_as_tasks,
            nodes=self.runtime.alive_nodes(),
            max_pieces=shuffle_config.rechunk_tasks_max_pieces,
        )
        graph = prepared.graph
        p2p = _p2p.rewrite(
            graph.nodes,
            graph.dependents,
            start_run=lambda *a, **kw: self.shuffle_service().start_run(*a, **kw),
            rechunk_as_tasks=as_tasks,
        )
        assert p2p is not None  # has_p2p
        shuffles.p2p = p2p
        graph = _graph.build(p2p.nodes, prepared.flat, resolve=REGISTRY.lookup)
        progress = shuffles.progress = _progress_of(p2p)
        with self._active_lock:
            self._active[id(progress)] = (progress, p2p)
        return graph

    def _execute(
        self,
        planned: _Planned,
        *,
        prepared: _Prepared,
        refs: RefTable,
        shuffles: _Shuffles,
        disk: _DiskRefs,
        callbacks: Any,
        fetch: bool,
    ) -> tuple[dict[Key, Any], int]:
        """Run the planned groups; return ``{key: value}`` (``{key: ref}`` without
        ``fetch``) for the requested keys, and how many dask tasks ran in the
        caller's process."""
        p2p, config = shuffles.p2p, prepared.config
        runs = _ShuffleRuns(self.shuffle_service(), p2p) if p2p and p2p.runs else None
        context: Any = TaskContext(
            config=_taskconfig.snapshot(), forward_warnings=config.forward_warnings
        )
        if len(context.config) > config.inline_data_bytes:
            context = ray.put(context)  # once, not pickled into every task
        run = _Compute(
            run_in_caller=config.run_in_caller,
            pinned=prepared.disk.pinned if prepared.disk is not None else frozenset(),
            graph=planned.graph,
            groups=planned.groups,
            state=planned.state,
            refs=refs,
            executor=prepared.executor,
            callbacks=callbacks,
            unpacks=planned.unpacks,
            runs=runs,
            context=context,
            stores=prepared.stores,
            progress=shuffles.progress,
            disk=disk if prepared.disk is not None else None,
            creators=prepared.disk.creators if prepared.disk is not None else frozenset(),
            unpack_call_bytes=config.fuse.unpack_call_bytes,
            barrier_bytes=planned.barrier_bytes,
        )
        return run.execute(prepared.flat, fetch=fetch), run.ran_here

    def _end_compute(
        self, *, refs: RefTable, shuffles: _Shuffles, disk: _DiskRefs, prepared: _Prepared
    ) -> None:
        """Whatever happened: drop the compute's refs, unlist it from the active
        shuffles, close its runs (noting their usage for the stats) and remove its disk
        shuffles' stores (waiting for that)."""
        refs.clear()
        try:
            if shuffles.progress is not None:
                with self._active_lock:
                    del self._active[id(shuffles.progress)]
            if shuffles.p2p is not None:
                # Outputs already left the actors as objects: the runs can go.
                for handle in shuffles.p2p.handles:
                    shuffles.closed += self.shuffle_service().close_run(handle)
        finally:
            made, disk.made = disk.made, []
            # A creator that failed or was cancelled made no store (and its ref
            # holds the error); every group has ended by now.
            stores = [store for status, store in made if not _failed(status)]
            RayExecutor.drop_stores(stores, strategy=prepared.disk_strategy)


@dataclass(frozen=True)
class _Prepared:
    """A checked compute before anything runs: its graph, per-key options, config."""

    graph: _graph.Graph  # before the p2p rewrite
    flat: list[Key]  # the requested keys
    stores: _store.StoreTargets
    executor: RayExecutor
    options_of: Mapping[Key, Hashable]  # key -> options token (fusion keeps them apart)
    config: SchedulerConfig
    cpus: float
    has_p2p: bool
    disk: _partd.DiskStores | None = None  # partd stores: run on one node, removed after
    disk_strategy: Any = None  # the node affinity of ``disk``'s tasks
    literals: Mapping[Key, Any] = field(default_factory=dict)  # requested data: not run


@dataclass
class _DiskRefs:
    """One compute's partd stores, as their creators are submitted: what the cleanup
    removes."""

    made: list[tuple[Any, Any]] = field(default_factory=list)  # (status ref, store ref)


def _failed(status_ref: Any) -> bool:
    """Whether a group ended in failure (its status is ready and holds an error)."""
    ready, _ = ray.wait([status_ref], timeout=0, fetch_local=False)
    return bool(ready) and not RayExecutor.succeeded(status_ref)


def _executor_for(
    per_key: Mapping[Key, Mapping[str, Any]],
) -> tuple[dict[Key, Hashable], RayExecutor]:
    """Each key's options token, and an executor that validated every option set."""
    options_of: dict[Key, Hashable] = {}
    token_opts: dict[Hashable, Mapping[str, Any]] = {}
    token_key: dict[Hashable, Key] = {}
    for k, opts in per_key.items():
        token = options_token(opts)
        options_of[k] = token
        token_opts.setdefault(token, opts)
        token_key.setdefault(token, k)
    return options_of, RayExecutor(token_opts, keys_of=token_key)


@dataclass
class _Shuffles:
    """One compute's shuffles, filled as they start: what the cleanup closes and the
    stats report."""

    p2p: _p2p.P2PRewrite | None = None
    progress: ShuffleProgress | None = None
    max_restarts: int = 0
    closed: list[Any] = field(default_factory=list)  # shuffle._usage.RunUsage per run


@dataclass(frozen=True)
class _Planned:
    """The graph to run, grouped into Ray tasks, and the state machine over it."""

    graph: _graph.Graph
    groups: list[Group]
    sources: frozenset[Key]  # keys already in Ray
    ntasks: int  # dask tasks to run
    state: SchedulerState
    unpacks: Mapping[Key, _p2p.Unpack]  # kept current by restarts
    barrier_bytes: _BarrierBytes


class _BarrierBytes:
    """The bytes of a shuffle's inputs, as its finished barrier returned them: read
    once per barrier run (a restart makes a new ref), for the output window and for
    sizing a batch's unpack calls."""

    def __init__(self, refs: RefTable) -> None:
        self._refs = refs
        self._read: dict[Key, tuple[bytes, int | None]] = {}  # key -> (ref id, value)

    def __call__(self, barrier: Key) -> int | None:
        ref_id = self._refs[barrier].binary()  # the id, not the ref: holds nothing alive
        seen = self._read.get(barrier)
        if seen is None or seen[0] != ref_id:
            seen = self._read[barrier] = (ref_id, barrier_value(self._refs[barrier]))
        return seen[1]


def _literal_outputs(nodes: Mapping[Key, Any], flat: list[Key]) -> dict[Key, Any]:
    """The requested keys that are data in the graph, with their values: a DataNode
    (not an ObjectRef to fetch) or a task that only unwraps ``dask.core.literal``
    (what ``delayed(x, traverse=False)`` makes)."""
    found: dict[Key, Any] = {}
    for k in flat:
        node = nodes.get(k)
        if isinstance(node, DataNode) and not isinstance(node.value, ray.ObjectRef):
            found[k] = node.value
        elif (
            type(node) is Task
            and isinstance(node.func, literal)
            and not node.args
            and not node.kwargs
        ):
            found[k] = node.func.data
    return found


def _seed_refs(graph: _graph.Graph, *, refs: RefTable, config: SchedulerConfig) -> None:
    """Add the objects the graph starts from: persisted futures, ObjectRefs the user
    placed, and literals too large to inline (put once, not pickled into tasks)."""
    for k, ref in graph.external.items():
        refs.add(k, ref)
    for k in graph.order:
        node = graph.nodes[k]
        if isinstance(node, DataNode):
            if isinstance(node.value, ray.ObjectRef):
                refs.add(k, node.value)  # placed in the graph by the user
            elif sizeof(node.value) > config.inline_data_bytes:
                refs.add(k, ray.put(node.value))


def _plan(
    graph: _graph.Graph, *, prepared: _Prepared, refs: RefTable, shuffles: _Shuffles
) -> _Planned:
    """Group the tasks not in ``sources`` (fused to the configured size; unpacks are
    actor calls, batched per owning actor) and set up the state machine over the
    groups."""
    config, p2p = prepared.config, shuffles.p2p
    sources = frozenset(refs)
    unpacks = p2p.unpacks if p2p is not None else {}
    creators = prepared.disk.creators if prepared.disk is not None else frozenset()
    ntasks = sum(1 for k in graph.order if k not in sources)
    size = 1
    if config.fuse.enabled:
        size = group_size(
            ntasks,
            cluster_cpus=prepared.cpus,
            max_tasks=config.fuse.max_tasks,
            tasks_per_cpu=config.fuse.tasks_per_cpu,
        )
    groups = plan(
        graph,
        sources=sources,
        size=size,
        options_of=prepared.options_of,
        # A store's creator runs alone: its group's status then says whether it made one.
        fusable=lambda k: k not in unpacks and k not in creators,
        max_hoisted=config.fuse.max_hoisted if config.fuse.enabled else 0,
        batch_of=p2p.batch_of if p2p is not None else lambda k: None,
        max_batch=config.fuse.unpack_batch,
    )
    after = _batches_after_barriers(groups, unpacks)
    barrier_bytes = _BarrierBytes(refs)
    state = SchedulerState(
        groups,
        outputs=graph.outputs,
        sources=sources,
        max_in_flight=config.max_in_flight,
        shuffles=_shuffle_tasks(p2p) if p2p is not None and p2p.runs else None,
        max_restarts=shuffles.max_restarts,
        after=after,
        window=_output_window(
            groups,
            after,
            unpacks=unpacks,
            barrier_bytes=barrier_bytes,
            max_bytes=config.output_window_bytes,
        ),
        in_caller=frozenset(g.index for g in groups if g.options == _caller.IN_CALLER),
    )
    return _Planned(
        graph=graph,
        groups=groups,
        sources=sources,
        ntasks=ntasks,
        state=state,
        unpacks=unpacks,
        barrier_bytes=barrier_bytes,
    )


def _batches_after_barriers(groups: Sequence[Group], unpacks: Mapping[Key, Any]) -> dict[int, int]:
    """Each batch of unpacks (a group of several) waits for the group that computes
    its barrier: the barrier's value (the inputs' bytes) sizes the batch's actor
    calls (``RayExecutor.submit_unpacks``)."""
    producer = {k: g.index for g in groups for k in g.outputs}
    return {
        g.index: producer[g.inputs[0]]
        for g in groups
        if len(g.keys) > 1 and g.keys[0] in unpacks and g.inputs and g.inputs[0] in producer
    }


def _output_window(
    groups: Sequence[Group],
    after: Mapping[int, int],
    *,
    unpacks: Mapping[Key, _p2p.Unpack],
    barrier_bytes: _BarrierBytes,
    max_bytes: int,
) -> OutputWindow | None:
    """Back-pressure on the batches of shuffle outputs (``SchedulerState``), each
    weighed as an even share of its shuffle's inputs, which its finished barrier
    returned; None when off or without batches."""
    if max_bytes <= 0 or not after:
        return None

    def bytes_of(index: int) -> int:
        g = groups[index]
        nbytes = barrier_bytes(g.inputs[0])  # the barrier: its group finished
        if not nbytes:
            return 0  # failed: the unpacks raise its error
        return int(_p2p.output_share(unpacks[g.keys[0]], nbytes) * len(g.keys))

    return OutputWindow(groups=frozenset(after), max_bytes=max_bytes, bytes_of=bytes_of)


def _finish_stats(
    planned: _Planned, *, shuffles: _Shuffles, seconds: float, in_caller: int
) -> RunStats:
    """What a successful compute did (``RaySchedule.last_stats``)."""
    p2p, progress = shuffles.p2p, shuffles.progress
    return RunStats(
        dask_tasks=planned.ntasks,
        ray_tasks=len(planned.groups),
        objects=sum(len(g.outputs) for g in planned.groups),
        from_store=len(planned.sources),
        shuffles=len(p2p.runs) if p2p is not None else 0,
        seconds=seconds,
        restarts=sum(planned.state.restarts.values()),
        in_caller=in_caller,
        shuffle_runs=(
            _totals(p2p, progress, shuffles.closed)
            if p2p is not None and progress is not None
            else ()
        ),
    )


#: The package's scheduler: ``ray_oob_sched.get`` is its ``get``.
DEFAULT = RaySchedule()


def _shuffle_tasks(p2p: _p2p.P2PRewrite) -> dict[str, ShuffleTasks]:
    unpacks: dict[str, list[Key]] = {}
    for k, u in p2p.unpacks.items():
        unpacks.setdefault(str(u.handle.spec.shuffle_id), []).append(k)
    return {
        sid: ShuffleTasks(transfers=frozenset(keys), unpacks=frozenset(unpacks.get(sid, ())))
        for sid, keys in p2p.transfers.items()
    }


def _kind(handle: Any) -> str:
    """ "rechunk" for an array rechunk's run, else "shuffle"."""
    from shuffle._rechunk import RechunkLayout

    return "rechunk" if isinstance(handle.meta, RechunkLayout) else "shuffle"


def _progress_of(p2p: _p2p.P2PRewrite) -> ShuffleProgress:
    unpacks: dict[str, list[Key]] = {}
    for k, u in p2p.unpacks.items():
        unpacks.setdefault(str(u.handle.spec.shuffle_id), []).append(k)
    # p2p.transfers lists each shuffle's transfer keys, then its barrier's.
    transfers = {sid: keys[:-1] for sid, keys in p2p.transfers.items()}
    return ShuffleProgress(transfers=transfers, unpacks=unpacks)


def _totals(
    p2p: _p2p.P2PRewrite, progress: ShuffleProgress, closed: Sequence[Any]
) -> tuple[ShuffleRunTotals, ...]:
    now = progress.clock()
    return tuple(
        run_totals(
            prog,
            shuffle_id=sid,
            run_id=int(p2p.runs[sid].spec.run_id),
            kind=_kind(p2p.runs[sid]),
            usages=closed,
            seconds=now - prog.started,
        )
        for sid, prog in progress.snapshot().items()
    )


class _ShuffleRuns:
    """The Ray side of one compute's shuffle restarts: liveness checks and new runs."""

    def __init__(self, service: Any, p2p: _p2p.P2PRewrite) -> None:
        self.service = service  # shuffle.shell._service.ShuffleService
        self.p2p = p2p

    def run_id(self, shuffle_id: str) -> int:
        return int(self.p2p.runs[shuffle_id].spec.run_id)

    def dead_actors(self, shuffle_ids: Sequence[str]) -> dict[str, list[str]]:
        """Per shuffle, its run's participants that are dead (re-created by now)."""
        if not shuffle_ids:
            return {}
        alive = {a.name for a in self.service.actors()}  # re-creates dead actors
        found = {}
        for sid in shuffle_ids:
            dead = sorted(set(self.p2p.runs[sid].spec.participants) - alive)
            if dead:
                found[sid] = dead
        return found

    def nodes_of(self, actors: Sequence[str]) -> tuple[list[str], list[str]]:
        """The nodes ``actors`` ran on, and those of them that left the cluster."""
        nodes = sorted({n for a in actors if (n := self.service.node_of(a)) is not None})
        return nodes, [n for n in nodes if n in self.service.lost_nodes]

    def restart(self, shuffle_id: str) -> None:
        self.p2p.replace_run(self.service.restart_run(self.p2p.runs[shuffle_id]))


class _Compute:
    """One compute's loop: apply instructions, wait for groups, fetch outputs."""

    def __init__(
        self,
        *,
        run_in_caller: bool,
        pinned: frozenset[Key] = frozenset(),
        graph: _graph.Graph,
        groups: Sequence[Group],
        state: SchedulerState,
        refs: RefTable,
        executor: RayExecutor,
        callbacks: Any,
        unpacks: Mapping[Key, _p2p.Unpack],
        runs: _ShuffleRuns | None = None,
        context: Any,
        stores: _store.StoreTargets,
        progress: ShuffleProgress | None = None,
        disk: _DiskRefs | None = None,
        creators: frozenset[Key] = frozenset(),
        unpack_call_bytes: int,
        barrier_bytes: _BarrierBytes,
    ) -> None:
        self.run_in_caller = run_in_caller
        self.pinned = pinned  # keys of disk shuffles: they run on their node, never here
        self.fell_back = False  # a group Ray could not pickle ran here (logged once)
        #: Outputs of groups run in the caller that cannot be pickled: their
        #: consumers run there too.
        self.held: dict[Key, Any] = {}
        self.ran_here = 0  # dask tasks run in the caller's process
        self.graph = graph
        self.disk = disk
        self.unpack_call_bytes = unpack_call_bytes
        self.barrier_bytes = barrier_bytes
        self.creators = creators
        self.context = context  # TaskContext, or its ObjectRef
        self.stores = stores
        self.returned_targets: dict[Key, int] = {}  # key -> token (``_store``)
        self.forwarder = Forwarder()
        self.progress = progress
        self.unpacks = unpacks  # replaced entries after a restart: read at submission
        self.runs = runs
        self.groups = groups
        self.state = state
        self.refs = refs
        self.executor = executor
        self.callbacks = callbacks
        self.in_flight: dict[Any, int] = {}  # status ref -> group index
        state.view.update(cache=refs, dependencies=graph.dependencies, dependents=graph.dependents)

    def execute(self, flat: list[Key], *, fetch: bool) -> dict[Key, Any]:
        """Run every group; return ``{key: value}`` (or ``{key: ref}``) for ``flat``."""
        dsk, view = self.graph.nodes, self.state.view
        succeeded = False
        with local_callbacks(self.callbacks) as cbs:
            unpacked = unpack_callbacks(cbs)
            _, start_state_cbs, self._pretask, self._posttask, _ = unpacked
            started: list[Any] = []
            try:
                for cb in cbs:
                    if cb[0]:
                        cb[0](dsk)
                    started.append(cb)
                for f in start_state_cbs:
                    f(dsk, view)
                self._apply(self.state.start())
                while not self.state.done:
                    self._on_finished(self.executor.wait(list(self.in_flight)))
                self._put_returned_targets()
                out_refs = {k: self.refs[k] for k in flat if k not in self.held}
                values = self._fetch(out_refs) if fetch else out_refs
                for k in flat:
                    if k in self.held:
                        values[k] = self._held_output(k, fetch=fetch)
                succeeded = True
                return values
            finally:
                if self.in_flight:
                    self._cancel_in_flight()
                for cb in started:
                    if cb[4]:
                        cb[4](dsk, view, not succeeded)

    def _put_returned_targets(self) -> None:
        """Keys whose task returned a store target's stand-in get the real target,
        now that every chunk is written; put into Ray once per target."""
        put: dict[int, Any] = {}
        for k, token in self.returned_targets.items():
            if k in self.refs:
                if token not in put:
                    put[token] = ray.put(self.stores.target(token))
                self.refs.add(k, put[token])

    def _apply(self, instructions: list[Instruction]) -> None:
        dsk, view = self.graph.nodes, self.state.view
        for ins in instructions:
            if isinstance(ins, Release):
                self.refs.release(ins.keys)
                for k in ins.keys:
                    self.held.pop(k, None)
                continue
            if isinstance(ins, RestartShuffles):
                assert self.runs is not None
                for sid in ins.shuffle_ids:
                    self.runs.restart(sid)
                    if self.progress is not None:
                        self.progress.restarted(sid)
                continue
            if isinstance(ins, Abandon):
                self._abandon(ins.groups)
                continue
            g = ins.group
            for key in g.keys:
                for f in self._pretask:
                    f(key, dsk, view)
            if g.keys[0] in self.unpacks:
                args = [self.refs[k] for k in g.inputs]
                batch = [self.unpacks[k] for k in g.keys]
                # A batch waited for its barrier (``after``); a lone unpack did not.
                nbytes = self.barrier_bytes(g.inputs[0]) if len(batch) > 1 else None
                out = self.executor.submit_unpacks(
                    g, batch, args, inputs_nbytes=nbytes, max_bytes=self.unpack_call_bytes
                )
            else:
                out = self._submit(g)
            self.in_flight[out[0]] = g.index
            for k, r in zip(g.outputs, out[1:], strict=True):
                if r is None:
                    continue  # held in the caller's process
                self.refs.add(k, r)
                if k in self.creators and self.disk is not None:
                    self.disk.made.append((out[0], r))

    def _submit(self, g: Group) -> list[Any]:
        """Submit a group as a Ray task, or run it here (``_caller``): when planned
        so, when an input is held here, or when it cannot be pickled."""
        held = not self.held.keys().isdisjoint(g.inputs)
        if g.options == _caller.IN_CALLER or (held and self.pinned.isdisjoint(g.keys)):
            return self._run_here(g)
        if held:
            raise UnpicklableGroupError(
                f"dask keys {list(g.keys[:3])!r} of a disk shuffle need a value that only "
                "the caller's process holds (it cannot be pickled), but must run on the "
                "shuffle's node; make that value picklable"
            )
        args = [self.refs[k] for k in g.inputs]
        try:
            return self.executor.submit(g, self._spec(g), self.context, args)
        except UnpicklableGroupError as e:
            if not self.run_in_caller or not self.pinned.isdisjoint(g.keys):
                raise
            if not self.fell_back:
                self.fell_back = True
                logger.warning(
                    "dask keys %s cannot be pickled for a Ray task (%s); running them in "
                    "the caller's process, one group at a time (scheduler.run-in-caller)",
                    list(g.keys[:3]),
                    e.reason,
                )
        return self._run_here(g)

    def _spec(self, g: Group, replaced: Mapping[Key, Any] | None = None) -> GroupSpec:
        """What runs ``g``: its nodes, those in ``replaced`` taken from there."""
        nodes, replaced = self.graph.nodes, replaced or {}
        return GroupSpec(
            keys=g.keys,
            nodes=tuple(replaced[k] if k in replaced else nodes[k] for k in g.keys),
            inputs=g.inputs,
            outputs=g.outputs,
        )

    def _run_here(self, g: Group) -> list[Any]:
        """Run a group in the caller's process, as dask's local schedulers would:
        ``[status ref, *output refs]`` as for a Ray task, None for an output that
        cannot be pickled (held here for its consumers). Its inputs are computed
        (``SchedulerState`` waited for them) or being computed by groups already
        submitted, which finish without this loop; its own error is raised as is.
        Store calls run as dask made them, into the real targets under the caller's
        locks."""
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("running dask keys %s in the caller's process", list(g.keys[:3]))
        # No context: the caller's own config is in force (swapping it would change
        # what the caller's other threads see), and warnings reach the caller's
        # filters directly, as under dask's local schedulers.
        out = run_group(self._spec(g, self.stores.originals), self._values_here(g), context=None)
        self.ran_here += len(g.keys)
        refs: list[Any] = [ray.put(out[0])]
        for k, value in zip(g.outputs, out[1:], strict=True):
            token = self.stores.token_of(value)
            if token is not None:
                # A store target, which later groups still write: its key gets the real
                # target after the last write (``_put_returned_targets``), and until then
                # Ray holds the small stand-in, not a copy per chunk.
                self.returned_targets[k] = token
                refs.append(ray.put(self.stores.stand_in(token)))
                continue
            try:
                refs.append(ray.put(value))
            except (TypeError, pickle.PicklingError):
                self.held[k] = value
                refs.append(None)
        return refs

    def _values_here(self, g: Group) -> list[Any]:
        """Input values for a group run here: held values, the real store targets
        for their stand-ins (written by now), the rest fetched from Ray (a failed
        input raises its group's error, with its keys)."""
        keys = g.inputs
        fetch = [k for k in keys if k not in self.held and k not in self.returned_targets]
        try:
            values = ray.get([self.refs[k] for k in fetch])
        except ray.exceptions.RayError as e:
            failed = next((k for k in fetch if not RayExecutor.succeeded(self.refs[k])), None)
            if failed is None or failed not in self._producers:
                raise
            raise user_error(e, self._producers[failed]) from e
        got = dict(zip(fetch, values, strict=True))
        return [
            self.held[k]
            if k in self.held
            else self.stores.target(self.returned_targets[k])
            if k in self.returned_targets
            else got[k]
            for k in keys
        ]

    @functools.cached_property
    def _producers(self) -> dict[Key, Group]:
        """The group making each key (for naming a failed one: rare paths only)."""
        return {k: g for g in self.groups for k in g.outputs}

    def _held_output(self, key: Key, *, fetch: bool) -> Any:
        if fetch:
            return self.held[key]
        raise UnpicklableGroupError(
            f"dask key {key!r} ran in the caller's process and returned an object that "
            "cannot be pickled, so it cannot be kept in Ray's object store; compute it "
            "instead of persisting it"
        )

    def _on_finished(self, done: list[Any]) -> None:
        try:
            statuses = self.executor.statuses(done)
        except ray.exceptions.RayError:
            self._on_failures(done)
            return
        for ref, status in zip(done, statuses, strict=True):
            self._finish(ref, status)

    def _finish(self, ref: Any, status: GroupStatus) -> None:
        dsk, view = self.graph.nodes, self.state.view
        g = self.groups[self.in_flight.pop(ref)]
        if status.writes:
            self.stores.write(status.writes)
        self.returned_targets.update(status.targets)
        self.forwarder.emit(status.warnings)
        if self.progress is not None:
            self.progress.finished(g.keys)
        # Values stay in Ray: callbacks get None, not data nor refs (a kept
        # ref would outlive the compute).
        for key in g.keys:
            for f in self._posttask:
                f(key, None, dsk, view, status.worker)
        self._apply(self.state.group_finished(g.index))

    def _on_failures(self, done: Sequence[Any]) -> None:
        """Some of ``done`` failed: restart the shuffles that lost an actor, or raise
        the first failure with its keys; then finish the groups that succeeded."""
        succeeded = []
        for ref in done:
            if ref not in self.in_flight:
                continue  # abandoned by a restart meanwhile
            try:
                (status,) = self.executor.statuses([ref])
            except ray.exceptions.RayError as e:
                if not self._restart_for(e, ref):
                    group = self.groups[self.in_flight.pop(ref)]
                    self._observe_outputs([group])
                    raise user_error(e, group) from e
            else:
                succeeded.append((ref, status))
        for ref, status in succeeded:
            if ref in self.in_flight:
                self._finish(ref, status)

    def _restart_for(self, err: BaseException, ref: Any) -> bool:
        """Restart the shuffles that lost an actor if ``err`` comes from that.

        True if the failed group will run again. The restart is decided by a
        liveness check of the actors of the compute's incomplete shuffles, never by
        the error alone; past ``max-restarts`` raises ``ShuffleActorLostError``.
        """
        if (
            self.runs is None
            or not self.state.may_restart(self.in_flight[ref])
            or not may_be_actor_loss(err)
        ):
            return False
        dead = self.runs.dead_actors(self.state.incomplete_shuffles())
        if not dead:
            return False
        try:
            instructions = self.state.restart(sorted(dead))
        except RestartLimitError as limit:
            sid = limit.shuffle_id
            actors = dead.get(sid) or sorted({a for names in dead.values() for a in names})
            nodes, lost = self.runs.nodes_of(actors)
            raise ShuffleActorLostError(
                sid,
                self.runs.run_id(sid),
                actors,
                limit.restarts,
                self.state.max_restarts,
                nodes=nodes,
                lost_nodes=lost,
            ) from err
        restarted = [
            s for i in instructions if isinstance(i, RestartShuffles) for s in i.shuffle_ids
        ]
        logger.warning(
            "shuffle actors %s died mid-run (%s); restarting shuffles %s",
            sorted({a for names in dead.values() for a in names}),
            type(err).__name__,
            restarted,
        )
        self._apply(instructions)
        return ref not in self.in_flight

    def _abandon(self, indices: Sequence[int]) -> None:
        """Cancel groups a restart re-runs; their results and errors no longer count."""
        wanted = set(indices)
        stale = {ref: self.groups[i] for ref, i in self.in_flight.items() if i in wanted}
        for ref in stale:
            del self.in_flight[ref]
        self.executor.cancel(list(stale))
        self._observe_outputs([g for ref, g in stale.items() if not self.executor.succeeded(ref)])

    def _cancel_in_flight(self) -> None:
        left = [self.groups[i] for i in self.in_flight.values()]
        self.executor.cancel(list(self.in_flight))
        self.in_flight.clear()
        self._observe_outputs(left)

    def _observe_outputs(self, groups: Sequence[Group]) -> None:
        # Read failed or cancelled outputs so Ray does not log them as
        # "unhandled errors" once the refs are dropped.
        self.executor.observe([self.refs[k] for g in groups for k in g.outputs if k in self.refs])

    def _fetch(self, out_refs: dict[Key, Any]) -> dict[Key, Any]:
        """The values of ``out_refs``, the caller's own (``_owned``): read-only views
        of Ray's store are copied once."""
        try:
            values = self.executor.fetch(list(out_refs.values()))
        except ray.exceptions.RayError:
            pass
        else:
            return {k: owned(v) for k, v in zip(out_refs, values, strict=True)}
        # Rare path: fetch one by one to name the key whose object failed.
        by_key: dict[Key, Any] = {}
        for k, r in out_refs.items():
            try:
                by_key[k] = owned(self.executor.fetch([r])[0])
            except ray.exceptions.RayError as e:
                if k not in self._producers:
                    raise
                raise user_error(e, self._producers[k]) from e
        return by_key


# Trailing separators: "site-packages/ray" must not match "site-packages/raydp".
_OWN_DIRS = tuple(os.path.join(os.path.dirname(p), "") for p in (__file__, ray.__file__))


def _clear_ray_frames(exc: BaseException) -> None:
    """Drop the locals of our and Ray's finished frames in an exception's tracebacks.

    Those frames hold ObjectRefs (refs being waited on or fetched); a user who
    keeps the exception (``sys.last_value``, a test's ``excinfo``) would keep the
    objects alive. User code's frames are left intact for post-mortem debugging.
    """
    drop_frame_locals(exc, dirs=_OWN_DIRS)


def _nested(keys: Any, values: dict[Key, Any]) -> Any:
    if isinstance(keys, list):
        return tuple(_nested(k, values) for k in keys)
    return values[keys]
