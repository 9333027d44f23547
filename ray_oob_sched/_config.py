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
from typing import Any, Literal, TypedDict

import dask.config
import yaml

from shuffle._malloc import DEFAULT_MALLOC, MAX_THRESHOLD, MallocTuning
from shuffle._options import RunOptions
from shuffle.device._options import DeviceMode, DeviceOptions, ResultMemory

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


def _int(key: str, *, minimum: int) -> int:
    value = get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{NAMESPACE}.{key} must be an integer >= {minimum}, got {value!r}")
    return value


def _bool(key: str) -> bool:
    value = get(key)
    if isinstance(value, bool):
        return value
    # Environment variables arrive as strings when not Python literals ("false").
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    raise ValueError(f"{NAMESPACE}.{key} must be true or false, got {value!r}")


@dataclass(frozen=True)
class FuseConfig:
    enabled: bool
    max_tasks: int
    tasks_per_cpu: int
    max_hoisted: int = 8
    unpack_batch: int = 8
    unpack_call_bytes: int = 16 * 2**20


@dataclass(frozen=True)
class SchedulerConfig:
    max_in_flight: int
    inline_data_bytes: int
    fuse: FuseConfig
    forward_warnings: bool = True
    output_window_bytes: int = 2**30
    run_in_caller: bool = True

    @classmethod
    def from_dask_config(cls, *, cluster_cpus: float) -> SchedulerConfig:
        # Full dotted keys: dask.config.get treats "-" and "_" alike, which
        # environment variables (DASK_..._MAX_IN_FLIGHT) rely on.
        if get("scheduler.max-in-flight") == "auto":
            max_in_flight = max(32, 4 * math.ceil(cluster_cpus))
        else:
            try:
                max_in_flight = _int("scheduler.max-in-flight", minimum=1)
            except ValueError as e:
                raise ValueError(f"{e} (or 'auto')") from None
        return cls(
            max_in_flight=max_in_flight,
            inline_data_bytes=_int("scheduler.inline-data-bytes", minimum=0),
            forward_warnings=_bool("scheduler.forward-warnings"),
            run_in_caller=_bool("scheduler.run-in-caller"),
            output_window_bytes=_int("scheduler.output-window-bytes", minimum=0),
            fuse=FuseConfig(
                enabled=_bool("scheduler.fuse.enabled"),
                max_tasks=_int("scheduler.fuse.max-tasks", minimum=1),
                tasks_per_cpu=_int("scheduler.fuse.tasks-per-cpu", minimum=1),
                max_hoisted=_int("scheduler.fuse.max-hoisted", minimum=0),
                unpack_batch=_int("scheduler.fuse.unpack-batch", minimum=1),
                unpack_call_bytes=_int("scheduler.fuse.unpack-call-bytes", minimum=0),
            ),
        )


def ray_init_kwargs() -> dict[str, Any]:
    """Keyword arguments for the embedded ``ray.init`` (None values left out);
    ``free-objects-period-ms`` goes into Ray's ``_system_config``."""
    raw = dict(get("init") or {})
    period = raw.pop("free-objects-period-ms", None)
    kwargs = {k.replace("-", "_"): v for k, v in raw.items() if v is not None}
    if period is not None:
        kwargs["_system_config"] = {"free_objects_period_milliseconds": int(period)}
    return kwargs


def _memory_limit() -> int | Literal["auto"] | None:
    value = get("shuffle.memory-limit")
    if value is None:
        return None
    if value == "auto":
        return "auto"
    try:
        return _int("shuffle.memory-limit", minimum=0)
    except ValueError as e:
        raise ValueError(f"{e} (or 'auto', or null)") from None


def _malloc() -> MallocTuning | None:
    """Both thresholds, or None (either null): glibc's defaults stay."""
    values: dict[str, int | None] = {}
    for name in ("mmap", "trim"):
        key = f"shuffle.malloc-{name}-threshold"
        value = get(key)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_THRESHOLD
        ):
            raise ValueError(
                f"{NAMESPACE}.{key} must be an integer in [0, {MAX_THRESHOLD}] or null, "
                f"got {value!r}"
            )
        values[name] = value
    mmap, trim = values["mmap"], values["trim"]
    if mmap is None or trim is None:
        return None
    return MallocTuning(mmap_threshold=mmap, trim_threshold=trim)


def _actors_per_node() -> int | Literal["auto"]:
    value = get("shuffle.actors-per-node")
    if value == "auto":
        return "auto"
    try:
        return _int("shuffle.actors-per-node", minimum=1)
    except ValueError as e:
        raise ValueError(f"{e} (or 'auto')") from None


def _host() -> str | None:
    value = get("shuffle.host")
    if value is not None and (not isinstance(value, str) or not value or value.isspace()):
        raise ValueError(f"{NAMESPACE}.shuffle.host must be a host name or address, got {value!r}")
    return value


def _port_range() -> tuple[int, int] | None:
    value = get("shuffle.port-range")
    if value is None:
        return None
    first, sep, last = str(value).partition("-")
    if sep and first.strip().isdigit() and last.strip().isdigit():
        ports = int(first), int(last)
        if 0 < ports[0] <= ports[1] < 65536:
            return ports
    raise ValueError(
        f"{NAMESPACE}.shuffle.port-range must be null or 'FIRST-LAST' with "
        f"0 < FIRST <= LAST < 65536, e.g. '40000-40031', got {value!r}"
    )


#: The transports a user may configure (tests also use "local").
ServiceTransport = Literal["auto", "ucx", "tcp"]


class ServiceOptions(TypedDict):
    """The keyword arguments of ``shuffle.shell.ShuffleService``, from ``ShuffleConfig``."""

    transport: ServiceTransport
    options: RunOptions
    timeout: float
    host: str | None
    device: DeviceOptions
    actors_per_node: int | Literal["auto"]
    port_range: tuple[int, int] | None


@dataclass(frozen=True)
class ShuffleConfig:
    transport: ServiceTransport
    memory_limit: int | Literal["auto"] | None
    spill_directory: str | None
    message_bytes: int
    send_buffer_bytes: int | None
    timeout: float
    max_restarts: int
    host: str | None
    device: DeviceMode = "auto"
    actor_num_gpus: float = 0.01
    gpu_results: ResultMemory = "device"
    actors_per_node: int | Literal["auto"] = "auto"
    combine_bytes: int = 16 * 2**20
    port_range: tuple[int, int] | None = None
    rechunk_tasks_max_pieces: int = 4096
    prestart: bool = True
    malloc: MallocTuning | None = DEFAULT_MALLOC

    @classmethod
    def from_dask_config(cls) -> ShuffleConfig:
        transport = get("shuffle.transport")
        if transport not in ("auto", "ucx", "tcp"):
            raise ValueError(
                f"{NAMESPACE}.shuffle.transport must be auto, ucx or tcp, got {transport!r}"
            )
        timeout = get("shuffle.timeout")
        if isinstance(timeout, str):
            timeout = float(timeout)
        if not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ValueError(f"{NAMESPACE}.shuffle.timeout must be > 0, got {timeout!r}")
        device = get("shuffle.device")
        if device not in ("auto", "host", "cuda"):
            raise ValueError(
                f"{NAMESPACE}.shuffle.device must be auto, host or cuda, got {device!r}"
            )
        gpu_results = get("shuffle.gpu-results")
        if gpu_results not in ("device", "host"):
            raise ValueError(
                f"{NAMESPACE}.shuffle.gpu-results must be device or host, got {gpu_results!r}"
            )
        gpus = get("shuffle.actor-num-gpus")
        if isinstance(gpus, str):
            gpus = float(gpus)
        if isinstance(gpus, bool) or not isinstance(gpus, (int, float)) or not 0 <= gpus <= 1:
            raise ValueError(
                f"{NAMESPACE}.shuffle.actor-num-gpus must be a number in [0, 1], got {gpus!r}"
            )
        return cls(
            transport=transport,
            memory_limit=_memory_limit(),
            spill_directory=get("shuffle.spill-directory"),
            message_bytes=_int("shuffle.message-bytes", minimum=1),
            send_buffer_bytes=None
            if get("shuffle.send-buffer-bytes") is None
            else _int("shuffle.send-buffer-bytes", minimum=1),
            timeout=float(timeout),
            host=_host(),
            device=device,
            actor_num_gpus=float(gpus),
            gpu_results=gpu_results,
            max_restarts=_int("shuffle.max-restarts", minimum=0),
            actors_per_node=_actors_per_node(),
            combine_bytes=_int("shuffle.combine-bytes", minimum=0),
            port_range=_port_range(),
            rechunk_tasks_max_pieces=_int("shuffle.rechunk-tasks-max-pieces", minimum=0),
            prestart=_bool("shuffle.prestart"),
            malloc=_malloc(),
        )

    def service_options(self) -> ServiceOptions:
        """The shuffle service's constructor options: ``ShuffleService(**options)``."""
        return ServiceOptions(
            transport=self.transport,
            options=RunOptions(
                memory_limit=self.memory_limit,
                spill_directory=self.spill_directory,
                message_bytes=self.message_bytes,
                send_buffer_bytes=self.send_buffer_bytes,
                combine_bytes=self.combine_bytes,
                malloc=self.malloc,
            ),
            timeout=self.timeout,
            host=self.host,
            device=DeviceOptions(
                mode=self.device,
                actor_num_gpus=self.actor_num_gpus,
                results=self.gpu_results,
            ),
            actors_per_node=self.actors_per_node,
            port_range=self.port_range,
        )
