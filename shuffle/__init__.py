"""Out-of-band shuffle service: pieces of partitions move between Ray actors.

Layered as docs/architecture.md describes. The pure layer (run specs and ids,
partition splitting, rechunk geometry, the frame and piece codecs, the byte
limiter, send buffers, the spilling receive store, runs and their manager) imports
neither Ray nor UCX (nor CuPy/cuDF, which device code imports on first use), and
neither does this package's import. The Ray I/O shell is imported
from its modules: ``shuffle._service`` (``ShuffleService``, driver side),
``shuffle._transfer`` (``transfer``, run by transfer tasks), ``shuffle._handle``
(``RunHandle``), ``shuffle._actor`` (``ShuffleActor``) and ``shuffle._client``
(the per-process sender).
"""

from __future__ import annotations

from shuffle._exceptions import ShuffleClosedError, ShuffleError, StaleRunError
from shuffle._ids import RunId, ShuffleId
from shuffle._spec import ShuffleRunSpec

__all__ = [
    "RunId",
    "ShuffleClosedError",
    "ShuffleError",
    "ShuffleId",
    "ShuffleRunSpec",
    "StaleRunError",
]
