"""The driver side of the shuffle service: shuffle actors and the runs started on them.

A ``ShuffleService`` belongs to whoever creates it (the scheduler, for one or many
computes) and must be closed by it. It keeps ``actors_per_node`` ``ShuffleActor``s per
alive Ray node (``_placement``: a number, or ``"auto"``, the node's CPUs up to 4), each
created on first use, pinned to its node, owned by the driver (so the actors die with
it) and reused by later shuffles. Every ``actors()`` call, hence every ``start_run``,
asks each actor for its address: that doubles as a liveness check, and an actor found
dead is re-created once (its successor in the same slot deletes the spill files the
dead one left); actors on nodes that left the cluster are dropped. A node whose actor
died and that is gone (Ray reports it dead, or its raylet refuses connections: Ray
notices a crashed node only after its health checks fail, ~15 s by default) is *lost*:
its actor is not re-created there (that creation would wait for Ray, then be
cancelled), its slots are dropped, and runs started since use the surviving nodes.
The same holds for a node where a re-created actor cannot start and that is gone by
then. Every actor gets a
name never used before (``shuffle-<node>-<n>``, ``n`` counting every actor this
service created), so a re-created actor is told apart from its predecessor. Runs list
the actors by node, then slot index: each actor owns a contiguous block of output
partitions. ``restart_run`` replaces a run that lost an actor with a new run of the
same shuffle.

The shared secret of the out-of-band transport is minted here (``os.urandom``) and
reaches actors and transfer tasks only as actor/task arguments, i.e. over Ray's own
channel. Each run gets a fresh run id from the service's ``RunIdMinter``, so a
restarted shuffle supersedes its earlier run on every actor. All calls to actors are
awaited with one deadline (``timeout``), and errors name the actor that failed.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Self, cast

import pandas as pd
import ray
from ray.exceptions import ActorUnschedulableError, GetTimeoutError, RayActorError

from shuffle._closable import Closable
from shuffle._ids import RunIdMinter, ShuffleId
from shuffle._options import DEFAULT_OPTIONS, RunOptions
from shuffle._rechunk import RechunkLayout, is_rechunk
from shuffle._spec import DEFAULT_PARTITION_COLUMN, ShuffleRunSpec
from shuffle._transport import TransportName
from shuffle._usage import RunUsage
from shuffle.device._options import DEFAULT_DEVICE_OPTIONS, DeviceOptions, actor_num_gpus
from shuffle.shell._actor import create_shuffle_actor
from shuffle.shell._handle import RunHandle
from shuffle.shell._metrics import count_restart
from shuffle.shell._placement import (
    ActorsPerNode,
    Slot,
    actors_on_node,
    check_actors_per_node,
    slots,
)
from shuffle.shell._transfer import warm_imports, warm_sender

__all__ = ["ActorInfo", "ActorUsage", "ShuffleService"]

_warm_sender: Any = ray.remote(num_cpus=1, max_retries=0, scheduling_strategy="SPREAD")(
    cast(Any, warm_sender)  # Ray's stubs type only functions without arguments here
)

_warm_imports: Any = ray.remote(num_cpus=1, max_retries=0, scheduling_strategy="SPREAD")(
    cast(Any, warm_imports)
)

logger = logging.getLogger(__name__)

#: Bound on connecting to a raylet to learn whether its node is gone.
_RAYLET_PROBE_S = 5.0


def _is_dead(result: object) -> bool:
    """Whether an actor call's result says its actor is dead or cannot be placed (its
    node died before Ray created it there)."""
    return isinstance(result, (RayActorError, ActorUnschedulableError))


@dataclass(frozen=True)
class ActorInfo:
    """One live shuffle actor: its participant name, node, slot on the node, address and
    handle."""

    name: str
    node_id: str
    index: int  # 0 .. actors on the node - 1
    address: str
    handle: Any = dataclasses.field(repr=False, compare=False)


@dataclass(frozen=True)
class ActorUsage:
    """The open runs of every actor that answered ``ShuffleService.usage`` in time."""

    runs: Mapping[str, Sequence[RunUsage]]  # by actor name
    node_of: Mapping[str, str]  # actor name -> node id
    unanswered: tuple[str, ...]  # actors that did not answer within the deadline


class ShuffleService(Closable):
    """Shuffle actors, some per node, and the runs started on them (module docstring).

    ``transport`` is ``"ucx"``, ``"tcp"`` or ``"auto"`` (UCX when the actors can import
    ucxx). ``options`` configures every actor's runs and the senders of every run.
    ``timeout`` bounds each round of actor calls (start, start_run, close_run, close).
    ``host`` is the address every actor listens on and advertises; ``None`` (the
    default, and the only choice that works across nodes) is each node's own Ray
    address, so endpoints never listen on interfaces the cluster does not use.
    ``device`` says whether device (GPU) payloads travel, how much of a GPU each actor
    on a GPU node reserves, and what unpack returns for device partitions.
    ``actors_per_node`` is the number of actors on every node, or ``"auto"``: one per 8
    of the node's CPUs (Ray's ``CPU`` resource), clamped to [1, 4] (``_placement``). A
    node's actors share its ``memory_limit="auto"`` budget. ``port_range``: the inclusive
    range of ports every actor's listener binds in (firewalls); ``None``: any free port.
    """

    def __init__(
        self,
        *,
        transport: TransportName = "auto",
        options: RunOptions = DEFAULT_OPTIONS,
        timeout: float = 60.0,
        host: str | None = None,
        device: DeviceOptions = DEFAULT_DEVICE_OPTIONS,
        actors_per_node: ActorsPerNode = "auto",
        port_range: tuple[int, int] | None = None,
    ) -> None:
        if transport not in ("ucx", "tcp", "auto"):
            raise ValueError(f"transport must be 'ucx', 'tcp' or 'auto', got {transport!r}")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0, got {timeout!r}")
        if not isinstance(device, DeviceOptions):
            raise TypeError(f"device must be a DeviceOptions, got {type(device).__name__}")
        self.transport = transport
        self.options = options
        self.timeout = timeout
        self.host = host
        self.device = device
        self.actors_per_node = check_actors_per_node(actors_per_node)
        self.port_range = port_range
        self._secret = os.urandom(32)
        self._mint_run_id = RunIdMinter()
        self._actors: dict[Slot, ActorInfo] = {}  # by (node id, index)
        self._generation = 0  # numbers actor names, so a re-created actor is told apart
        self._runs: dict[ShuffleId, RunHandle] = {}  # the newest open run per shuffle
        # By node id, as of the last actors():
        self._node_gpus: dict[str, float] = {}
        self._node_actors: dict[str, int] = {}
        # Nodes found gone while Ray may still report them alive; never used again
        # (a node that comes back gets a new id).
        self._lost_nodes: set[str] = set()
        self._node_of: dict[str, str] = {}  # actor name -> node id, every actor created
        self._closed = False

    def __repr__(self) -> str:
        return (
            f"<ShuffleService {self.transport} actors={len(self._actors)} "
            f"runs={len(self._runs)} closed={self._closed}>"
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def lost_nodes(self) -> frozenset[str]:
        """Nodes whose actors died with them: no run started since uses them."""
        return frozenset(self._lost_nodes)

    def node_of(self, actor: str) -> str | None:
        """The node actor ``actor`` (a participant name) was created on."""
        return self._node_of.get(actor)

    def open_runs(self) -> list[RunHandle]:
        """The newest run of each shuffle that was started and not closed yet."""
        return list(self._runs.values())

    def actors(self) -> list[ActorInfo]:
        """The started actors of every alive node, ordered by node id, then index on
        the node; creates what is missing, re-creates what died."""
        self._check_open()
        hosts = self._survey_nodes()
        wanted = slots(self._node_actors)
        self._drop(set(self._actors) - set(wanted), hosts=hosts)
        created = {s: self._create(s[0], hosts[s[0]]) for s in wanted if s not in self._actors}
        try:
            results, dead, wanted = self._start_all(wanted, created=created, hosts=hosts)
        except BaseException:
            for _, handle in created.values():
                self._kill(handle)
            raise
        gone = {slot: self._actors[slot].name for slot in dead if slot in self._actors}
        for (node_id, index), (name, handle) in created.items():
            self._actors[node_id, index] = ActorInfo(
                name, node_id, index, results[node_id, index], handle
            )
        if gone:  # a killed actor could not delete its spill files: its successor does
            self._remove_spill_of(gone)
        return [self._actors[slot] for slot in wanted]

    def warm_imports(self, *, tasks: int) -> list[Any]:
        """Submit ``tasks`` Ray tasks (one CPU each, spread over nodes) that import
        what sending needs in their worker process (``warm_imports``); they need no
        actor, so they can run while the actors start. Returns their refs."""
        return [_warm_imports.remote(self.transport) for _ in range(max(tasks, 0))]

    def warm_senders(self, *, tasks: int) -> list[Any]:
        """Submit ``tasks`` Ray tasks (one CPU each, spread over nodes) that each ready
        their worker process to send to every started actor (``warm_sender``: imports,
        client, UCX context, handshakes), so that transfers later run in those
        processes do not pay for it; returns their refs. Starts no actor."""
        actors = list(self._actors.values())
        if not actors or tasks < 1:
            return []
        addresses = sorted(a.address for a in actors)
        scheme = addresses[0].partition("://")[0]
        return [
            _warm_sender.remote(addresses, transport=scheme, secret=self._secret)
            for _ in range(tasks)
        ]

    def start_run(
        self,
        shuffle_id: str,
        *,
        npartitions_out: int,
        meta: pd.DataFrame | RechunkLayout,
        column: str = DEFAULT_PARTITION_COLUMN,
        drop_column: bool = True,
        needed: Sequence[int] | None = None,
        npartitions_in: int | None = None,
    ) -> RunHandle:
        """Start a new run of ``shuffle_id`` on every actor and return its handle.

        A new run of a shuffle that has a run supersedes it (the old one fails with
        ``StaleRunError`` everywhere). ``meta`` is the input partitions' empty frame,
        partition column included, or for an array rechunk its ``RechunkLayout``.
        ``needed``: the output partitions that will be asked for, when not all are
        (``ShuffleRunSpec.needed``). ``npartitions_in``: the number of input partitions;
        actors refuse shards named by any other input.
        """
        actors = self.actors()
        spec = ShuffleRunSpec(
            shuffle_id=ShuffleId(shuffle_id),
            run_id=self._mint_run_id(),
            npartitions_out=npartitions_out,
            participants=tuple(a.name for a in actors),  # by node, then index
            column=column,
            drop_column=drop_column,
            needed=None if needed is None else tuple(needed),
            npartitions_in=npartitions_in,
        )
        schemes = {a.address.partition("://")[0] for a in actors}
        if len(schemes) != 1:
            raise RuntimeError(
                f"shuffle actors disagree on the transport ({sorted(schemes)}) under "
                f"transport={self.transport!r}: ucxx is importable on some nodes only"
            )
        handle = RunHandle(
            spec=spec,
            # A dataframe meta is pandas or cuDF: both slice with iloc.
            meta=meta if is_rechunk(meta) else cast(Any, meta).iloc[:0],
            addresses={a.name: a.address for a in actors},
            secret=self._secret,
            transport=schemes.pop(),
            options=self.options,
            device=self.device,
            actors={a.name: a.handle for a in actors},
        )
        self._runs[spec.shuffle_id] = handle
        refs = {a.name: a.handle.start_run.remote(spec, handle.meta) for a in actors}
        try:
            self._raise_failures(self._gather(refs, f"start_run({shuffle_id!r})"), "start_run")
        except BaseException:
            # Some actors may hold the run already: leave none behind.
            try:
                self.close_run(handle)
            except Exception as e:  # noqa: BLE001 -- best effort; the start failure is re-raised
                logger.warning("closing the failed run %s failed: %r", shuffle_id, e)
            raise
        logger.debug("started %s run %d on %s", shuffle_id, spec.run_id, spec.participants)
        return handle

    def restart_run(self, handle: RunHandle) -> RunHandle:
        """A new run of ``handle``'s shuffle, on live actors; ``handle``'s run is dropped.

        For a run that lost an actor: the old run is closed first (its data deleted on
        every actor still alive), then ``start_run`` re-creates dead actors and starts
        the new run with a newer run id, with the same spec otherwise.
        """
        spec = handle.spec
        try:
            self.close_run(handle)
        except Exception as e:  # noqa: BLE001 -- the new run supersedes it anyway
            logger.warning("closing run %d of %s failed: %r", spec.run_id, spec.shuffle_id, e)
        new = self.start_run(
            spec.shuffle_id,
            npartitions_out=spec.npartitions_out,
            meta=handle.meta,
            column=spec.column,
            drop_column=spec.drop_column,
            needed=spec.needed,
        )
        logger.info(
            "restarted %s: run %d replaces run %d", spec.shuffle_id, new.spec.run_id, spec.run_id
        )
        count_restart(node=ray.get_runtime_context().get_node_id())
        return new

    def usage(self, *, timeout: float) -> ActorUsage:
        """What every actor's open runs received and hold now, asked with one short
        deadline; actors that do not answer in time (or died) are listed, not waited
        for. Safe to call from another thread while a compute runs: it neither creates
        nor re-creates actors."""
        actors = list(self._actors.values())
        refs = {a.handle.usage.remote(): a for a in actors}
        done, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout) if refs else ([], [])
        runs: dict[str, Sequence[RunUsage]] = {}
        for ref in done:
            try:
                runs[refs[ref].name] = ray.get(ref, timeout=0)
            except Exception as e:  # noqa: BLE001 -- a dead actor: reported as unanswered
                logger.debug("shuffle actor %s: usage failed: %r", refs[ref].name, e)
        return ActorUsage(
            runs=runs,
            node_of={a.name: a.node_id for a in actors},
            unanswered=tuple(sorted(a.name for a in actors if a.name not in runs)),
        )

    def close_run(self, handle: RunHandle) -> list[RunUsage]:
        """Close ``handle``'s run on every actor, deleting its data; idempotent.

        Actors that died meanwhile are skipped: their runs died with them. Returns the
        closed run's final usage on every actor that still held it.
        """
        spec = handle.spec
        current = self._runs.get(spec.shuffle_id)
        if current is not None and current.spec.run_id <= spec.run_id:
            del self._runs[spec.shuffle_id]  # actors close older runs of the shuffle too
        actors = handle.actors or {a.name: a.handle for a in self._actors.values()}
        refs = {
            name: actor.close_run.remote(spec.shuffle_id, spec.run_id)
            for name, actor in actors.items()
            if name in spec.participants
        }
        results = self._gather(refs, f"close_run({spec.shuffle_id!r})")
        self._raise_failures(
            {n: r for n, r in results.items() if not isinstance(r, RayActorError)}, "close_run"
        )
        return [r for r in results.values() if isinstance(r, RunUsage)]

    def close(self) -> None:
        """Close every open run, then close and kill every actor; idempotent."""
        if self._closed:
            return
        self._closed = True
        if not ray.is_initialized():  # Ray is gone, and the actors with it
            self._actors.clear()
            self._runs.clear()
            return
        try:
            for handle in list(self._runs.values()):
                try:
                    self.close_run(handle)
                except Exception as e:  # noqa: BLE001 -- the actors are killed below anyway
                    logger.warning("closing run %s failed: %r", handle.spec.shuffle_id, e)
            actors = list(self._actors.values())
            refs = {a.name: a.handle.close.remote() for a in actors}
            for name, result in self._gather(refs, "close").items():
                if isinstance(result, Exception) and not isinstance(result, RayActorError):
                    logger.warning("closing shuffle actor %s failed: %r", name, result)
        finally:
            for info in self._actors.values():
                self._kill(info.handle)
            self._actors.clear()
            self._runs.clear()

    # ---- internals

    def _survey_nodes(self) -> dict[str, str]:
        """Read the alive nodes' GPUs and actor counts; the host each node's actors use,
        by node id (sorted). Lost nodes stay out."""
        alive = [n for n in ray.nodes() if n["Alive"] and n["NodeID"] not in self._lost_nodes]
        # A crashed node's raylet is gone at once, while Ray reports the node alive for
        # seconds and its actors' processes may still answer for a moment.
        gone = {n["NodeID"] for n in alive if not self._raylet_answers(n)}
        if gone:
            logger.warning("lost node(s) %s: their raylets do not answer", sorted(gone))
            self._lost_nodes |= gone
            alive = [n for n in alive if n["NodeID"] not in gone]
        hosts = dict(sorted((n["NodeID"], n["NodeManagerAddress"]) for n in alive))
        if self.host is not None:
            hosts = dict.fromkeys(hosts, self.host)
        self._node_gpus = {n["NodeID"]: float(n["Resources"].get("GPU", 0)) for n in alive}
        for node_id, gpus in self._node_gpus.items():
            # Refuses (device mode cuda, a node without GPUs) before any actor is created.
            actor_num_gpus(self.device, node_gpus=gpus, node=node_id)
        self._node_actors = {
            n["NodeID"]: actors_on_node(
                self.actors_per_node, node_cpus=float(n["Resources"].get("CPU", 0))
            )
            for n in alive
        }
        return hosts

    def _drop(self, slots_: set[Slot], *, hosts: Mapping[str, str]) -> None:
        """Forget and kill the actors of ``slots_``, no longer wanted: their node was
        lost or left the cluster, or now runs fewer actors."""
        for slot in sorted(slots_):
            info = self._actors.pop(slot)
            if slot[0] in self._lost_nodes:
                why = f"node {slot[0]} was lost"
            elif slot[0] in hosts:  # its CPU count changed
                why = f"node {slot[0]} now runs {self._node_actors[slot[0]]} shuffle actors"
            else:
                why = f"node {slot[0]} left the cluster"
            logger.info("%s; dropping shuffle actor %s", why, info.name)
            self._kill(info.handle)

    def _node_gone(self, node_id: str) -> bool:
        """Whether ``node_id`` left: Ray reports it dead, or its raylet refuses
        connections (Ray notices a dead node only after its health checks fail, some
        seconds later)."""
        info = next((n for n in ray.nodes() if n["NodeID"] == node_id), None)
        return info is None or not info["Alive"] or not self._raylet_answers(info)

    def _raylet_answers(self, node: Mapping[str, Any]) -> bool:
        """Whether the raylet of ``node`` (an entry of ``ray.nodes()``) accepts a
        connection."""
        address = (node["NodeManagerAddress"], int(node["NodeManagerPort"]))
        try:
            with socket.create_connection(address, timeout=min(self.timeout, _RAYLET_PROBE_S)):
                return True
        except OSError:
            return False

    def _start_all(
        self,
        wanted: Sequence[Slot],
        *,
        created: dict[Slot, tuple[str, Any]],
        hosts: Mapping[str, str],
    ) -> tuple[dict[Slot, Any], list[Slot], list[Slot]]:
        """Start (or, for running actors, check) every wanted actor; re-create the dead
        ones once, adding them to ``created`` (so the caller kills them on failure),
        except on nodes found lost, whose slots go. Returns each slot's address, the
        slots whose actor died and was re-created, and the slots still wanted."""
        wanted = list(wanted)
        results = self._start(wanted, created=created)
        dead = [slot for slot in wanted if _is_dead(results[slot])]
        if dead:
            logger.warning(
                "shuffle actors %s died; re-creating them",
                [self._actor_of(d, created=created)[0] for d in dead],
            )
            for slot in dead:
                # Unreachable rather than dead: make sure.
                self._kill(self._actor_of(slot, created=created)[1])
            # A dead node first: re-creating its actors would wait for Ray to notice the
            # node's death, then fail.
            lost = {node for node in {d[0] for d in dead} if self._node_gone(node)}
            wanted = self._lose(lost, wanted=wanted, created=created, hosts=hosts)
            dead = [d for d in dead if d in wanted]
            created |= {slot: self._create(slot[0], hosts[slot[0]]) for slot in dead}
            results |= self._start(dead, created=created)
            # A node where a new actor cannot start and that is gone by now.
            again = {d[0] for d in dead if _is_dead(results[d])}
            lost = {node for node in again if self._node_gone(node)}
            wanted = self._lose(lost, wanted=wanted, created=created, hosts=hosts)
            dead = [d for d in dead if d in wanted]
        self._raise_failures(
            {self._actor_of(t, created=created)[0]: r for t, r in results.items() if t in wanted},
            "start",
        )
        return results, dead, wanted

    def _lose(
        self,
        nodes: set[str],
        *,
        wanted: list[Slot],
        created: dict[Slot, tuple[str, Any]],
        hosts: Mapping[str, str],
    ) -> list[Slot]:
        """Mark ``nodes`` lost: their slots go and actors being created there are
        killed. Returns the slots still wanted."""
        if not nodes:
            return wanted
        self._lost_nodes |= nodes
        for slot in [s for s in created if s[0] in nodes]:
            self._kill(created.pop(slot)[1])
        wanted = [s for s in wanted if s[0] not in nodes]
        self._drop({s for s in self._actors if s[0] in nodes}, hosts=hosts)
        logger.warning(
            "lost node(s) %s: their shuffle actors died and the node does not answer; "
            "runs use the %d surviving node(s)",
            sorted(nodes),
            len({s[0] for s in wanted}),
        )
        return wanted

    def _start(
        self, targets: Sequence[Slot], *, created: Mapping[Slot, tuple[str, Any]]
    ) -> dict[Slot, Any]:
        # start() is idempotent: for running actors it is the liveness check.
        actors = {slot: self._actor_of(slot, created=created) for slot in targets}
        refs = {name: handle.start.remote() for name, handle in actors.values()}
        got = self._gather(refs, "start")
        return {t: got[actors[t][0]] for t in targets}

    def _actor_of(self, slot: Slot, *, created: Mapping[Slot, tuple[str, Any]]) -> tuple[str, Any]:
        """(name, handle) of the actor in ``slot``: a newly created one, else the known one."""
        if slot in created:
            return created[slot]
        return self._actors[slot].name, self._actors[slot].handle

    def _remove_spill_of(self, gone: Mapping[Slot, str]) -> None:
        """Ask each re-created actor to delete the spill files of the dead actor (by name)
        it replaced; failures are logged, not raised."""
        refs = {
            self._actors[slot].name: self._actors[slot].handle.remove_spill_of.remote(old)
            for slot, old in gone.items()
        }
        for name, result in self._gather(refs, "remove_spill_of").items():
            if isinstance(result, Exception):
                logger.warning("%s: removing spill files of a dead actor: %r", name, result)

    def _create(self, node_id: str, host: str) -> tuple[str, Any]:
        num_gpus = actor_num_gpus(
            self.device, node_gpus=self._node_gpus.get(node_id, 0.0), node=node_id
        )
        self._generation += 1  # never reused, also by a re-created actor of the same slot
        name = f"shuffle-{node_id[:8]}-{self._generation}"
        self._node_of[name] = node_id
        logger.info(
            "creating shuffle actor %s on node %s (%s, %g GPUs)", name, node_id, host, num_gpus
        )
        handle = create_shuffle_actor(
            node_id=node_id,
            name=name,
            secret=self._secret,
            transport=self.transport,
            host=host,
            options=self.options,
            device=self.device,
            num_gpus=num_gpus,
            actors_on_node=self._node_actors.get(node_id, 1),
            ports=self.port_range,
        )
        return name, handle

    def _gather(self, refs: Mapping[str, Any], what: str) -> dict[str, Any]:
        """Wait for every ref under one deadline; each result or exception, by key.

        Raises ``TimeoutError`` naming the keys that did not answer in time.
        """
        if not refs:
            return {}
        keys = {ref: key for key, ref in refs.items()}
        deadline = time.monotonic() + self.timeout
        _, pending = ray.wait(list(keys), num_returns=len(keys), timeout=self.timeout)
        if pending:
            late = sorted(keys[ref] for ref in pending)
            raise TimeoutError(
                f"shuffle actors {late} did not answer {what} within {self.timeout:g} s"
            )
        results: dict[str, Any] = {}
        for ref, key in keys.items():
            try:
                results[key] = ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
            except GetTimeoutError:
                raise TimeoutError(f"shuffle actor {key} did not answer {what}") from None
            except Exception as e:  # noqa: BLE001 -- actor death, or the method's own error
                results[key] = e
        return results

    @staticmethod
    def _raise_failures(results: Mapping[str, Any], what: str) -> None:
        for key, result in results.items():
            if isinstance(result, Exception):
                result.add_note(f"shuffle actor {key}: {what}")
                raise result

    @staticmethod
    def _kill(handle: Any) -> None:
        try:
            ray.kill(handle, no_restart=True)
        except Exception as e:  # noqa: BLE001 -- already dead, or Ray is shutting down
            logger.debug("killing shuffle actor %s: %r", handle, e)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")
