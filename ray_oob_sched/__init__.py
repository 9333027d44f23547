"""ray_oob_sched: run Dask graphs on Ray, with shuffles moved out-of-band.

>>> import dask, ray_oob_sched
>>> with ray_oob_sched.enable():          # or dask.config.set(scheduler=ray_oob_sched.get)
...     x.sum().compute()

Results stay in Ray's object store until asked for; every intermediate is freed as
soon as nothing still to be submitted needs it; ``persist`` returns collections
backed by ObjectRefs.
"""

from __future__ import annotations

from typing import Any

import dask.config

from ray_oob_sched import _config  # noqa: F401  (registers the config defaults)
from ray_oob_sched._caller import CallerOnlyTaskError
from ray_oob_sched._executor import UnpicklableGroupError
from ray_oob_sched._futures import RayFuture
from ray_oob_sched._graph import InvalidGraphError
from ray_oob_sched._keywords import IgnoredKeywordsWarning
from ray_oob_sched._options import InvalidOptionsError
from ray_oob_sched._p2p import UnsupportedGraphError
from ray_oob_sched._plugin import DEFAULT, RaySchedule, RunStats
from ray_oob_sched._restart import ShuffleActorLostError
from ray_oob_sched._runtime import RayClientNotSupportedError
from ray_oob_sched._status import (
    ActorRunStatus,
    ShuffleRunStatus,
    ShuffleRunTotals,
    ShuffleStatus,
)
from ray_oob_sched._store import UnsupportedStoreTargetError

__version__ = "0.1.0"

_schedule = DEFAULT

#: The scheduler function: ``dask.config.set(scheduler=ray_oob_sched.get)``.
get = _schedule.get
#: Like ``get`` but returns ObjectRefs for the requested keys instead of values.
get_refs = _schedule.get_refs


def enable(**config: Any) -> dask.config.set:
    """Use Ray for every compute; returns a ``dask.config.set`` (a context manager).

    Also selects dask's peer-to-peer dataframe shuffle, which ray_oob_sched runs
    through its out-of-band shuffle actors (shuffle, set_index, sort_values,
    groupby with split_out, hash merge), and the p2p array rechunk, which runs
    through the same actors, or for a small plan (``shuffle.rechunk-tasks-max-pieces``)
    as one plain Ray task per output chunk (``method="tasks"`` per call opts out).
    Extra ``config`` keywords are set with it, as ``dask.config.set`` takes them
    (``ray_oob_sched__scheduler__fuse__enabled=False``). Used as a context manager,
    everything is restored on exit. With Ray running, the shuffle actors start in the
    background now (``shuffle.prestart``), so the first shuffle does not wait for them;
    ``shutdown()`` stops them.
    """
    settings = dask.config.set(
        {
            "scheduler": get,
            "dataframe.shuffle.method": "p2p",
            "array.rechunk.method": "p2p",
        },
        **config,
    )
    _schedule.prestart()  # with Ray running: actors start in the background
    return settings


def disable() -> dask.config.set:
    """Stop using Ray: dask picks its scheduler as usual again.

    The shuffle and rechunk methods that ``enable`` selected stay; ``with
    enable():`` restores everything on exit instead.
    """
    return dask.config.set(scheduler=None)


def last_stats() -> RunStats | None:
    """Counts and timing of the last compute or persist run by ``get``."""
    return _schedule.last_stats


def shuffle_status(*, timeout: float = 2.0) -> ShuffleStatus:
    """The shuffles and rechunks running now, from any thread of this driver.

    For each run: its inputs received so far (transfer tasks finished, so their
    pieces are stored at their owners) out of expected, outputs handed over, the
    elapsed time, and per shuffle actor the pieces and bytes received and the bytes
    held in memory and on disk. Asks each actor once with one ``timeout`` (seconds);
    actors that do not answer in time are named in ``unanswered``. Empty when no
    shuffle runs.
    """
    return _schedule.shuffle_status(timeout=timeout)


def shutdown() -> bool:
    """Stop the shuffle actors, and the embedded Ray if this package started it.

    Never stops a Ray it joined. Returns True if it stopped Ray.
    """
    _schedule.close()
    return _schedule.runtime.shutdown()


__all__ = [
    "ActorRunStatus",
    "CallerOnlyTaskError",
    "IgnoredKeywordsWarning",
    "InvalidGraphError",
    "InvalidOptionsError",
    "RayClientNotSupportedError",
    "RayFuture",
    "RaySchedule",
    "RunStats",
    "ShuffleActorLostError",
    "ShuffleRunStatus",
    "ShuffleRunTotals",
    "ShuffleStatus",
    "UnpicklableGroupError",
    "UnsupportedGraphError",
    "UnsupportedStoreTargetError",
    "disable",
    "enable",
    "get",
    "get_refs",
    "last_stats",
    "shuffle_status",
    "shutdown",
]
