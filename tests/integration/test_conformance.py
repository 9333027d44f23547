"""dask's conformance suite for `get` functions, with and without task fusion."""

from __future__ import annotations

import dask
import pytest
from dask.utils_test import GetFunctionTestMixin

import ray_oob_sched


@pytest.fixture(autouse=True, params=[True, False], ids=["fused", "unfused"])
def _ray(request, ray_session):
    with dask.config.set({"ray-oob-sched.scheduler.fuse.enabled": request.param}):
        yield


class TestGetFunction(GetFunctionTestMixin):
    get = staticmethod(ray_oob_sched.get)
