"""Run ``async def`` tests in a fresh event loop each, without a pytest plugin; the
fixtures several shuffle test modules share."""

from __future__ import annotations

import asyncio
import inspect
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


@pytest.fixture
def fake_cupy(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    cupy = make_fake_cupy()
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    return cupy
