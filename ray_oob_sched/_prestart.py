"""Start the shuffle service ahead of the first shuffle, in the background.

The first shuffle of a session otherwise pays, one after another: creating the
shuffle actors (a process each, imports, a listener), then in every worker process
that runs a transfer the sender's imports, a UCX context and a handshake per actor.
``Prestart`` does both when the scheduler is first used (``enable()`` with Ray
running, or the first compute), on a thread of its own so nothing waits for it:
it submits one ``warm_imports`` task per cluster CPU (the sender's imports and
ucxx's need no actor), starts the actors while those run, then submits one
``warm_sender`` task per cluster CPU, which readies that worker's client and
connections. A compute that needs the service
waits only for the actors part (``wait``), never for the warm-up tasks.

It never runs while a graph is built, and everything it starts belongs to the
scheduler's ``ShuffleService``: ``RaySchedule.close`` (``ray_oob_sched.shutdown``)
waits for the thread and then stops the actors.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import ray

logger = logging.getLogger("ray_oob_sched")

__all__ = ["Prestart"]


class Prestart:
    """One background start of a ``ShuffleService`` (module docstring)."""

    def __init__(self, service: Any, *, warm_tasks: Callable[[], int], timeout: float) -> None:
        self.service = service  # shuffle.shell._service.ShuffleService
        self._warm_tasks = warm_tasks
        self._timeout = timeout
        self._actors_ready = threading.Event()
        self._refs: list[Any] = []  # the warm-up tasks
        self._stopped = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="ray-oob-prestart", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        tasks = 0
        try:
            tasks = self._warm_tasks()
            # The imports need no actor: they run while the actors start.
            self._refs = self.service.warm_imports(tasks=tasks)
        except Exception as e:  # noqa: BLE001 -- warming is best effort
            logger.info("warming the shuffle senders' imports failed: %r", e)
        try:
            self.service.actors()
        except BaseException as e:  # noqa: BLE001 -- the first shuffle retries and raises it
            self.error = e
            logger.info("starting the shuffle actors ahead of use failed: %r", e)
            return
        finally:
            self._actors_ready.set()
        try:
            if self._stopped:
                return
            self._refs += self.service.warm_senders(tasks=tasks)
            _read_all(self._refs, timeout=self._timeout)
            self._refs = []  # hold no refs once done: the driver's refs are the user's
        except Exception as e:  # noqa: BLE001 -- warming is best effort
            logger.info("warming the shuffle senders failed: %r", e)
        except SystemExit:
            # Ray raises SystemExit in threads blocked on it when the driver
            # disconnects (ray.shutdown() or interpreter exit while warming).
            logger.debug("Ray shut down while warming the shuffle senders")

    def wait(self) -> None:
        """Return once the actors part finished (or failed: the caller's use retries)."""
        if not self._actors_ready.wait(self._timeout):
            raise TimeoutError(
                f"starting the shuffle actors took longer than {self._timeout:g} s "
                "(ray-oob-sched.shuffle.timeout)"
            )

    def join(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the whole start, warm-up tasks included;
        True if it finished."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def stop(self, *, timeout: float = 10.0) -> None:
        """Cancel the warm-up tasks still pending and wait for the thread (bounded);
        call after the service closed (its actors are gone: pending warm-ups fail fast)."""
        self._stopped = True
        for ref in self._refs:
            try:
                ray.cancel(ref)
            except Exception as e:  # noqa: BLE001 -- finished already, or Ray is gone
                logger.debug("cancelling a warm-up task: %r", e)
        self.join(timeout)


def _read_all(refs: list[Any], *, timeout: float) -> None:
    """Wait for the warm-up tasks (bounded) and read each result, so that Ray logs no
    unhandled error; failures are logged, warming is best effort."""
    if not refs:
        return
    ray.wait(refs, num_returns=len(refs), timeout=timeout)
    for ref in refs:
        try:
            ray.get(ref, timeout=0)
        except Exception as e:  # noqa: BLE001 -- warming is best effort
            logger.info("warming a shuffle sender failed: %r", e)
