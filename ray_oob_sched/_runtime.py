"""Which Ray to use: the user's, the one named by RAY_ADDRESS, or an embedded one.

The embedded local Ray is started on first use, logged once, and is the only Ray
this package ever shuts down (``shutdown``), never one it did not start.

Ray Client (``ray.init("ray://...")``) is refused: its ObjectRefs and actor handles
live in a proxy on the head node, so the driver-side reference bookkeeping that frees
intermediates, the actor calls that return output partitions and the per-driver
shuffle secret would all go through that proxy, and none of it is tested there.
"""

from __future__ import annotations

import logging
import os
import threading

import ray
import ray.util.client

from ray_oob_sched._config import ray_init_kwargs
from ray_oob_sched._partd import NodeInfo

logger = logging.getLogger("ray_oob_sched")

_CLIENT_ADVICE = (
    "run the driver on a node of the cluster instead: submit it as a job "
    "(`ray job submit --address http://<head>:8265 -- python script.py`), or start it "
    "on a node with RAY_ADDRESS=<head>:6379 (the GCS address, no ray://) or "
    "ray.init(address='auto')"
)


class RayClientNotSupportedError(RuntimeError):
    """The driver is (or would be) connected through Ray Client (``ray://``)."""


def refuse_ray_client(*, connected: bool, address: str | None) -> None:
    """Raise ``RayClientNotSupportedError`` if ``connected`` through Ray Client, or if
    Ray is to be joined at a ``ray://`` ``address`` (RAY_ADDRESS)."""
    if connected:
        raise RayClientNotSupportedError(
            "ray_oob_sched does not support Ray Client: this process is connected to Ray "
            f"through ray://; {_CLIENT_ADVICE}"
        )
    if address is not None and address.strip().lower().startswith("ray://"):
        raise RayClientNotSupportedError(
            f"ray_oob_sched does not support Ray Client: RAY_ADDRESS is {address!r}; "
            f"{_CLIENT_ADVICE}"
        )


class RayRuntime:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._started_here = False

    def refuse_ray_client(self) -> None:
        """Raise ``RayClientNotSupportedError`` in a Ray Client session, or when
        RAY_ADDRESS would start one."""
        # ray.is_initialized() is true in a Ray Client session as well.
        refuse_ray_client(
            connected=ray.util.client.ray.is_connected(),
            address=None if ray.is_initialized() else os.environ.get("RAY_ADDRESS"),
        )

    def ensure(self) -> None:
        """Make sure this process is a Ray driver, joining or starting a Ray if none is
        initialised (never a Ray Client)."""
        self.refuse_ray_client()
        if ray.is_initialized():
            return
        with self._lock:
            if ray.is_initialized():
                return
            address = os.environ.get("RAY_ADDRESS")
            if address:
                # ray.init reads RAY_ADDRESS itself; a cluster we join is not ours.
                ray.init()
                logger.info("connected to the Ray cluster at %s", address)
                return
            kwargs = ray_init_kwargs()
            # Before ray.init, which adds its own entries to the _system_config dict.
            settings = ", ".join(f"{k}={v}" for k, v in sorted(kwargs.items())) or "defaults"
            ray.init(**kwargs)
            self._started_here = True
            logger.info(
                "started an embedded local Ray (%s); it stops with this "
                "process or with ray_oob_sched.shutdown()",
                settings,
            )

    def cluster_cpus(self) -> float:
        return float(ray.cluster_resources().get("CPU", 1.0)) or 1.0

    def alive_nodes(self) -> int:
        return sum(1 for n in ray.nodes() if n["Alive"]) or 1

    def nodes(self) -> list[NodeInfo]:
        """Every node Ray knows, with its total resources."""
        return [
            NodeInfo(node_id=n["NodeID"], alive=bool(n["Alive"]), resources=n["Resources"])
            for n in ray.nodes()
        ]

    def driver_node(self) -> str:
        """The id of the node this driver runs on."""
        return str(ray.get_runtime_context().get_node_id())

    def shutdown(self) -> bool:
        """Stop the embedded Ray if this package started it; True if it did."""
        with self._lock:
            if self._started_here and ray.is_initialized():
                ray.shutdown()
                self._started_here = False
                return True
            return False
