"""Out-of-band shuffle service: pieces of partitions move between Ray actors.

This package is being built layer by layer (see docs/architecture.md). The pure
layer (run specs and ids, partition splitting, the frame codec, the byte limiter,
send buffers, the spilling receive store, runs and their manager) imports neither
Ray nor UCX, and neither does this package's import. The Ray I/O shell is imported
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
