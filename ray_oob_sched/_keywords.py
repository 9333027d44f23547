"""Pure sorting of the keywords that ``compute``/``persist`` pass on to a scheduler.

dask hands every keyword it does not use itself to the scheduler, so code written
for dask's local schedulers or for distributed carries keywords meant for them.
They are honoured where Ray can (``resources=``, ``retries=``, as the annotations
of the same names), ignored silently where they only size a local pool, ignored
with one warning where losing them cannot change a result (placement and priority
hints), and refused where it could; so is a ``ray_``-prefixed keyword other than
``ray_remote_args`` (taken before this module sees the rest): a misspelt one would
drop the Ray options it meant to set.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: Mapped to Ray options like dask's annotations of the same name (``_options``).
HONOURED = frozenset({"resources", "retries"})
#: Sizes of dask's local pools, meaningless on a cluster; ``ray_persist`` is injected
#: by ray.util.dask's patch of ``dask.persist``.
SILENT = frozenset({"num_workers", "pool", "chunksize", "ray_persist"})
#: Keywords whose silent loss would change what the caller gets back.
REFUSED = {
    "cache": "dask's local schedulers fill cache= with every computed value; "
    "ray_oob_sched keeps values in Ray: use dask.persist or ray_oob_sched.get_refs",
    "actors": "distributed's actors= turns results into actor handles; use Ray actors directly",
}


class IgnoredKeywordsWarning(UserWarning):
    """``compute``/``persist`` got keywords meant for other schedulers; they were ignored."""


@dataclass(frozen=True)
class Keywords:
    annotations: dict[str, Any]  # compute-wide annotations (resources, retries)
    ignored: tuple[str, ...]  # names that were dropped with a warning


def sort_keywords(kwargs: Mapping[str, Any]) -> Keywords:
    """Split ``kwargs``; raise ``TypeError`` naming any refused keyword."""
    refused = sorted(set(kwargs).intersection(REFUSED))
    misspelt = sorted(k for k in kwargs if k.startswith("ray_") and k not in SILENT)
    if misspelt:
        raise TypeError(
            f"ray_oob_sched got unknown keywords {misspelt}; it takes callbacks= and "
            "ray_remote_args= (Ray task options)"
        )
    if refused:
        reasons = "; ".join(f"{k}=: {REFUSED[k]}" for k in refused)
        raise TypeError(f"ray_oob_sched cannot honour compute keywords {refused}: {reasons}")
    annotations = {k: v for k, v in kwargs.items() if k in HONOURED and v is not None}
    ignored = tuple(sorted(set(kwargs) - HONOURED - SILENT))
    return Keywords(annotations=annotations, ignored=ignored)


def warn_ignored(names: tuple[str, ...], *, stacklevel: int) -> None:
    if names:
        warnings.warn(
            f"ray_oob_sched ignores compute keywords {list(names)} (meant for other "
            "schedulers: placement, priority or debugging hints that Ray does not take)",
            IgnoredKeywordsWarning,
            stacklevel=stacklevel + 1,
        )
