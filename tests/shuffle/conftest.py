"""Run ``async def`` tests in a fresh event loop each, without a pytest plugin; the
fixtures several shuffle test modules share."""

from __future__ import annotations

import asyncio
import inspect
import os
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.shuffle.support import make_fake_cupy


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    kwargs = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
    asyncio.run(pyfuncitem.obj(**kwargs))
    return True


@pytest.fixture
def spill_root(tmp_path: Path) -> Iterator[Path]:
    """Where runs and stores spill; every test must leave it empty."""
    yield tmp_path
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def loopback_only() -> Iterator[None]:
    """Loopback only: keep UCX's TCP lanes off every other interface (read when UCX starts).

    For one module's tests (``usefixtures``). Set at import time, it leaked into every
    process started later in the session (the session's Ray and its workers), where UCX
    could then not reach the node addresses the shuffle actors advertise.
    """
    with pytest.MonkeyPatch.context() as patch:
        if "UCX_NET_DEVICES" not in os.environ:
            patch.setenv("UCX_NET_DEVICES", "lo")
        yield


@pytest.fixture
def fake_cupy(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    cupy = make_fake_cupy()
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    return cupy
