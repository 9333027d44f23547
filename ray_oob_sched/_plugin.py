"""The dask ``get`` protocol on Ray: wires graph, plan, state machine and executor.

``RaySchedule.get`` is what ``dask.config.set(scheduler=...)`` takes. Its
``persist`` method is dask's documented hook for schedulers with their own persist
(``dask.base.persist`` looks for ``schedule.__self__.persist``): it runs the graph
without fetching and rebuilds the collections around the ObjectRefs, so no data
reaches the driver and dropping the collection frees the objects.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import dask
import dask.base
from dask.callbacks import local_callbacks, unpack_callbacks
from dask.sizeof import sizeof

import ray

from ray_oob_sched import _graph
from ray_oob_sched._config import SchedulerConfig
from ray_oob_sched._executor import RayExecutor, user_error
from ray_oob_sched._fuse import group_size, plan
from ray_oob_sched._futures import FutureRegistry, RayFuture
from ray_oob_sched._p2p import refuse_p2p
from ray_oob_sched._options import options_token, per_key_options
from ray_oob_sched._refs import RefTable
from ray_oob_sched._runtime import RayRuntime
from ray_oob_sched._state import Release, SchedulerState, Submit
from ray_oob_sched._worker import GroupSpec

Key = Hashable

# Keywords other dask schedulers take; meaningless here, accepted so that code
# written for them keeps working. ``ray_persist`` is injected by ray.util.dask's
# patch of dask.persist.
_IGNORED_KWARGS = frozenset(
    {
        "num_workers",
        "pool",
        "chunksize",
        "get_id",
        "rerun_exceptions_locally",
        "pack_exception",
        "raise_exception",
        "cache",
        "ray_persist",
    }
)


@dataclass(frozen=True)
class RunStats:
    """What the last compute did: for demos, benchmarks and curious users."""

    dask_tasks: int  # tasks run (after culling), data already in Ray not counted
    ray_tasks: int  # Ray tasks submitted (one per group of fused tasks)
    objects: int  # ObjectRefs the scheduler held at some point (task outputs)
    from_store: int  # keys already in Ray: persisted results, large data put once
    seconds: float


class RaySchedule:
    """A Dask scheduler that runs graphs as Ray tasks. Use ``get``, ``persist``."""

    def __init__(self) -> None:
        self.runtime = RayRuntime()
        self.futures = FutureRegistry()
        self.last_stats: RunStats | None = None

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
            dsk, keys, result="values", callbacks=callbacks, ray_remote_args=ray_remote_args,
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
        """dask's persist hook: collections whose graphs hold ObjectRefs."""
        kwargs.pop("ray_persist", None)
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
        unknown = set(kwargs) - _IGNORED_KWARGS
        if unknown:
            raise TypeError(
                f"ray_oob_sched.get got unexpected keyword arguments {sorted(unknown)}; "
                "it takes callbacks= and ray_remote_args="
            )
        nodes, annotations = _graph.materialize(dsk)
        flat = _graph.output_keys(keys)
        graph = _graph.build(nodes, flat, resolve=self.futures.lookup)
        refuse_p2p(graph.nodes)

        per_key = per_key_options(
            graph.order,
            annotations,
            compute_annotations=dask.get_annotations(),
            compute_remote_args=ray_remote_args,
        )
        options_of: dict[Key, Hashable] = {}
        token_opts: dict[Hashable, dict[str, Any]] = {}
        token_key: dict[Hashable, Key] = {}
        for k, opts in per_key.items():
            token = options_token(opts)
            options_of[k] = token
            token_opts.setdefault(token, opts)
            token_key.setdefault(token, k)
        # Validates every option set with Ray before anything is submitted.
        executor = RayExecutor(token_opts, keys_of=token_key)

        self.runtime.ensure()
        cpus = self.runtime.cluster_cpus()
        config = SchedulerConfig.from_dask_config(cluster_cpus=cpus)

        refs = RefTable()
        for k, ref in graph.external.items():
            refs.add(k, ref)
        for k in graph.order:
            is_data, value = _graph.data_value(graph.nodes[k])
            if not is_data:
                continue
            if isinstance(value, ray.ObjectRef):
                refs.add(k, value)  # a persisted result: already in Ray
            elif sizeof(value) > config.inline_data_bytes:
                refs.add(k, ray.put(value))
        sources = frozenset(refs)

        ntasks = sum(1 for k in graph.order if k not in sources)
        size = (
            group_size(
                ntasks,
                cluster_cpus=cpus,
                max_tasks=config.fuse.max_tasks,
                tasks_per_cpu=config.fuse.tasks_per_cpu,
            )
            if config.fuse.enabled
            else 1
        )
        groups = plan(graph, sources=sources, size=size, options_of=options_of)
        state = SchedulerState(
            groups, outputs=graph.outputs, sources=sources, max_in_flight=config.max_in_flight
        )
        view = state.view
        view.update(cache=refs, dependencies=graph.dependencies, dependents=graph.dependents)
        try:
            out = self._loop(
                graph, groups, state, refs, executor, flat=flat, fetch=result == "values",
                callbacks=callbacks,
            )
        except BaseException as e:
            _clear_ray_frames(e)
            raise
        finally:
            refs.clear()
        self.last_stats = RunStats(
            dask_tasks=ntasks,
            ray_tasks=len(groups),
            objects=sum(len(g.outputs) for g in groups),
            from_store=len(sources),
            seconds=time.perf_counter() - start,
        )
        if result == "futures":
            futures = {k: RayFuture(k, r) for k, r in out.items()}
            for f in futures.values():
                self.futures.register(f)
            out = futures
        return _nested(keys, out)

    @staticmethod
    def _loop(
        graph: _graph.Graph,
        groups: Sequence[Any],
        state: SchedulerState,
        refs: RefTable,
        executor: RayExecutor,
        *,
        flat: list[Key],
        fetch: bool,
        callbacks: Any,
    ) -> dict[Key, Any]:
        """Run every group; return ``{key: value}`` (or ``{key: ref}``) for ``flat``."""
        in_flight: dict[Any, int] = {}  # status ref -> group index
        succeeded = False
        with local_callbacks(callbacks) as cbs:
            start_cbs, start_state_cbs, pretask_cbs, posttask_cbs, finish_cbs = unpack_callbacks(cbs)
            view = state.view
            dsk = graph.nodes
            started: list[Any] = []
            try:
                for cb in cbs:
                    if cb[0]:
                        cb[0](dsk)
                    started.append(cb)
                for f in start_state_cbs:
                    f(dsk, view)

                def apply(instructions: list[Submit | Release]) -> None:
                    for ins in instructions:
                        if isinstance(ins, Release):
                            refs.release(ins.keys)
                            continue
                        g = ins.group
                        for key in g.keys:
                            for f in pretask_cbs:
                                f(key, dsk, view)
                        spec = GroupSpec(
                            keys=g.keys,
                            nodes=tuple(dsk[k] for k in g.keys),
                            inputs=g.inputs,
                            outputs=g.outputs,
                        )
                        out = executor.submit(g, spec, [refs[k] for k in g.inputs])
                        in_flight[out[0]] = g.index
                        for k, r in zip(g.outputs, out[1:]):
                            refs.add(k, r)

                apply(state.start())
                while not state.done:
                    done = executor.wait(list(in_flight))
                    try:
                        statuses = executor.statuses(done)
                    except BaseException:
                        _raise_first_failure(executor, done, in_flight, groups, refs)
                        raise
                    for ref, status in zip(done, statuses):
                        g = groups[in_flight.pop(ref)]
                        if posttask_cbs:
                            for key in g.keys:
                                for f in posttask_cbs:
                                    f(key, refs.get(key), dsk, view, status.worker)
                        apply(state.group_finished(g.index))

                out_refs = {k: refs[k] for k in flat}
                if fetch:
                    try:
                        values = dict(zip(out_refs, executor.fetch(list(out_refs.values()))))
                    except ray.exceptions.RayError as e:
                        producer = {k: g for g in groups for k in g.outputs}
                        failed = next(
                            (producer[k] for k, r in out_refs.items() if k in producer and _fails(executor, r)),
                            None,
                        )
                        if failed is None:
                            raise
                        raise user_error(e, failed) from e
                else:
                    values = out_refs
                succeeded = True
                return values
            finally:
                if in_flight:
                    executor.cancel(list(in_flight))
                    in_flight.clear()
                for cb in started:
                    if cb[4]:
                        cb[4](dsk, view, not succeeded)


def _raise_first_failure(
    executor: RayExecutor,
    done: Sequence[Any],
    in_flight: dict[Any, int],
    groups: Sequence[Any],
    refs: RefTable,
) -> None:
    """Find which finished group failed and raise its error with its keys."""
    for ref in done:
        try:
            executor.statuses([ref])
        except ray.exceptions.RayError as e:
            group = groups[in_flight.pop(ref)]
            # Read the failed group's outputs too, so Ray does not log them later
            # as "unhandled errors" when the refs are dropped.
            executor.observe([refs[k] for k in group.outputs if k in refs])
            raise user_error(e, group) from e


_OWN_DIRS = (os.path.dirname(__file__), os.path.dirname(ray.__file__))


def _clear_ray_frames(exc: BaseException) -> None:
    """Drop the locals of our and Ray's finished frames in an exception's tracebacks.

    Those frames hold ObjectRefs (refs being waited on or fetched); a user who
    keeps the exception (``sys.last_value``, a test's ``excinfo``) would keep the
    objects alive. User code's frames are left intact for post-mortem debugging.
    """
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        tb = e.__traceback__
        while tb is not None:
            frame = tb.tb_frame
            if frame.f_code.co_filename.startswith(_OWN_DIRS):
                try:
                    frame.clear()
                except RuntimeError:  # still executing (an outer frame of ours)
                    pass
            tb = tb.tb_next
        todo += [e.__cause__, e.__context__]


def _fails(executor: RayExecutor, ref: Any) -> bool:
    try:
        executor.fetch([ref])
    except ray.exceptions.RayError:
        return True
    return False


def _nested(keys: Any, values: dict[Key, Any]) -> Any:
    if isinstance(keys, list):
        return tuple(_nested(k, values) for k in keys)
    return values[keys]
