"""``ShuffleActor``: the thin async Ray shell around one participant's ``ShuffleManager``.

A node runs one or several actors (``ShuffleService``'s ``actors_per_node``); each
receives the shards of the output partitions it owns. It never
sends: transfer tasks send to it directly (``_client``), so its manager accepts
messages from any authenticated sender, and a run's "inputs done" is simply declared
when the first output partition is asked for (after the driver's barrier).

Per accepted connection the listener runs ``_serve``: receive a message, route it to
the manager, answer with an ack or the typed error that refused it (``_reply``), and
keep serving; a refused message never closes the connection or affects other runs.
Output partitions leave as the return value of ``get_output_partition``, so they
become ObjectRefs owned by the caller. The concatenation runs in a thread, so the
loop keeps receiving meanwhile; outputs are built while they fit the memory budget
beside what the runs' stores hold (``_unpack_gate``), two at a time past it. An
output's shards are released as it is read, and once no run has been open for a
second after one closed the actor runs ``release_memory`` (Arrow's pool, then
glibc's ``malloc_trim``), so it does not keep its high-water mark between runs.

``memory_limit="auto"`` is resolved here, once, from this node's memory: the node's
auto budget (``AUTO_MEMORY_FRACTION`` of its memory per run) is shared by the
``actors_on_node`` actors on it, so more actors per node never raise the node's total.

Ray runs async actors' methods on one event loop; ``max_concurrency`` bounds how many
calls may wait at once, not CPU use (the actor asks for no CPU).

Device memory (``DeviceOptions``, see ``_device``): the listener receives every frame
into memory of its announced kind, device frames into RMM/CuPy buffers when a GPU is
usable here (``transport_allocator`` over ``registry``; a device frame it cannot hold
is drained and refused with the reason, never used); on a node with GPUs the actor
reserves ``actor_num_gpus`` of one, so Ray sets its ``CUDA_VISIBLE_DEVICES``. A device
partition returned by ``unpack`` becomes an object in Ray's object store, which holds
host memory only: Ray pickles it (CuPy and cuDF copy to host when pickled, and back
to the reader's GPU when unpickled), or with ``results="host"`` the actor converts it
to NumPy/pandas itself, so readers need no GPU.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import os
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pandas as pd
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from shuffle._exceptions import ShuffleError
from shuffle._ids import RunId, ShuffleId
from shuffle._manager import ShuffleManager
from shuffle._options import AUTO_MEMORY_FRACTION, DEFAULT_OPTIONS, RunOptions, auto_memory_limit
from shuffle._rechunk import RechunkLayout
from shuffle._release import release_memory
from shuffle._run import ReceiveStats, ShuffleRun
from shuffle._spec import ShuffleRunSpec
from shuffle._store import remove_spill_directories
from shuffle._transport import (
    EndOfStream,
    Endpoint,
    Listener,
    Transport,
    TransportConfig,
    TransportName,
    get_transport,
    listen_in_range,
)
from shuffle._unpack_gate import UnpackGate
from shuffle._usage import RunUsage, refusal_reason
from shuffle.device._allocator import refused_reason, transport_allocator
from shuffle.device._arrays import to_host
from shuffle.device._cuda import GpuStatus, gpu_status, registry_for
from shuffle.device._options import DEFAULT_DEVICE_OPTIONS, DeviceOptions, DeviceUnavailableError
from shuffle.shell._limits import MESSAGE_LIMITS
from shuffle.shell._metrics import METRICS_INTERVAL, ActorMetrics, ActorSample
from shuffle.wire._memory import MemoryRegistry
from shuffle.wire._reply import ACK, encode_error

__all__ = [
    "ACTOR_ENV",
    "MAX_CONCURRENCY",
    "RunInfo",
    "ShuffleActor",
    "create_shuffle_actor",
    "resolve_memory_limit",
]

logger = logging.getLogger(__name__)

#: Set in the actor's process before UCX starts; ``_transport/ucx.py`` explains both.
ACTOR_ENV = {"UCX_MM_ERROR_HANDLING": "y", "UCX_WARN_UNUSED_ENV_VARS": "n"}
#: Concurrent calls (unpack calls of many runs) that may wait on the actor's loop.
MAX_CONCURRENCY = 1000
#: Threads concatenating output partitions; a few, so the loop is never starved of CPU.
_UNPACK_THREADS = 2
_GC_GEN0_THRESHOLD = 100_000
#: Seconds without an open run, after a run closed, before freed memory goes back to
#: the OS (``ShuffleActor._release_when_idle``).
_IDLE_RELEASE_S = 1.0
#: Outputs of an unpack call smaller than this together are built in one hop to the
#: unpack threads; larger ones go through the gate one by one.
_BATCH_BELOW_BYTES = 4 * 2**20


@dataclass(frozen=True)
class RunInfo:
    """One open run on one actor, as ``ShuffleActor.runs()`` reports it."""

    shuffle_id: ShuffleId
    run_id: RunId
    participant: str
    failed: str | None  # repr of the first failure
    spill_directory: str | None
    stats: ReceiveStats


class ShuffleActor:
    """One participant of every shuffle run on one node (module docstring)."""

    def __init__(
        self,
        *,
        name: str,
        secret: bytes,
        transport: TransportName,
        host: str,
        options: RunOptions = DEFAULT_OPTIONS,
        device: DeviceOptions = DEFAULT_DEVICE_OPTIONS,
        actors_on_node: int = 1,
        ports: tuple[int, int] | None = None,
        export_metrics: bool = False,
        release: Callable[[], None] = release_memory,
        idle_release_s: float = _IDLE_RELEASE_S,
    ) -> None:
        """``export_metrics``: export Ray metrics (``_metrics``) once started; only in a
        Ray actor (``create_shuffle_actor``). ``release``: gives freed memory back to the
        OS (``shuffle._release``), run once no run has been open for
        ``idle_release_s`` after a run closed."""
        options = resolve_memory_limit(options, actors_on_node=actors_on_node)
        self.name = name
        #: The runs' options, memory limit resolved (never "auto").
        self.options = options
        self._host = host
        self._ports = ports  # listen on a port of this range (inclusive); None: any
        self._spill_directory = options.spill_directory
        self._transport_name = transport
        self._device = device
        #: Memory types this actor's runs decode shards from (host, and cuda unless the
        #: mode is host); device hooks import RMM/CuPy only when they first allocate.
        self.registry: MemoryRegistry = registry_for(device.mode)
        self._config = TransportConfig(
            secret=secret,
            limits=MESSAGE_LIMITS,  # checked from the wire header, before allocating
            # Refused device frames are drained and answered with the reason (_serve).
            allocator=transport_allocator(
                self.registry, where=f"shuffle actor {name}", drain_refused=True
            ),
        )
        self._manager = ShuffleManager(
            local=name,
            options=options,
            accept_any_sender=True,
            registry=self.registry,
        )
        self._executor = ThreadPoolExecutor(_UNPACK_THREADS, thread_name_prefix=f"{name}-unpack")
        # Outputs are built while they fit the budget beside what the stores hold.
        limit = options.memory_limit
        assert limit != "auto"  # resolved above
        # Per run, the memory release that ends receiving (runs are dropped once closed).
        self._received: weakref.WeakKeyDictionary[Any, asyncio.Future[None]] = (
            weakref.WeakKeyDictionary()
        )
        self._unpack_gate = UnpackGate(
            limit, held=self._memory_held, name=f"{name}-unpack", floor=_UNPACK_THREADS
        )
        # This process is ours alone, and a run keeps one small tracked object per
        # shard (65,536 in a 256 x 256 shuffle): with the default threshold of 700,
        # collections took a third of receiving (measured in one process: 1.3 against
        # 0.9 ms of CPU per message of 256 pieces). Cycles are rare here.
        gen0, gen1, gen2 = gc.get_threshold()
        gc.set_threshold(max(gen0, _GC_GEN0_THRESHOLD), gen1, gen2)
        self._transport: Transport | None = None
        self._listener: Listener | None = None
        self._start_lock = asyncio.Lock()
        self._closed = False
        self._export_metrics = export_metrics
        self._metrics: ActorMetrics | None = None
        self._metrics_task: asyncio.Task[None] | None = None
        self._refused: dict[str, int] = {}  # messages refused, by reason (shuffle._usage)
        self._release = release
        self._idle_release_s = idle_release_s
        self._idle_release: asyncio.TimerHandle | None = None

    def __repr__(self) -> str:  # Ray names the actor's log lines with it, once
        return f"ShuffleActor({self.name})"

    async def start(self) -> str:
        """Start listening (once) and return the address senders connect to."""
        async with self._start_lock:
            self._check_open()
            if self._listener is None:
                if self._device.mode == "cuda":
                    self._require_gpu()
                transport = get_transport(self._transport_name, config=self._config)
                try:
                    self._listener = await listen_in_range(
                        transport, host=self._host, ports=self._ports, handler=self._serve
                    )
                except BaseException:
                    await transport.close()
                    raise
                self._transport = transport
                logger.info("%s listening on %s", self.name, self._listener.address)
                if self._export_metrics:
                    node = ray.get_runtime_context().get_node_id()
                    self._metrics = ActorMetrics(node=node, actor=self.name)
                    self._metrics_task = asyncio.get_running_loop().create_task(
                        self._push_metrics_every(METRICS_INTERVAL), name=f"{self.name} metrics"
                    )
            return self._listener.address

    async def start_run(self, spec: ShuffleRunSpec, meta: pd.DataFrame | RechunkLayout) -> None:
        """Create the run of ``spec`` here (idempotent); a newer run id supersedes.

        ``meta``: a dataframe shuffle's empty frame, or an array rechunk's layout.
        """
        self._check_open()
        await self._manager.get_or_create(spec, meta)

    async def get_output_partition(
        self, shuffle_id: ShuffleId, run_id: RunId, partition: int
    ) -> Any:
        """Output ``partition`` of the run (a frame, or an array chunk); call only after
        every transfer returned."""
        (part,) = await self._outputs(shuffle_id, run_id, [partition])
        return part

    async def _outputs(
        self, shuffle_id: ShuffleId, run_id: RunId, partitions: Sequence[int]
    ) -> list[Any]:
        run = self._manager.get_run(shuffle_id, run_id)
        run.inputs_done()  # every transfer returned before this call (the barrier)
        loop = asyncio.get_running_loop()
        released = self._received.get(run)
        if released is None:
            if self._short_of_memory(run):
                # Receiving is over: what its buffers left free in the heap goes back
                # to the OS before the outputs are built (in Arrow's pool, another
                # allocator that cannot reuse it). Only past the budget: the pages
                # given back are faulted in again by the builds, which cost a 1 GiB
                # shuffle within its budget 0.4 s.
                released = loop.run_in_executor(self._executor, self._release)
            else:
                released = loop.create_future()
                released.set_result(None)
            self._received[run] = released
        await asyncio.shield(released)
        sizes = [run.output_nbytes(p) for p in partitions]
        if sum(sizes) < _BATCH_BELOW_BYTES:
            # Small outputs: one hop to the unpack threads for the whole batch (they
            # hold the GIL anyway), admitted together.
            async with self._unpack_gate.admit(sum(sizes)):
                return await loop.run_in_executor(
                    self._executor, lambda: [run.get_output_partition(p) for p in partitions]
                )
        # Large outputs one by one through the gate, all asked at once: the gate and the
        # unpack threads decide how many are built together. No memory release between
        # them: the next build reuses what the last one freed, where a release after
        # each output made every build fault its pages in again (8 GiB shuffle: 40 s
        # against 47-51 s, the actor's peak 1.77 against 1.65 GB).
        return list(
            await asyncio.gather(
                *(self._output(run, p, n) for p, n in zip(partitions, sizes, strict=True))
            )
        )

    def _short_of_memory(self, run: ShuffleRun) -> bool:
        """Whether the run received more than the memory budget."""
        limit = self._unpack_gate.limit
        return limit is not None and run.usage().bytes_received > limit

    async def _output(self, run: ShuffleRun, partition: int, nbytes: int) -> Any:
        """One output, admitted by the unpack budget (``_unpack_gate``)."""
        loop = asyncio.get_running_loop()
        async with self._unpack_gate.admit(nbytes):
            return await loop.run_in_executor(self._executor, run.get_output_partition, partition)

    async def unpack(
        self, shuffle_id: ShuffleId, run_id: RunId, partitions: Sequence[int], *after: Any
    ) -> tuple[Any, ...]:
        """Output ``partitions`` as the scheduler submits them, with
        ``num_returns=1 + len(partitions)``.

        ``after`` holds the barrier's result: passed as an ObjectRef, it makes Ray start
        this call only once every transfer returned (its value is not used). Returns
        ``(worker id, *partitions)``: a tiny status the scheduler reads, and each
        partition, which stays in the object store as a driver-owned object of its own.
        One call for several partitions pays Ray's per-call cost once (a batch).
        """
        parts = await self._outputs(shuffle_id, run_id, partitions)
        if self._device.results == "host":
            parts = [to_host(df) for df in parts]  # a deliberate copy: readers need no GPU
        return (ray.get_runtime_context().get_worker_id(), *parts)

    async def joined_status(self, *statuses: str) -> str:
        """The first of several ``unpack`` calls' statuses, passed as ObjectRefs: Ray
        starts this call once all of them succeeded, and fails it with the first
        failure otherwise (one batch's status, without a task of its own)."""
        return statuses[0]

    async def gpu_status(self) -> GpuStatus:
        """Whether this actor can hold device memory (probes RMM/CuPy once)."""
        return gpu_status()

    async def close_run(self, shuffle_id: ShuffleId, run_id: RunId) -> RunUsage | None:
        """Close the run (and any older one of the shuffle), deleting its spill files,
        and give the memory it freed back to the OS once the actor is idle
        (``_release_when_idle``); returns its final usage here (``None`` if it was not
        open)."""
        usage = await self._manager.close_run(shuffle_id, run_id)
        if usage is not None:
            self._release_when_idle()
        if self._metrics is not None:
            if usage is not None:
                self._metrics.run_closed(usage.seconds)
            self._metrics.push(self.sample())
        return usage

    def _release_when_idle(self) -> None:
        """Give freed memory back to the OS once no run has been open for
        ``idle_release_s``: the pages given back are faulted in again by the next
        run's receiving, which cost back-to-back 1 GiB shuffles 0.4 s each, while an
        actor at rest holds nothing it does not need."""
        if self._idle_release is not None:
            self._idle_release.cancel()
        loop = asyncio.get_running_loop()
        self._idle_release = loop.call_later(self._idle_release_s, self._release_if_idle)

    def _release_if_idle(self) -> None:
        self._idle_release = None
        if self._closed or self._manager.runs:
            return  # an open run's close schedules the release again
        # In a thread: trimming a large heap takes milliseconds.
        asyncio.get_running_loop().run_in_executor(self._executor, self._release)

    async def usage(self) -> list[RunUsage]:
        """What each open run here received and holds now (``shuffle_status``)."""
        return [run.usage() for run in self._manager.runs.values()]

    def _memory_held(self) -> int:
        """Bytes the open runs' receive stores hold in memory."""
        return sum(run.usage().memory_bytes for run in self._manager.runs.values())

    def sample(self) -> ActorSample:
        """This actor's counters and gauges, as its metrics export them."""
        usages = [run.usage() for run in self._manager.runs.values()]
        refused = dict(self._refused)
        if self._listener is not None:
            stats = self._listener.stats
            refused["handshake"] = stats.handshakes_failed
            refused["protocol"] = stats.protocol_errors
        return ActorSample(
            counters=self._manager.counters(),
            refused=refused,
            runs_active=len(usages),
            memory_bytes=sum(u.memory_bytes for u in usages),
            disk_bytes=sum(u.disk_bytes for u in usages),
        )

    async def runs(self) -> list[RunInfo]:
        """The open runs here, for introspection and cleanup assertions."""
        return [
            RunInfo(
                shuffle_id=run.shuffle_id,
                run_id=run.run_id,
                participant=self.name,
                failed=None if run.exception is None else repr(run.exception),
                spill_directory=None if run.spill_directory is None else str(run.spill_directory),
                stats=run.stats,
            )
            for run in self._manager.runs.values()
        ]

    async def remove_spill_of(self, name: str) -> int:
        """Delete the spill directories that actor ``name``, dead, left on this node."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._executor, remove_spill_directories, self._spill_directory, name
        )

    async def node_id(self) -> str:
        """The Ray node this actor runs on."""
        return ray.get_runtime_context().get_node_id()

    async def close(self) -> None:
        """Close every run, the listener and the transport; idempotent."""
        self._closed = True
        if self._idle_release is not None:
            self._idle_release.cancel()
        if self._metrics_task is not None:
            self._metrics_task.cancel()
        await self._manager.close()
        if self._metrics is not None:
            self._metrics.push(self.sample())
        if self._transport is not None:
            await self._transport.close()  # closes the listener and its endpoints
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _serve(self, endpoint: Endpoint) -> None:
        while True:
            try:
                frames = await endpoint.recv()
            except EndOfStream:
                return
            try:
                reason = refused_reason(frames)
                if reason is not None:
                    raise DeviceUnavailableError(reason)
                await self._manager.receive(frames)
            except Exception as e:  # noqa: BLE001 -- reported to the sender; keep serving
                # Typed refusals (stale runs, closed runs) are expected around restarts;
                # a device frame this actor cannot hold is a set-up problem.
                expected = isinstance(e, ShuffleError) and not isinstance(e, DeviceUnavailableError)
                logger.log(
                    logging.INFO if expected else logging.WARNING,
                    "%s refused a message from %s: %r",
                    self.name,
                    endpoint.name,
                    e,
                )
                reason = refusal_reason(e)
                self._refused[reason] = self._refused.get(reason, 0) + 1
                reply = encode_error(e)
            else:
                reply = ACK
            await endpoint.send(reply)

    async def _push_metrics_every(self, interval: float) -> None:
        assert self._metrics is not None
        while True:
            await asyncio.sleep(interval)
            try:
                self._metrics.push(self.sample())
            except Exception:  # monitoring must never stop the actor
                logger.exception("%s: pushing metrics failed", self.name)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"shuffle actor {self.name!r} is closed")

    def _require_gpu(self) -> None:
        status = gpu_status()
        if not status.usable:
            raise DeviceUnavailableError(
                f"shuffle actor {self.name} has no usable GPU ({status.reason}; "
                f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}), but "
                "ray-oob-sched.shuffle.device is cuda; check that the node's GPUs are "
                "registered with Ray (ray start --num-gpus) and actor-num-gpus > 0"
            )


def resolve_memory_limit(options: RunOptions, *, actors_on_node: int) -> RunOptions:
    """``options`` with an ``"auto"`` memory limit resolved to this actor's share of the
    node's auto budget (this machine's memory, see ``auto_memory_limit``)."""
    if type(actors_on_node) is not int or actors_on_node < 1:
        raise ValueError(f"actors_on_node must be an int >= 1, got {actors_on_node!r}")
    if options.memory_limit != "auto":
        return options
    share = auto_memory_limit(AUTO_MEMORY_FRACTION / actors_on_node)
    return dataclasses.replace(options, memory_limit=share)


_RemoteShuffleActor = ray.remote(ShuffleActor)


def create_shuffle_actor(
    *,
    node_id: str,
    name: str,
    secret: bytes,
    transport: TransportName,
    host: str,
    options: RunOptions,
    device: DeviceOptions,
    num_gpus: float,
    actors_on_node: int,
    ports: tuple[int, int] | None,
) -> Any:
    """Create a ``ShuffleActor`` pinned to ``node_id``; returns its ActorHandle.

    The actor is owned by the caller (not detached), so it dies with its owner, and it
    is not restarted by Ray: the owner re-creates a dead one (``ShuffleService``).
    ``num_gpus`` (a share of one GPU, from ``_device.actor_num_gpus``) makes Ray give
    the actor a GPU and point its ``CUDA_VISIBLE_DEVICES`` at it. ``actors_on_node``:
    how many shuffle actors the owner runs on that node (they share its auto memory
    budget). ``ports``: the inclusive range its listener binds in (None: any free port).
    Every setting is required, unlike the constructor's: the owner passes all of its
    own, so none can fall back to a default because a caller left it out.
    """
    return _RemoteShuffleActor.options(
        num_cpus=0,  # it waits on I/O; the unpack threads are short
        num_gpus=num_gpus,
        max_concurrency=MAX_CONCURRENCY,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
        runtime_env={"env_vars": dict(ACTOR_ENV)},
        name=None,
        max_restarts=0,
    ).remote(
        name=name,
        secret=secret,
        transport=transport,
        host=host,
        options=options,
        device=device,
        actors_on_node=actors_on_node,
        ports=ports,
        export_metrics=True,
    )
