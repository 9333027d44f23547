"""All shuffle runs of one participant, by shuffle id, and the routing of messages to them.

One ``ShuffleManager`` lives in each participant (each shuffle actor). It holds at most
one run per shuffle id: the newest the driver asked for. A newer run id supersedes the
older run, which is failed with ``StaleRunError`` so that anything still holding it
learns to redo its work under the new run. The manager remembers the highest run id it
has seen per shuffle even after that run is closed (one integer per shuffle), so late
messages and late calls for old or finished runs get a typed error instead of
silently recreating state.

Which error a message or call gets:

=====================================  ==========================================
run id versus this participant's        error
=====================================  ==========================================
older than the newest seen              ``StaleRunError``
the newest seen, and closed             ``ShuffleClosedError``
newer, or a shuffle never seen          ``UnknownRunError``: the driver has not
                                        created that run here (yet)
=====================================  ==========================================

A rejected message never affects other runs: the manager keeps serving them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import pandas as pd

from shuffle._closable import Closable
from shuffle._exceptions import FrameError, ShuffleClosedError, StaleRunError, UnknownRunError
from shuffle._ids import RunId, ShuffleId
from shuffle._options import DEFAULT_OPTIONS, RunOptions
from shuffle._rechunk import RechunkLayout, is_rechunk
from shuffle._run import ArrayRechunkRun, DataFrameShuffleRun, ShuffleRun
from shuffle._spec import ShuffleRunSpec
from shuffle._usage import ParticipantCounters, RunUsage
from shuffle.wire._memory import HOST_REGISTRY, MemoryRegistry
from shuffle.wire._message import decode_header

# UnknownRunError lives in _exceptions with the other typed errors; re-exported here.
__all__ = ["ShuffleManager", "UnknownRunError"]

logger = logging.getLogger(__name__)


class ShuffleManager(Closable):
    """The runs of one participant ``local``, which receive what senders send.

    ``accept_any_sender`` is passed to every run (see ``shuffle._run``), and so is
    ``registry``, the memory types messages may carry (host only by default; the actor
    adds CUDA where it can).
    """

    def __init__(
        self,
        *,
        local: str,
        options: RunOptions = DEFAULT_OPTIONS,
        accept_any_sender: bool = False,
        registry: MemoryRegistry = HOST_REGISTRY,
    ) -> None:
        self.local = local
        self.registry = registry
        self.options = options
        self._accept_any_sender = accept_any_sender
        self._runs: dict[ShuffleId, ShuffleRun] = {}
        self._newest: dict[ShuffleId, RunId] = {}  # survives close, unlike _runs
        self._retired = ParticipantCounters()  # what runs gone from _runs contributed
        self._closed = False

    def __repr__(self) -> str:
        runs = ", ".join(f"{r.shuffle_id}[{r.run_id}]" for r in self._runs.values())
        return f"<ShuffleManager {self.local!r} runs=[{runs}] closed={self._closed}>"

    @property
    def runs(self) -> Mapping[ShuffleId, ShuffleRun]:
        """The open runs by shuffle id (read-only view), for introspection and tests."""
        return MappingProxyType(self._runs)

    def counters(self) -> ParticipantCounters:
        """Cumulative counters over every run this manager held, closed ones too."""
        return self._retired + ParticipantCounters.of_runs(r.usage() for r in self._runs.values())

    def _retire(self, run: ShuffleRun) -> RunUsage:
        usage = run.usage()
        self._retired += ParticipantCounters.of_runs([usage])
        return usage

    async def get_or_create(
        self, spec: ShuffleRunSpec, meta: pd.DataFrame | RechunkLayout
    ) -> ShuffleRun:
        """The run of ``spec``, created on first call; a newer run id supersedes the old.

        ``meta`` says the kind of run: a dataframe shuffle's empty input frame, or an
        array rechunk's ``RechunkLayout``.

        Raises ``StaleRunError`` for a run id older than one already seen,
        ``ShuffleClosedError`` for a run that was closed here, and ``ValueError`` for a
        spec that differs from the one the run was created with.
        """
        self._raise_if_closed(spec.shuffle_id, spec.run_id)
        shuffle_id, run_id = spec.shuffle_id, spec.run_id
        newest = self._newest.get(shuffle_id)
        if newest is not None and run_id < newest:
            raise StaleRunError(shuffle_id, run_id, newest)
        current = self._runs.get(shuffle_id)
        if current is not None and current.run_id == run_id:
            if current.spec != spec:
                raise ValueError(
                    f"shuffle {shuffle_id!r} run {run_id} exists on {self.local!r} with "
                    f"{current.spec}, which differs from {spec}"
                )
            return current
        if current is None and newest == run_id:
            raise ShuffleClosedError(shuffle_id, run_id, f"already closed on {self.local!r}")
        common: dict[str, Any] = {
            "spec": spec,
            "local": self.local,
            "options": self.options,
            "accept_any_sender": self._accept_any_sender,
            "registry": self.registry,
        }
        run: ShuffleRun
        if is_rechunk(meta):
            run = ArrayRechunkRun(layout=meta, **common)
        elif isinstance(meta, pd.DataFrame):
            run = DataFrameShuffleRun(meta=meta, **common)
        else:
            raise TypeError(
                f"shuffle {shuffle_id!r}: a run needs a DataFrame meta or a RechunkLayout, "
                f"got {type(meta).__name__}"
            )
        # Register before awaiting anything, so concurrent callers see the new run.
        self._runs[shuffle_id] = run
        self._newest[shuffle_id] = run_id
        self._retired += ParticipantCounters(runs_opened=1)
        if current is not None:
            self._retire(current)
            logger.info("%s: run %d supersedes run %d", shuffle_id, run_id, current.run_id)
            await current.fail(StaleRunError(shuffle_id, current.run_id, run_id))
        return run

    def get_run(self, shuffle_id: ShuffleId, run_id: RunId) -> ShuffleRun:
        """The open run ``(shuffle_id, run_id)``, or the typed error of the module table."""
        self._raise_if_closed(shuffle_id, run_id)
        newest = self._newest.get(shuffle_id)
        if newest is None or run_id > newest:
            raise UnknownRunError(shuffle_id, run_id, self.local)
        if run_id < newest:
            raise StaleRunError(shuffle_id, run_id, newest)
        run = self._runs.get(shuffle_id)
        if run is None:
            raise ShuffleClosedError(shuffle_id, run_id, f"already closed on {self.local!r}")
        return run

    async def receive(self, frames: Sequence[Any]) -> None:
        """Route one message to its run by the ``(shuffle_id, run_id)`` in its header."""
        if not frames:
            raise FrameError("message has no header frame")
        # Only the header is parsed here; the run validates the message in full.
        header = decode_header(frames[0])
        await self.get_run(header.shuffle_id, header.run_id).receive(frames)

    async def close_run(self, shuffle_id: ShuffleId, run_id: RunId) -> RunUsage | None:
        """Close run ``run_id`` (and any older run) of ``shuffle_id``; idempotent.

        Closing a run id not created yet also marks it closed here, so that a late
        ``get_or_create`` of an abandoned run fails instead of recreating it. Returns
        the closed run's final usage, or ``None`` if no run was open.
        """
        newest = self._newest.get(shuffle_id)
        if newest is None or run_id >= newest:
            self._newest[shuffle_id] = run_id
        current = self._runs.get(shuffle_id)
        if current is not None and current.run_id <= run_id:
            del self._runs[shuffle_id]
            usage = self._retire(current)
            await current.close()
            return usage
        return None

    async def close(self) -> None:
        """Close every run and refuse further runs and messages; idempotent."""
        self._closed = True
        runs = list(self._runs.values())
        self._runs.clear()
        for run in runs:
            self._retire(run)
        results = await asyncio.gather(*(run.close() for run in runs), return_exceptions=True)
        for run, result in zip(runs, results, strict=True):
            if isinstance(result, BaseException):
                logger.warning("%s: closing %s failed: %r", self.local, run, result)

    def _raise_if_closed(self, shuffle_id: ShuffleId, run_id: RunId) -> None:
        if self._closed:
            raise ShuffleClosedError(
                shuffle_id, run_id, f"the shuffle manager of {self.local!r} is closed"
            )
