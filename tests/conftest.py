from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

# One Ray for the whole session: starting Ray costs ~5 s on a 2-core machine.
# Bounded object store (the lifetime tests rely on it being small) and a dashboard,
# because ray.util.state (object and task listings) is served by it.
OBJECT_STORE_BYTES = 128 * 2**20


@pytest.fixture(scope="session")
def ray_session():
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        yield ray
        return
    init_test_ray(object_store_memory=OBJECT_STORE_BYTES, include_dashboard=True)
    try:
        yield ray
    finally:
        ray.shutdown()


def init_test_ray(*, object_store_memory: int, include_dashboard: bool) -> None:
    """Start the embedded Ray of a test session (also the conformance runner's): 2 CPUs,
    a bounded object store, quiet."""
    import ray

    ray.init(
        address="local",  # a Ray of its own, even where `ray start` runs a cluster
        num_cpus=2,
        object_store_memory=object_store_memory,
        include_dashboard=include_dashboard,
        log_to_driver=False,
        configure_logging=False,
    )


def pytest_collection_modifyitems(items):
    """Ship test modules' functions to Ray workers by value.

    Workers cannot import test modules (they are not on their path), and module-
    level helpers in them are otherwise pickled by reference.
    """
    try:
        from ray import cloudpickle
    except ImportError:
        return
    for module in {item.module for item in items if getattr(item, "module", None)}:
        cloudpickle.register_pickle_by_value(module)


def assert_dies(actor: object, *, wait: float) -> None:
    """Wait (bounded by ``wait`` seconds) until calls to ``actor`` fail: ``ray.kill``
    takes effect asynchronously, so a call made just after it may still be answered."""
    import ray

    deadline = time.monotonic() + wait
    while True:
        try:
            ray.get(actor.runs.remote(), timeout=wait)  # type: ignore[attr-defined]
        except ray.exceptions.RayActorError:
            return
        assert time.monotonic() < deadline, f"{actor} is still alive {wait:g} s after close"
        time.sleep(0.1)


def run_scenario(module: str, call: str, *, timeout: float) -> str:
    """Run ``module.call`` in a fresh Python from the repository root; return its stdout.

    For scenarios that start their own (multi-node) Ray cluster: a separate process keeps
    it apart from the session's Ray, and RAY_ADDRESS is dropped so that it does not join
    another. Fails with the tails of both outputs if the process fails.
    """
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-c", f"import {module} as m; m.{call}"],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=root,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def scenario_cluster(
    *, head_cpus: int, node_cpus: Sequence[int], dashboard: bool = False
) -> Iterator[tuple[Any, list[Any]]]:
    """A multi-node Ray on this machine (``ray.cluster_utils.Cluster``), connected to and
    shut down on leaving; for scenarios run by ``run_scenario``. Every node has an 80 MiB
    object store; with ``dashboard``, the head serves ``ray.util.state``. Yields the
    cluster and the nodes added to its head (one per ``node_cpus`` entry)."""
    import ray
    from ray.cluster_utils import Cluster

    store = 80 * 2**20
    head: dict[str, Any] = {
        "num_cpus": head_cpus,
        "object_store_memory": store,
        "include_dashboard": dashboard,
    }
    if dashboard:
        head["dashboard_port"] = _free_port()  # not 8265: other Rays may run on this machine
    cluster = Cluster(initialize_head=True, head_node_args=head)
    try:
        nodes = [cluster.add_node(num_cpus=n, object_store_memory=store) for n in node_cpus]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        yield cluster, nodes
    finally:
        ray.shutdown()
        cluster.shutdown()
