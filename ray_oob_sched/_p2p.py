"""The one place that knows how dask and distributed lay out peer-to-peer graphs.

dask emits transfer -> barrier -> unpack graphs for ``shuffle_method="p2p"``
(dataframe shuffle, merge, set_index, sort_values) and ``method="p2p"`` rechunks.
Their barrier is a ``distributed.shuffle._core.P2PBarrierTask``, recognised here by
class, not by key names. Their task functions call into a distributed worker, so
they cannot run as plain Ray tasks; until they run through the out-of-band
shuffle service (``shuffle/``), such graphs are refused before anything runs,
never silently run another way.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

Key = Hashable


class UnsupportedGraphError(ValueError):
    """The graph contains a shape that ray_oob_sched cannot run (yet)."""


def _barrier_class() -> type | None:
    try:
        from distributed.shuffle._core import P2PBarrierTask
    except ImportError:  # no distributed: dask cannot build p2p graphs either
        return None
    return P2PBarrierTask


def p2p_barriers(nodes: Mapping[Key, Any]) -> list[Key]:
    """Keys of the p2p barrier tasks in a task-spec graph."""
    cls = _barrier_class()
    if cls is None:
        return []
    return [k for k, node in nodes.items() if isinstance(node, cls)]


def refuse_p2p(nodes: Mapping[Key, Any]) -> None:
    barriers = p2p_barriers(nodes)
    if barriers:
        import dask
        import distributed

        raise UnsupportedGraphError(
            f"the graph holds {len(barriers)} peer-to-peer shuffle/rechunk "
            f"barrier(s) (e.g. {barriers[0]!r}; dask {dask.__version__}, distributed "
            f"{distributed.__version__}), which ray_oob_sched cannot run yet: use "
            "shuffle_method='tasks' (dataframes) or method='tasks' (rechunk), which "
            "ray_oob_sched.enable() selects by default"
        )
