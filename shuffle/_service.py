"""The driver side of the shuffle service: shuffle actors and the runs started on them.

A ``ShuffleService`` belongs to whoever creates it (the scheduler, for one or many
computes) and must be closed by it. It keeps one ``ShuffleActor`` per alive Ray node,
created on first use, pinned to its node, owned by the driver (so the actors die with
it) and reused by later shuffles. Every ``actors()`` call, hence every ``start_run``,
asks each actor for its address: that doubles as a liveness check, and an actor found
dead is re-created once (the successor deletes the spill files the dead one left);
actors on nodes that left the cluster are dropped. ``restart_run`` replaces a run
that lost an actor with a new run of the same shuffle.

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
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import pandas as pd
import ray
from ray.exceptions import GetTimeoutError, RayActorError

from shuffle._actor import create_shuffle_actor
from shuffle._device import DEFAULT_DEVICE_OPTIONS, DeviceOptions, actor_num_gpus
from shuffle._handle import RunHandle
from shuffle._ids import RunIdMinter, ShuffleId
from shuffle._rechunk import RechunkLayout
from shuffle._run import DEFAULT_OPTIONS, RunOptions
from shuffle._spec import DEFAULT_PARTITION_COLUMN, ShuffleRunSpec
from shuffle._transport import TransportName

__all__ = ["ActorInfo", "ShuffleService"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ActorInfo:
    """One live shuffle actor: its participant name, node, address and handle."""

    name: str
    node_id: str
    address: str
    handle: Any = dataclasses.field(repr=False, compare=False)


class ShuffleService:
    """Shuffle actors, one per node, and the runs started on them (module docstring).

    ``transport`` is ``"ucx"``, ``"tcp"`` or ``"auto"`` (UCX when the actors can import
    ucxx). ``options`` configures every actor's runs and the senders of every run.
    ``timeout`` bounds each round of actor calls (start, start_run, close_run, close).
    ``host`` is the address every actor listens on and advertises; ``None`` (the
    default, and the only choice that works across nodes) is each node's own Ray
    address, so endpoints never listen on interfaces the cluster does not use.
    ``device`` says whether device (GPU) payloads travel, how much of a GPU each actor
    on a GPU node reserves, and what unpack returns for device partitions.
    """

    def __init__(
        self,
        *,
        transport: TransportName = "auto",
        options: RunOptions = DEFAULT_OPTIONS,
        timeout: float = 60.0,
        host: str | None = None,
        device: DeviceOptions = DEFAULT_DEVICE_OPTIONS,
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
        self._secret = os.urandom(32)
        self._mint_run_id = RunIdMinter()
        self._actors: dict[str, ActorInfo] = {}  # by node id
        self._generation = 0  # numbers actor names, so a re-created actor is told apart
        self._runs: dict[ShuffleId, RunHandle] = {}  # the newest open run per shuffle
        self._node_gpus: dict[str, float] = {}  # by node id, as of the last actors()
        self._closed = False

    def __repr__(self) -> str:
        return (
            f"<ShuffleService {self.transport} actors={len(self._actors)} "
            f"runs={len(self._runs)} closed={self._closed}>"
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def open_runs(self) -> list[RunHandle]:
        """The newest run of each shuffle that was started and not closed yet."""
        return list(self._runs.values())

    def actors(self) -> list[ActorInfo]:
        """One started actor per alive node, ordered by node id; creates what is missing."""
        self._check_open()
        alive = [n for n in ray.nodes() if n["Alive"]]
        nodes = dict(sorted((n["NodeID"], n["NodeManagerAddress"]) for n in alive))
        self._node_gpus = {n["NodeID"]: float(n["Resources"].get("GPU", 0)) for n in alive}
        for node_id, gpus in self._node_gpus.items():
            # Refuses (device mode cuda, a node without GPUs) before any actor is created.
            actor_num_gpus(self.device, node_gpus=gpus, node=node_id)
        for node_id in set(self._actors) - set(nodes):
            logger.info("node %s left the cluster; dropping its shuffle actor", node_id)
            self._kill(self._actors.pop(node_id).handle)
        if self.host is not None:
            nodes = dict.fromkeys(nodes, self.host)
        created = {n: self._create(n, host) for n, host in nodes.items() if n not in self._actors}

        def handle_of(node_id: str) -> Any:
            return created[node_id][1] if node_id in created else self._actors[node_id].handle

        try:
            # start() is idempotent: for running actors it is the liveness check.
            results = self._gather({n: handle_of(n).start.remote() for n in nodes}, "start")
            dead = sorted(n for n, r in results.items() if isinstance(r, RayActorError))
            if dead:
                logger.warning("shuffle actors on nodes %s died; re-creating them", dead)
                for n in dead:
                    self._kill(handle_of(n))  # unreachable rather than dead: make sure
                created |= {n: self._create(n, nodes[n]) for n in dead}
                results |= self._gather({n: handle_of(n).start.remote() for n in dead}, "start")
            self._raise_failures(results, "start")
        except BaseException:
            for _, handle in created.values():
                self._kill(handle)
            raise
        gone = {n: self._actors[n].name for n in dead if n in self._actors}
        for node_id, (name, handle) in created.items():
            self._actors[node_id] = ActorInfo(name, node_id, results[node_id], handle)
        if gone:  # a killed actor could not delete its spill files: its successor does
            refs = {
                self._actors[n].name: self._actors[n].handle.remove_spill_of.remote(old)
                for n, old in gone.items()
            }
            for name, result in self._gather(refs, "remove_spill_of").items():
                if isinstance(result, Exception):
                    logger.warning("%s: removing spill files of a dead actor: %r", name, result)
        return [self._actors[n] for n in nodes]

    def start_run(
        self,
        shuffle_id: str,
        *,
        npartitions_out: int,
        meta: pd.DataFrame | RechunkLayout,
        column: str = DEFAULT_PARTITION_COLUMN,
        drop_column: bool = True,
        needed: Sequence[int] | None = None,
    ) -> RunHandle:
        """Start a new run of ``shuffle_id`` on every actor and return its handle.

        A new run of a shuffle that has a run supersedes it (the old one fails with
        ``StaleRunError`` everywhere). ``meta`` is the input partitions' empty frame,
        partition column included, or for an array rechunk its ``RechunkLayout``.
        ``needed``: the output partitions that will be asked for, when not all are
        (``ShuffleRunSpec.needed``).
        """
        actors = self.actors()
        spec = ShuffleRunSpec(
            shuffle_id=ShuffleId(shuffle_id),
            run_id=self._mint_run_id(),
            npartitions_out=npartitions_out,
            participants=tuple(a.name for a in actors),
            column=column,
            drop_column=drop_column,
            needed=None if needed is None else tuple(needed),
        )
        schemes = {a.address.partition("://")[0] for a in actors}
        if len(schemes) != 1:
            raise RuntimeError(
                f"shuffle actors disagree on the transport ({sorted(schemes)}) under "
                f"transport={self.transport!r}: ucxx is importable on some nodes only"
            )
        handle = RunHandle(
            spec=spec,
            meta=meta if isinstance(meta, RechunkLayout) else meta.iloc[:0],
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
        return new

    def close_run(self, handle: RunHandle) -> None:
        """Close ``handle``'s run on every actor, deleting its data; idempotent.

        Actors that died meanwhile are skipped: their runs died with them.
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

    def _create(self, node_id: str, host: str) -> tuple[str, Any]:
        num_gpus = actor_num_gpus(
            self.device, node_gpus=self._node_gpus.get(node_id, 0.0), node=node_id
        )
        self._generation += 1
        name = f"shuffle-{node_id[:8]}-{self._generation}"
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
