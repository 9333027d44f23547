"""Pure: the caller's dask config, snapshotted once per compute and applied in tasks.

Under dask's local schedulers a task reads the configuration in force when
``compute`` was called (``temporary-directory``, ``array.chunk-size``, ...); in a
Ray worker it would read the worker's own. ``snapshot`` pickles the driver's
``dask.config.config`` once per compute (a few KiB, microseconds); ``applied``
swaps it in around one group in the worker and restores the worker's afterwards.
The ``scheduler`` and ``pool`` entries stay behind: a compute inside a task runs on
dask's local scheduler in that worker, as it always did (``pool`` is the local
schedulers' executor, an object of the driver process).
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from contextlib import contextmanager

import cloudpickle
import dask.config

#: Entries that name objects of the driver process.
DRIVER_ONLY = frozenset({"scheduler", "pool"})


def snapshot() -> bytes:
    """The caller's dask config, pickled (cloudpickle for lambdas and the like)."""
    config = {k: v for k, v in dask.config.config.items() if k not in DRIVER_ONLY}
    try:
        return pickle.dumps(config, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # noqa: BLE001 -- a value plain pickle refuses: try harder
        try:
            blob: bytes = cloudpickle.dumps(config, protocol=pickle.HIGHEST_PROTOCOL)
            return blob
        except Exception as e:
            raise TypeError(
                "ray_oob_sched runs tasks under the caller's dask config, and this one "
                f"cannot be pickled ({e}); remove the unpicklable value from dask.config"
            ) from e


@contextmanager
def applied(blob: bytes) -> Iterator[None]:
    """Run the body under the config pickled in ``blob``; restore the worker's after.

    ``dask.config.config`` is mutated in place: ``dask.config.get`` binds that dict
    as a default argument. Top-level entries are swapped, so the worker's nested
    dicts are never touched.
    """
    config = dask.config.config
    caller = pickle.loads(blob)
    saved = dict(config)
    config.clear()
    config.update(caller)
    try:
        yield
    finally:
        config.clear()
        config.update(saved)
