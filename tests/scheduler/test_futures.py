"""Tier 1: the registry of persisted futures and the result shape (no Ray)."""

from __future__ import annotations

import gc
import pickle

import pytest
from dask.tokenize import tokenize

from ray_oob_sched._futures import FutureRegistry, RayFuture
from ray_oob_sched._plugin import _nested


def test_lookup_follows_live_futures_and_forgets_dead_keys():
    reg = FutureRegistry()
    a1 = reg.register(RayFuture("a", "ref-a1"))
    a2 = reg.register(RayFuture("a", "ref-a2"))
    reg.register(RayFuture("b", "ref-b"))  # dropped at once
    gc.collect()
    assert reg.lookup("b") is None
    assert len(reg) == 1
    assert reg.lookup("a") in {"ref-a1", "ref-a2"}
    del a1
    gc.collect()
    assert reg.lookup("a") == "ref-a2"  # an older, still live future keeps the key
    del a2
    gc.collect()
    assert reg.lookup("a") is None and len(reg) == 0


def test_future_follows_dasks_future_protocol():
    f = RayFuture(("x", 1), "ref")
    assert f.__dask_future__ is True and f.key == ("x", 1)
    assert tokenize(f) == tokenize(RayFuture(("x", 1), "other-ref"))
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(f)


def test_nested_result_shape_matches_dask_local():
    values = {"a": 1, "b": 2}
    assert _nested("a", values) == 1
    assert _nested(["a", ["b", "a"], []], values) == (1, (2, 1), ())
