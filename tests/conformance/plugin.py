"""pytest plugin of the conformance runner: routes dask's computes per ``--conformance-mode``.

- ``sync``: dask's synchronous scheduler (``scheduler="sync"``), the reference.
- ``ray``: ``ray_oob_sched.enable()`` for the whole session, on one embedded Ray
  (2 CPUs, bounded object store) started here and shut down at the end.
- ``distributed``: a ``distributed.LocalCluster`` (2 worker processes, 1 thread
  each) whose ``Client`` is the default scheduler.

A test that names a scheduler itself (``compute(scheduler="sync")``,
``dask.config.set(scheduler=...)``) gets the one it named in every mode: it tests
that scheduler, and rerouting it would change what it checks.
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


def pytest_configure(config: pytest.Config) -> None:
    import dask

    mode = config.getoption("--conformance-mode")
    if mode == "sync":
        _state["config"] = dask.config.set(scheduler="sync")
    elif mode == "ray":
        import ray

        import ray_oob_sched

        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(
            num_cpus=2,
            object_store_memory=OBJECT_STORE_BYTES,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
        _state["ray"] = ray
        _state["config"] = ray_oob_sched.enable()
    else:
        from distributed import Client, LocalCluster

        cluster = LocalCluster(  # type: ignore[no-untyped-call]
            n_workers=2, threads_per_worker=1, dashboard_address=None, memory_limit="2GiB"
        )
        _state["cluster"] = cluster
        _state["client"] = Client(cluster, set_as_default=True)  # type: ignore[no-untyped-call]


def pytest_unconfigure(config: pytest.Config) -> None:
    if "config" in _state:
        _state.pop("config").__exit__(None, None, None)
    if "client" in _state:
        _state.pop("client").close()
        _state.pop("cluster").close()
    if "ray" in _state:
        import ray_oob_sched

        ray_oob_sched.shutdown()
        _state.pop("ray").shutdown()
