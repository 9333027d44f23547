"""The Ray I/O shell: submit groups as Ray tasks, wait for them, map Ray's errors.

Each group runs as one Ray task named after its first key, with its inputs as
top-level ObjectRef arguments (Ray resolves them before the task starts; no
``ray.get`` inside tasks). It returns ``1 + len(outputs)`` objects: a small status
first, which the driver fetches to learn success or failure without pulling any
data, then one object per output key.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import pickle
import threading
import time
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import ray
import ray.exceptions

from ray_oob_sched._fuse import Group
from ray_oob_sched._graph import Key
from ray_oob_sched._options import InvalidOptionsError
from ray_oob_sched._p2p import Unpack, unpack_calls
from ray_oob_sched._partd import drop_stores
from ray_oob_sched._worker import GroupSpec, GroupStatus, TaskContext, run_group

logger = logging.getLogger("ray_oob_sched")


class UnpicklableGroupError(TypeError):
    """A group whose functions or data cannot be pickled for a Ray task; ``reason``
    is pickle's own message."""

    def __init__(self, message: str, *, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason


#: How long cancel() first waits for tasks that are about to finish (seconds).
_SETTLE_S = 0.2


#: Seconds after a failed group before its worker collects its garbage (``_collect_soon``).
_COLLECT_AFTER_FAILURE_S = 1.0


@ray.remote
def _ray_run_group(spec: GroupSpec, context: TaskContext, *args: Any) -> tuple[Any, ...]:
    try:
        return run_group(spec, args, context=context)
    except BaseException:
        del spec, context, args  # as run_group does: its traceback keeps this frame
        _collect_soon()
        raise


def _collect_soon() -> None:
    """Collect this worker's garbage once, shortly after the failing task returned.

    Ray's own failure path keeps a task's error in reference cycles
    (ray-project/ray#38216), and through them views of the task's inputs: without a
    collection those stay pinned in the object store while the worker idles. Failures
    only, so a collection's cost (milliseconds) is never paid on the normal path.
    """
    timer = threading.Timer(_COLLECT_AFTER_FAILURE_S, gc.collect)
    timer.daemon = True
    timer.start()


#: How long the driver waits for a finished barrier's value (seconds).
_BARRIER_VALUE_S = 5.0


def barrier_value(ref: Any) -> int | None:
    """What a finished barrier returned (the bytes of its run's inputs); None if it
    failed, whose error the unpacks then raise as they would anyway."""
    try:
        # Its group's status has arrived, but Ray may store the task's other returns
        # a moment later: a zero timeout raced with that.
        value = ray.get(ref, timeout=_BARRIER_VALUE_S)
    except Exception:  # noqa: BLE001 -- reported through the unpacks' own failure
        return None
    return value if isinstance(value, int) else None


@ray.remote(num_cpus=0, max_retries=0)
def _ray_drop_stores(store: Any) -> list[str]:
    return drop_stores(store)


#: How long the driver waits for a compute's disk shuffle stores to be removed (seconds).
DROP_STORES_S = 60.0


def task_name(group: Group) -> str:
    first = group.keys[0]
    if len(group.keys) == 1:
        return str(first)
    return f"{first} (+{len(group.keys) - 1} fused)"


class RayExecutor:
    """Submits groups; options are validated by Ray once per distinct set."""

    def __init__(
        self, options: Mapping[Hashable, Mapping[str, Any]], *, keys_of: Mapping[Hashable, Key]
    ) -> None:
        self._options: dict[Hashable, dict[str, Any]] = {}
        for token, opts in options.items():
            try:
                _ray_run_group.options(**opts)
            except (ValueError, TypeError) as e:
                raise InvalidOptionsError(
                    f"invalid Ray task options {dict(opts)!r} (for dask key "
                    f"{keys_of[token]!r}): {e}"
                ) from e
            self._options[token] = dict(opts)

    def submit(self, group: Group, spec: GroupSpec, context: Any, args: Sequence[Any]) -> list[Any]:
        """Submit one group; returns ``[status_ref, *output_refs]``.

        ``context`` is the compute's ``TaskContext``, or its ObjectRef when large
        (put once per compute; Ray resolves it like the inputs)."""
        opts = self._options.get(group.options, {})
        try:
            refs = _ray_run_group.options(
                name=task_name(group), num_returns=1 + len(group.outputs), **opts
            ).remote(spec, context, *args)
        except (TypeError, pickle.PicklingError) as e:  # Ray's own TypeError wraps pickle's
            reason = _root_cause(e)
            raise UnpicklableGroupError(
                f"dask keys {_keys_text(group)} cannot be pickled for a Ray task "
                f"({reason}); make their functions and data picklable, or set "
                "ray-oob-sched.scheduler.run-in-caller to true to run them in the "
                "caller's process",
                reason=reason,
            ) from e
        except Exception as e:
            _note(e, f"ray_oob_sched: could not submit dask keys {_keys_text(group)}")
            raise
        return list(refs)

    @staticmethod
    def wait(status_refs: Sequence[Any]) -> list[Any]:
        """Block until at least one group finishes; return every finished status ref."""
        done, rest = ray.wait(list(status_refs), num_returns=1, fetch_local=False)
        if rest:
            more, _ = ray.wait(rest, num_returns=len(rest), timeout=0, fetch_local=False)
            done.extend(more)
        return done

    @staticmethod
    def submit_unpacks(
        group: Group,
        unpacks: Sequence[Unpack],
        args: Sequence[Any],
        *,
        inputs_nbytes: int | None,
        max_bytes: int,
    ) -> list[Any]:
        """A batch of p2p output partitions, returned by the actor that owns them.

        ``args`` is the barrier's ref: Ray starts the call only once every transfer
        is done. The actor returns ``(worker id, *partitions)``, each partition
        becoming an object of its own, owned by this driver. A batch becomes one
        call per owning actor (a restart may have spread its partitions over
        several), each returning at most ``max_bytes`` of outputs as estimated from
        ``inputs_nbytes``, the barrier's value (None: unknown, one call per actor).
        Several calls' statuses become the group's through one more call on an
        actor of the batch (``joined_status``), which Ray starts once
        they all succeeded: not a task, which could need a worker process of its
        own while the consumers run, and the calls themselves stay independent.
        """
        if tuple(group.outputs) != tuple(group.keys) or len(unpacks) != len(group.keys):
            raise RuntimeError(
                f"unpack group {_keys_text(group)}: every unpack must be an output "
                f"({len(unpacks)} unpacks, outputs {group.outputs!r})"
            )
        handle = unpacks[0].handle
        sid, rid = handle.spec.shuffle_id, handle.spec.run_id
        statuses: list[Any] = []
        outputs: list[Any] = [None] * len(unpacks)
        calls = unpack_calls(unpacks, inputs_nbytes=inputs_nbytes, max_bytes=max_bytes)
        for _, positions in calls:
            partitions = [unpacks[i].partition for i in positions]
            actor = handle.actor_for(partitions[0])
            refs = actor.unpack.options(
                num_returns=1 + len(partitions), name=task_name(group)
            ).remote(sid, rid, partitions, *args)
            statuses.append(refs[0])
            for i, ref in zip(positions, refs[1:], strict=True):
                outputs[i] = ref
        status = statuses[0] if len(statuses) == 1 else actor.joined_status.remote(*statuses)
        return [status, *outputs]

    @staticmethod
    def statuses(status_refs: Sequence[Any]) -> list[GroupStatus]:
        """Statuses of finished groups (tiny); raises a failed group's error.

        An unpack's status is its actor's worker id (a string)."""
        return [
            s if isinstance(s, GroupStatus) else GroupStatus(worker=str(s))
            for s in ray.get(list(status_refs))
        ]

    @classmethod
    def cancel(
        cls, status_refs: Sequence[Any], *, grace_s: float = 2.0, deadline_s: float = 10.0
    ) -> None:
        """Cancel groups and wait (bounded) until Ray has stopped them.

        A polite cancel (KeyboardInterrupt in the task) can race with the task
        being handed to its worker and be lost (seen with Ray 2.60), so tasks still
        running after ``grace_s`` are force-cancelled (their worker process is
        killed); tasks still not ended at ``deadline_s`` are logged.
        """
        if not status_refs:
            return
        start = time.monotonic()
        # Let tasks that are finishing right now finish first: a cancel that races
        # with a task's reply can crash the driver in Ray 2.60 ("Check failed: it !=
        # submissible_tasks_.end() Tried to complete task that was not pending",
        # ray-project/ray PRs 54527, 54798), and after a failure many fused groups
        # tend to end at once. Only tasks still running after this short wait are
        # cancelled, and never one whose result has arrived.
        done, pending = ray.wait(
            list(status_refs),
            num_returns=len(status_refs),
            timeout=_SETTLE_S,
            fetch_local=False,
        )
        cls.observe(done)
        force = False
        while pending:
            for ref in pending:
                try:
                    ray.cancel(ref, force=force, recursive=True)
                except Exception:  # already finished, or its worker is gone
                    logger.debug("could not cancel %s", ref, exc_info=True)
            elapsed = time.monotonic() - start
            if elapsed >= deadline_s:
                logger.warning(
                    "%d cancelled Ray tasks had not stopped after %.0f s",
                    len(pending),
                    deadline_s,
                )
                break
            wait_s = (grace_s if not force else deadline_s) - elapsed
            done, pending = ray.wait(
                pending, num_returns=len(pending), timeout=max(0.0, wait_s), fetch_local=False
            )
            cls.observe(done)
            force = True

    @staticmethod
    def observe(refs: Sequence[Any]) -> None:
        """Read finished, failed refs so that their errors count as handled."""
        for ref in refs:
            # The error itself was raised to the user already.
            with contextlib.suppress(Exception):
                ray.get(ref, timeout=0)

    @staticmethod
    def succeeded(status_ref: Any) -> bool:
        """Whether a finished group succeeded (False: failed, cancelled or not done)."""
        try:
            ray.get(status_ref, timeout=0)
        except Exception:  # noqa: BLE001 -- any failure means "no"
            return False
        return True

    @staticmethod
    def drop_stores(stores: Sequence[Any], *, strategy: Any) -> None:
        """Remove partd stores (refs to them) on their node and wait, bounded: with
        zero CPUs, so that a busy node runs it at once."""
        if not stores:
            return
        refs = [
            _ray_drop_stores.options(
                scheduling_strategy=strategy, name="ray_oob_sched: remove disk shuffle store"
            ).remote(s)
            for s in stores
        ]
        done, pending = ray.wait(
            refs, num_returns=len(refs), timeout=DROP_STORES_S, fetch_local=True
        )
        if pending:
            logger.warning(
                "%d disk shuffle stores (partd directories) were not removed within %.0f s",
                len(pending),
                DROP_STORES_S,
            )
        for ref in done:
            try:
                ray.get(ref)
            except Exception as e:  # noqa: BLE001 -- reported, the compute's outcome stands
                logger.warning("could not remove a disk shuffle store (partd): %s", e)

    @staticmethod
    def fetch(refs: Sequence[Any]) -> list[Any]:
        return ray.get(list(refs))


def may_be_actor_loss(err: BaseException) -> bool:
    """Whether a group's error may come from a shuffle actor that died.

    True for an actor call that failed because its actor died or became
    unreachable, and for a task whose exception is a transport failure or a
    timeout (a transfer sending to a dead actor's address; groups downstream of a
    failed one fail with the same error). The caller confirms with a liveness check
    before restarting anything: a user's exception never restarts a shuffle.
    """
    from shuffle._transport import TransportError, TransportUsageError

    if isinstance(err, ray.exceptions.RayActorError):
        return True
    if isinstance(err, ray.exceptions.RayTaskError):
        cause = err.cause
        return isinstance(cause, (TransportError, TimeoutError, ConnectionError)) and not (
            isinstance(cause, TransportUsageError)
        )
    return False


def user_error(err: BaseException, group: Group) -> BaseException:
    """The exception to raise for a failed group: the task's own, with its key.

    Raise it ``from err`` so that Ray's error, which carries the remote traceback,
    is shown as its cause.

    Ray wraps a task's exception in RayTaskError; the user gets the original type
    and message back (the worker already noted the failing key). Errors of Ray
    itself (worker crash, cancellation, lost object) stay Ray's, noted with the
    keys of the group.
    """
    if isinstance(err, ray.exceptions.RayTaskError):
        cause = err.cause
        if isinstance(cause, BaseException) and not isinstance(cause, ray.exceptions.RayError):
            if not _has_key_note(cause):
                _note(cause, f"ray_oob_sched: raised in dask keys {_keys_text(group)}")
            return cause
    _note(err, f"ray_oob_sched: Ray task {task_name(group)!r} failed; keys {_keys_text(group)}")
    return err


def _root_cause(e: BaseException) -> str:
    """The innermost error's message: pickle's own (Ray's wrapper repeats the whole
    task and a serialisation trace)."""
    seen = {id(e)}
    while (inner := e.__cause__ or e.__context__) is not None and id(inner) not in seen:
        seen.add(id(inner))
        e = inner
    return str(e)


def _keys_text(group: Group) -> str:
    shown = ", ".join(repr(k) for k in group.keys[:3])
    return f"[{shown}{', ...' if len(group.keys) > 3 else ''}]"


def _has_key_note(e: BaseException) -> bool:
    return any("ray_oob_sched:" in n for n in getattr(e, "__notes__", ()))


def _note(e: BaseException, text: str) -> None:
    e.add_note(text)
