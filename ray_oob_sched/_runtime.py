"""Which Ray to use: the user's, the one named by RAY_ADDRESS, or an embedded one.

The embedded local Ray is started on first use, logged once, and is the only Ray
this package ever shuts down (``shutdown``), never one it did not start.
"""

from __future__ import annotations

import logging
import os
import threading

import ray

from ray_oob_sched._config import ray_init_kwargs

logger = logging.getLogger("ray_oob_sched")


class RayRuntime:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._started_here = False

    def ensure(self) -> None:
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
            ray.init(**kwargs)
            self._started_here = True
            logger.info(
                "started an embedded local Ray (%s); it stops with this "
                "process or with ray_oob_sched.shutdown()",
                ", ".join(f"{k}={v}" for k, v in sorted(kwargs.items())) or "defaults",
            )

    def cluster_cpus(self) -> float:
        return float(ray.cluster_resources().get("CPU", 1.0)) or 1.0

    def shutdown(self) -> bool:
        """Stop the embedded Ray if this package started it; True if it did."""
        with self._lock:
            if self._started_here and ray.is_initialized():
                ray.shutdown()
                self._started_here = False
                return True
            return False
