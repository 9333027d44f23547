"""pytest plugin of the conformance runner: routes dask's computes per ``--conformance-mode``.

- ``sync``: dask's synchronous scheduler (``scheduler="sync"``), the reference.
- ``ray``: ``ray_oob_sched.enable()`` for the whole session, on one embedded Ray
  (2 CPUs, bounded object store) started here and shut down at the end.
- ``distributed``: a ``distributed.LocalCluster`` (2 worker processes, 1 thread
  each) whose ``Client`` is the default scheduler.

A test that names a local scheduler (``compute(scheduler="sync")``,
``dask.config.set(scheduler="threads")``) gets the mode's scheduler instead: dask's
``assert_eq`` computes with ``scheduler="sync"``, so most of dask's tests would
otherwise never reach the scheduler under test. The harness (not the library) points
every name of ``dask.base.named_schedulers`` at the mode's ``get`` for the session.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

MODES = ("sync", "ray", "distributed")
#: The embedded Ray's object store: bounded, as in the project's own Ray tests.
OBJECT_STORE_BYTES = 512 * 2**20

_state: dict[str, Any] = {}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--conformance-mode", choices=MODES, required=True, help="where dask's computes run"
    )
    parser.addoption(
        "--conformance-progress",
        default=None,
        help="file that names the test running now (empty between tests): after a crash, "
        "the test that crashed the process",
    )


def _progress(config: pytest.Config, nodeid: str) -> None:
    path = config.getoption("--conformance-progress")
    if path:
        with open(path, "w") as f:
            f.write(nodeid)


@pytest.hookimpl
def pytest_runtest_logstart(nodeid: str, location: Any) -> None:
    _progress(_state["pytest_config"], nodeid)


@pytest.hookimpl
def pytest_runtest_logfinish(nodeid: str, location: Any) -> None:
    _progress(_state["pytest_config"], "")


def pytest_configure(config: pytest.Config) -> None:
    import dask

    _state["pytest_config"] = config
    mode = config.getoption("--conformance-mode")
    if mode == "sync":
        _state["config"] = dask.config.set(scheduler="sync")
    elif mode == "ray":
        import ray

        import ray_oob_sched
        from tests.conftest import init_test_ray

        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        init_test_ray(object_store_memory=OBJECT_STORE_BYTES, include_dashboard=False)
        _state["ray"] = ray
        _state["config"] = ray_oob_sched.enable()
    else:
        from distributed import Client, LocalCluster

        cluster = LocalCluster(  # type: ignore[no-untyped-call]
            n_workers=2, threads_per_worker=1, dashboard_address=None, memory_limit="2GiB"
        )
        _state["cluster"] = cluster
        _state["client"] = Client(cluster, set_as_default=True)  # type: ignore[no-untyped-call]
    _route_named_schedulers(_mode_get(mode))


def _mode_get(mode: str) -> Any:
    if mode == "sync":
        from dask.local import get_sync

        return get_sync
    if mode == "ray":
        import ray_oob_sched

        return ray_oob_sched.get
    return _state["client"].get


def _route_named_schedulers(get: Any) -> None:
    from dask.base import named_schedulers

    _state["named"] = dict(named_schedulers)
    for name in named_schedulers:
        named_schedulers[name] = get


def pytest_unconfigure(config: pytest.Config) -> None:
    if "named" in _state:
        from dask.base import named_schedulers

        named_schedulers.update(_state.pop("named"))
    if "config" in _state:
        _state.pop("config").__exit__(None, None, None)
    if "client" in _state:
        _state.pop("client").close()
        _state.pop("cluster").close()
    if "ray" in _state:
        import ray_oob_sched

        ray_oob_sched.shutdown()
        _state.pop("ray").shutdown()
