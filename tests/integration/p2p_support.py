"""Driver-side helpers for the p2p shuffle integration tests (no Ray worker runs these).

``configured_service`` gives a fresh shuffle service with test settings (the service
reads dask config once, when it starts); ``RunsAtFinish`` records the actors' open
runs at the end of a compute, just before ray_oob_sched closes them, which is the
only moment a test can see what a run received and spilled; ``assert_clean`` is
the cleanup assertion every test ends with. ``oob_fixtures`` makes the fixture pair
of a module that shares one configured service between its tests.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import pytest
import ray
from dask.callbacks import Callback

import ray_oob_sched
from tests.integration.conftest import driver_refs

WAIT = 60.0  # bound on every ray.get of an actor call


@dataclass(frozen=True)
class OOB:
    """The shuffle service a test module runs against, and its spill directory."""

    service: Any  # shuffle.shell._service.ShuffleService
    spill: Path


@contextlib.contextmanager
def configured_service(spill: Path, **settings: Any) -> Iterator[OOB]:
    """A fresh shuffle service spilling into ``spill``, under ``ray-oob-sched.shuffle.*``
    ``settings`` (underscores for dashes); the previous service is stopped first, and
    this one when the block ends, so that the settings apply to this block only."""
    config = {f"ray-oob-sched.shuffle.{k.replace('_', '-')}": v for k, v in settings.items()}
    config["ray-oob-sched.shuffle.spill-directory"] = str(spill)
    # Stops the service only: the session's Ray was not started by ray_oob_sched.
    assert ray_oob_sched.shutdown() is False
    try:
        with dask.config.set(config):
            service = ray_oob_sched._schedule.shuffle_service()
            service.actors()  # start them now, not inside the first test
            yield OOB(service, spill)
    finally:
        ray_oob_sched.shutdown()
    assert list(spill.iterdir()) == [], "spill files left after the service closed"


def run_infos(service: Any) -> list[Any]:
    """Every open run on every actor (``shuffle.shell._actor.RunInfo``)."""
    refs = [a.handle.runs.remote() for a in service.actors()]
    return [info for infos in ray.get(refs, timeout=WAIT) for info in infos]


def spilled_bytes(spill: Path) -> int:
    return sum(p.stat().st_size for p in spill.rglob("*") if p.is_file())


class RunsAtFinish(Callback):
    """Record the open runs and the bytes in the spill directory when a compute ends.

    dask calls ``finish`` from ray_oob_sched's compute loop, after the last task and
    before the compute closes its shuffle runs.
    """

    def __init__(self, oob: OOB) -> None:
        super().__init__()
        self.oob = oob
        self.infos: list[Any] | None = None
        self.spilled: int | None = None

    def _finish(self, dsk: Any, state: Any, errored: bool) -> None:
        self.infos = run_infos(self.oob.service)
        self.spilled = spilled_bytes(self.oob.spill)


@contextlib.contextmanager
def cleanup_checked(oob: OOB) -> Iterator[None]:
    """Assert that the block leaves no open run, no spill file and no driver ref."""
    gc.collect()
    before = driver_refs(ray)
    yield
    gc.collect()
    assert ray_oob_sched._schedule._shuffle_service is oob.service, "the service was replaced"
    assert oob.service.open_runs() == [], "shuffle runs left open on the driver"
    assert run_infos(oob.service) == [], "shuffle runs left open on the actors"
    assert list(oob.spill.iterdir()) == [], "spill files left behind"
    left = driver_refs(ray) - before
    assert not left, f"{len(left)} object references left on the driver"


def oob_fixtures(name: str, **settings: Any) -> tuple[Any, Any]:
    """``(module_oob, oob)``: one service with ``settings`` for the whole module, and
    per test that service with the cleanup check. Bind both in the test module under
    these names, so that pytest finds them."""

    @pytest.fixture(scope="module")
    def module_oob(ray_session: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OOB]:
        with configured_service(tmp_path_factory.mktemp(f"{name}-spill"), **settings) as oob:
            yield oob

    @pytest.fixture
    def oob(ray_get: Any, module_oob: OOB) -> Iterator[OOB]:
        with cleanup_checked(module_oob):
            yield module_oob

    return module_oob, oob
