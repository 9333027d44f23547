"""Futures that persisted collections hold: a dask key bound to a Ray ObjectRef.

dask (2026.x) treats any object with ``__dask_future__ = True`` and a ``key`` as a
reference to data that a scheduler already holds, exactly as it treats
``distributed.Future``: graph optimisation keeps it as a dependency on ``key``
instead of inlining it as data. The graphs that reach ``get`` therefore name such
keys without defining them; the registry maps them back to the live futures.

The registry holds futures weakly: a persisted collection owns its futures, each
future owns its ObjectRef, so dropping the collection drops the refs and Ray frees
the objects.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

from ray_oob_sched._graph import Key


class RayFuture:
    """The result of one persisted dask key, held in Ray's object store."""

    __dask_future__ = True
    __slots__ = ("__weakref__", "key", "ref")

    def __init__(self, key: Key, ref: Any) -> None:
        self.key = key
        self.ref = ref

    def result(self, timeout: float | None = None) -> Any:
        import ray

        return ray.get(self.ref, timeout=timeout)

    def __dask_tokenize__(self) -> Any:
        # Equal keys name equal computations, as for distributed.Future.
        return ("RayFuture", self.key)

    def __repr__(self) -> str:
        return f"<RayFuture key={self.key!r} ref={self.ref!r}>"

    def __reduce__(self) -> Any:
        raise TypeError(
            f"RayFuture for {self.key!r} cannot be pickled: its ObjectRef belongs to "
            "this driver; pass the collection's data through a compute instead"
        )


class FutureRegistry:
    """Live futures by key, held weakly; any live future for a key resolves it.

    One per process (``REGISTRY``): a collection persisted through any
    ``RaySchedule`` can be computed through any other.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_key: dict[Key, dict[int, weakref.ref[RayFuture]]] = {}

    def register(self, future: RayFuture) -> RayFuture:
        key, ident = future.key, id(future)

        def forget(_: object) -> None:
            with self._lock:
                live = self._by_key.get(key)
                if live is not None:
                    live.pop(ident, None)
                    if not live:
                        del self._by_key[key]

        with self._lock:
            self._by_key.setdefault(key, {})[ident] = weakref.ref(future, forget)
        return future

    def lookup(self, key: Key) -> Any | None:
        """The ObjectRef of a live future for ``key``, or None."""
        with self._lock:
            for wr in (self._by_key.get(key) or {}).values():
                fut = wr()
                if fut is not None:
                    return fut.ref
        return None

    def __len__(self) -> int:
        """Keys with at least one live future."""
        with self._lock:
            return len(self._by_key)


REGISTRY = FutureRegistry()
