"""Configuration: defaults in ``ray-oob-sched.yaml`` under dask.config.

Values are read once per compute into frozen dataclasses, so the hot path never
touches dask.config and a compute sees one consistent configuration. Environment
variables work as for dask itself, e.g.
``DASK_RAY_OOB_SCHED__SCHEDULER__FUSE__ENABLED=false``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import dask.config
import yaml

NAMESPACE = "ray-oob-sched"
_HERE = os.path.dirname(__file__)
DEFAULTS_PATH = os.path.join(_HERE, "ray-oob-sched.yaml")
SCHEMA_PATH = os.path.join(_HERE, "ray-oob-sched-schema.yaml")


def _load_defaults() -> None:
    with open(DEFAULTS_PATH) as f:
        defaults = yaml.safe_load(f)
    dask.config.update_defaults(defaults)


_load_defaults()


def get(key: str) -> Any:
    """A value of this package's configuration, e.g. ``get("scheduler.fuse.enabled")``."""
    return dask.config.get(f"{NAMESPACE}.{key}")


@dataclass(frozen=True)
class FuseConfig:
    enabled: bool
    max_tasks: int
    tasks_per_cpu: int


@dataclass(frozen=True)
class SchedulerConfig:
    max_in_flight: int
    inline_data_bytes: int
    fuse: FuseConfig

    @classmethod
    def from_dask_config(cls, *, cluster_cpus: float) -> SchedulerConfig:
        raw = get("scheduler")
        max_in_flight = raw["max-in-flight"]
        if max_in_flight == "auto":
            max_in_flight = max(32, 4 * math.ceil(cluster_cpus))
        elif not isinstance(max_in_flight, int) or max_in_flight < 1:
            raise ValueError(
                f"{NAMESPACE}.scheduler.max-in-flight must be a positive integer or "
                f"'auto', got {max_in_flight!r}"
            )
        fuse = raw["fuse"]
        return cls(
            max_in_flight=max_in_flight,
            inline_data_bytes=int(raw["inline-data-bytes"]),
            fuse=FuseConfig(
                enabled=bool(fuse["enabled"]),
                max_tasks=max(1, int(fuse["max-tasks"])),
                tasks_per_cpu=max(1, int(fuse["tasks-per-cpu"])),
            ),
        )


def ray_init_kwargs() -> dict[str, Any]:
    """Keyword arguments for the embedded ``ray.init`` (None values left out)."""
    raw = get("init") or {}
    return {k.replace("-", "_"): v for k, v in raw.items() if v is not None}
