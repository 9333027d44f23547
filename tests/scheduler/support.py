"""Helpers shared by the scheduler's pure tests (no Ray)."""

from __future__ import annotations

from typing import Any

import dask
import pytest

from ray_oob_sched import _graph


class _Stop(Exception):
    pass


def graph_of(*collections: Any) -> _graph.Graph:
    """The graph and keys that ``get`` receives from a persist of ``collections``."""
    seen: dict[str, Any] = {}

    def record(dsk: Any, keys: Any, **kwargs: Any) -> None:
        seen["nodes"], _ = _graph.materialize(dsk)
        seen["keys"] = keys
        raise _Stop

    with pytest.raises(_Stop):
        dask.persist(*collections, scheduler=record)
    return _graph.build(seen["nodes"], seen["keys"])
