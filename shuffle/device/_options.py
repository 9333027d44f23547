"""The device settings of one shuffle service, and what they mean for actors.

Device mode, per process (``DeviceOptions.mode``):

``"auto"``  device frames are sent and received where a GPU is usable; the GPU
            libraries are only imported when the first device frame arrives.
``"cuda"``  like auto, but shuffle actors probe their GPU at start and fail loudly
            without one.
``"host"``  device payloads are refused (clear error naming this setting).

``actor_num_gpus(...)``: how many GPUs a shuffle actor reserves on a node (pure).
"""

from __future__ import annotations

import dataclasses
from typing import Literal, TypeAlias

from shuffle._exceptions import ShuffleError

__all__ = [
    "CONFIG_KEY",
    "DEFAULT_DEVICE_OPTIONS",
    "DEVICE_MODES",
    "DeviceMode",
    "DeviceOptions",
    "DeviceUnavailableError",
    "ResultMemory",
    "actor_num_gpus",
]

DeviceMode: TypeAlias = Literal["auto", "host", "cuda"]
#: What ``unpack`` returns for a device partition: the device object itself (Ray then
#: pickles it, which copies it to host memory in the object store and back to a GPU
#: where it is read), or an explicit host copy (numpy / pandas), readable anywhere.
ResultMemory: TypeAlias = Literal["device", "host"]
DEVICE_MODES: tuple[str, ...] = ("auto", "host", "cuda")
RESULT_MEMORIES: tuple[str, ...] = ("device", "host")
#: The dask config key users change; named in every refusal.
CONFIG_KEY = "ray-oob-sched.shuffle.device"


class DeviceUnavailableError(ShuffleError, RuntimeError):
    """Device memory was needed where it cannot be used (no GPU, or mode ``host``)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeviceOptions:
    """Device settings of one shuffle service, shared by its actors and senders."""

    mode: DeviceMode = "auto"
    #: GPUs each shuffle actor reserves on a node that has GPUs (see ``actor_num_gpus``).
    actor_num_gpus: float = 0.01
    #: What ``unpack`` returns for a device partition (see ``ResultMemory``).
    results: ResultMemory = "device"

    def __post_init__(self) -> None:
        if self.mode not in DEVICE_MODES:
            raise ValueError(f"device mode must be one of {DEVICE_MODES}, got {self.mode!r}")
        if self.results not in RESULT_MEMORIES:
            raise ValueError(
                f"device results must be one of {RESULT_MEMORIES}, got {self.results!r}"
            )
        gpus = self.actor_num_gpus
        if isinstance(gpus, bool) or not isinstance(gpus, (int, float)) or not 0 <= gpus <= 1:
            raise ValueError(f"actor_num_gpus must be a number in [0, 1], got {gpus!r}")


DEFAULT_DEVICE_OPTIONS = DeviceOptions()


def actor_num_gpus(options: DeviceOptions, *, node_gpus: float, node: str) -> float:
    """GPUs a shuffle actor on a node with ``node_gpus`` GPUs reserves.

    A GPU share makes Ray account for the actor and set ``CUDA_VISIBLE_DEVICES`` to the
    GPU it was given, so the actor receives into that GPU's memory. Nodes without GPUs
    reserve none; mode ``host`` reserves none anywhere; mode ``cuda`` refuses nodes
    without GPUs, since their actor could never receive a device frame.
    """
    if options.mode == "host":
        return 0.0
    if node_gpus <= 0:
        if options.mode == "cuda":
            raise DeviceUnavailableError(
                f"node {node} has no GPUs, but {CONFIG_KEY} is cuda: every shuffle actor "
                "needs a GPU; use auto to let CPU-only nodes take host partitions only"
            )
        return 0.0
    return float(options.actor_num_gpus)
