"""dask's disk shuffles through ``enable()`` on a 3-node ``ray.cluster_utils.Cluster``.

The head has no CPUs (as clusters often configure it), two nodes have one each. A
dataframe disk shuffle and a bag disk groupby match dask's sync scheduler, every
task that creates, appends to or reads a partd store ran on one node, a node with
CPUs (listed with ``ray.util.state``), and no ``*.partd`` directory is left.

The scenario runs in a subprocess: one process can hold only one Ray connection,
and the test session's is in use.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import dask
import dask.bag as db
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest

ray = pytest.importorskip("ray")

import ray_oob_sched
from tests.conftest import run_scenario, scenario_cluster

pytestmark = pytest.mark.ray

WAIT = 60.0
#: Names of the Ray tasks that create, fill or read a partd store (a task is named
#: after its first dask key; such tasks are never fused with others).
STORE_TASKS = ("('zpartd-", "('shuffle-partition-", "('diskshuffle-", "('partd-", "('groupby-")


def store_task_nodes(address: str, before: set[str]) -> dict[str, set[str]]:
    """Task name prefix -> nodes of the finished store tasks not in ``before``."""
    from ray.util.state import list_tasks

    job = ray.get_runtime_context().get_job_id()
    found = list_tasks(
        address=address,
        filters=[("job_id", "=", job)],
        limit=10_000,
        timeout=30,
        raise_on_missing_output=False,
    )
    out: dict[str, set[str]] = {}
    for t in found:
        prefix = next((p for p in STORE_TASKS if t.name.startswith(p)), None)
        if prefix is not None and t.task_id not in before and t.state == "FINISHED":
            out.setdefault(prefix, set()).add(t.node_id)
    return out


def check(address: str, tmp: Path, cpu_nodes: set[str]) -> None:
    rng = np.random.default_rng(0)
    pdf = pd.DataFrame({"k": rng.integers(0, 40, 2_000), "v": np.arange(2_000.0)})
    df = dd.from_pandas(pdf, npartitions=8)
    got = df.shuffle("k", shuffle_method="disk", npartitions=5).compute()
    pd.testing.assert_frame_equal(got.sort_index(), pdf)
    bag = db.from_sequence(range(500), npartitions=6).groupby(lambda x: x % 11, shuffle="disk")
    got_bag = sorted((k, sorted(v)) for k, v in bag.compute())
    assert got_bag == sorted((k, sorted(v)) for k, v in bag.compute(scheduler="sync"))
    assert list(tmp.glob("*.partd")) == []
    # Task events reach the state API within about a second: wait (bounded) until
    # both shuffles' store tasks are listed.
    deadline = time.monotonic() + WAIT
    while True:
        nodes = store_task_nodes(address, set())
        if len(nodes) == len(STORE_TASKS):
            break
        assert time.monotonic() < deadline, f"store tasks listed: {nodes}"
        time.sleep(0.5)
    used = set().union(*nodes.values())
    # Each compute chooses its node; with equal nodes both pick the same one.
    assert len(used) == 1 and used <= cpu_nodes, nodes


def scenario() -> None:
    """Run in a subprocess by ``test_disk_shuffle_on_one_node``; raises on failure."""
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import it
    # The dashboard serves ray.util.state.
    with scenario_cluster(head_cpus=0, node_cpus=[1, 1], dashboard=True) as (cluster, nodes):
        cpu_nodes = {node.node_id for node in nodes}
        with tempfile.TemporaryDirectory() as tmp, ray_oob_sched.enable():
            with dask.config.set(temporary_directory=tmp):
                check(cluster.address, Path(tmp), cpu_nodes)
        print("disk shuffles on one node OK", flush=True)


def test_disk_shuffle_on_one_node() -> None:
    stdout = run_scenario("tests.integration.test_disk_multinode", "scenario()", timeout=240)
    assert "disk shuffles on one node OK" in stdout
