"""Pure mapping of dask annotations and compute keywords to Ray task options.

Supported, per key (``dask.annotate``) or for the whole compute (keyword or the
annotation context active at compute time):

- ``ray_remote_args={...}``: passed to Ray's ``.options()`` as is;
- ``resources={"CPU": 2, "GPU": 1, "custom": 1}``: dask's own annotation, mapped to
  ``num_cpus``, ``num_gpus`` and ``resources``;
- ``retries=n``: dask's own annotation, mapped to ``max_retries=n`` and
  ``retry_exceptions=True`` (dask retries on any exception).

More specific wins: per-key ``ray_remote_args`` over per-key ``resources``/``retries``
over the compute-wide settings. Options are validated by Ray before anything runs
(see ``_executor``); the options the scheduler owns are refused here.
"""

from __future__ import annotations

import pickle
from collections.abc import Hashable, Iterable, Mapping
from typing import Any

from ray_oob_sched._graph import Key

Options = Mapping[str, Any]

# Set by the scheduler for every task; a user value would break its bookkeeping.
RESERVED = frozenset({"num_returns", "name", "_generator_backpressure_num_objects"})


class InvalidOptionsError(ValueError):
    """Ray task options from annotations or ``ray_remote_args`` are not valid."""


def _from_dask_annotations(annots: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    resources = annots.get("resources")
    if resources:
        custom = dict(resources)
        if "CPU" in custom:
            out["num_cpus"] = custom.pop("CPU")
        if "GPU" in custom:
            out["num_gpus"] = custom.pop("GPU")
        if custom:
            out["resources"] = custom
    retries = annots.get("retries")
    if retries is not None:
        out["max_retries"] = int(retries)
        out["retry_exceptions"] = True
    remote_args = annots.get("ray_remote_args")
    if remote_args:
        if not isinstance(remote_args, Mapping):
            raise InvalidOptionsError(
                f"ray_remote_args must be a dict of Ray task options, got {remote_args!r}"
            )
        out.update(remote_args)
    return out


def check_reserved(options: Options, where: str) -> None:
    bad = RESERVED.intersection(options)
    if bad:
        raise InvalidOptionsError(
            f"{where}: Ray options {sorted(bad)} are set by ray_oob_sched itself; remove them"
        )


def per_key_options(
    keys: Iterable[Key],
    annotations: Mapping[str, Mapping[Key, Any]],
    *,
    compute_annotations: Mapping[str, Any],
    compute_remote_args: Options | None,
) -> dict[Key, dict[str, Any]]:
    """Ray options for every key that has any; keys without options are left out."""
    base = _from_dask_annotations(compute_annotations)
    if compute_remote_args:
        base.update(_from_dask_annotations({"ray_remote_args": compute_remote_args}))
    check_reserved(base, "compute-wide ray_remote_args")
    names = ("ray_remote_args", "resources", "retries")
    relevant = {n: annotations[n] for n in names if n in annotations}
    out: dict[Key, dict[str, Any]] = {}
    for k in keys:
        own = {n: per_key[k] for n, per_key in relevant.items() if k in per_key}
        if not own:
            if base:
                out[k] = base
            continue
        opts = dict(base)
        opts.update(_from_dask_annotations(own))
        check_reserved(opts, f"annotations of key {k!r}")
        out[k] = opts
    return out


def options_token(options: Options) -> Hashable:
    """A hashable stand-in for an options dict, equal for equal options.

    Values may be unhashable (dicts, scheduling-strategy objects without __eq__),
    so the token is their pickle: equal-valued strategies share a token, and
    unlike a repr it cannot make different options look the same. Unpicklable
    values fall back to identity.
    """
    items: list[tuple[str, object]] = []
    for k, v in sorted(options.items()):
        try:
            items.append((k, pickle.dumps(v)))
        except Exception:  # noqa: BLE001 -- pickling may fail with any error type
            items.append((k, ("id", id(v))))
    return tuple(items)
