"""Out-of-band shuffle service: pieces of partitions move between Ray actors.

Layered in folders, as docs/architecture.md describes. The core (this folder: run
specs and ids, splitting and partitioning, rechunk geometry, the byte limiter, send
buffers, the spilling receive store, runs and their manager), ``wire/`` (the message
codec and the pieces it carries) and ``_transport/`` import neither Ray nor the GPU
libraries, and neither does this package's import; ``device/`` imports CuPy, RMM and
cuDF on first use only; only ``_transport/ucx.py`` imports ucxx. The Ray shell,
``shell/``, is imported from its modules: ``shuffle.shell._service``
(``ShuffleService``, driver side), ``shuffle.shell._transfer`` (``transfer``, run by
transfer tasks), ``shuffle.shell._handle`` (``RunHandle``), ``shuffle.shell._actor``
(``ShuffleActor``) and ``shuffle.shell._client`` (the per-process sender).
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
