"""Out-of-band shuffle service: pieces of partitions move between Ray actors.

This package is being built layer by layer (see docs/architecture.md). What is
here now is the pure layer: run specs and ids, partition splitting, the frame
codec, the byte limiter, send buffers and the spilling receive store. It imports
neither Ray nor UCX.
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
