"""p2p shuffles through ``enable()`` on a 3-node ``ray.cluster_utils.Cluster``.

Three raylets with their own object stores (1 CPU, 80 MiB each) and
``ACTORS_PER_NODE`` shuffle actors on each (set explicitly, not from the CPUs): a
shuffle and a hash merge match pandas, every actor receives and spills
its share, a 64 x 64 shuffle runs O(N + M) Ray tasks and actor calls cluster-wide
(counted with ``ray.util.state``), and nothing is left afterwards (no run, spill file
or driver reference; the actors die with the service).

The scenario runs in a subprocess: one process can hold only one Ray connection,
and the test session's is in use.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest

ray = pytest.importorskip("ray")

import ray_oob_sched
from tests.conftest import assert_dies, run_scenario, scenario_cluster
from tests.integration.p2p_support import (
    OOB,
    WAIT,
    RunsAtFinish,
    cleanup_checked,
    configured_service,
)

pytestmark = pytest.mark.ray

NODES = 3
ACTORS_PER_NODE = 2
ACTORS = NODES * ACTORS_PER_NODE


def frames(seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    rows = 3_000
    left = pd.DataFrame(
        {
            "k": rng.integers(0, 60, rows),
            "v": rng.permutation(rows) / rows,
            "s": pd.array(rng.choice(["a", "bb", None], rows), dtype="string[pyarrow]"),
            "t": pd.date_range("2026-01-05", periods=rows, freq="min", tz="Asia/Tokyo"),
        }
    )
    right = pd.DataFrame(
        {
            "k": np.arange(70),
            "w": pd.array(np.where(np.arange(70) % 9 == 0, None, np.arange(70)), dtype="Int64"),
            "c": pd.Categorical(rng.choice(["lo", "hi"], 70)),
        }
    )
    return left, right


def check_actors(oob: OOB) -> None:
    actors = oob.service.actors()
    nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
    assert len(nodes) == NODES, nodes
    # By node, then index: each node's actors are adjacent in every run's participants.
    expected = [(n, i) for n in nodes for i in range(ACTORS_PER_NODE)]
    assert [(a.node_id, a.index) for a in actors] == expected, actors
    assert len({a.name for a in actors}) == ACTORS
    placed = ray.get([a.handle.node_id.remote() for a in actors], timeout=WAIT)
    assert placed == [a.node_id for a in actors]  # each actor runs where it is pinned


def check_task_counts(oob: OOB, address: str) -> str:
    """A 64 x 64 shuffle: O(N + M) tasks and actor calls in the whole cluster."""
    from ray.util.state import list_tasks

    n = m = 64
    job = ray.get_runtime_context().get_job_id()

    def tasks() -> list:
        found = list_tasks(
            address=address,  # not "auto": other Rays may run on this machine
            filters=[("job_id", "=", job)],
            limit=10_000,
            timeout=30,
            raise_on_missing_output=False,
        )
        return [t for t in found if t.type != "DRIVER_TASK"]

    before = {(t.task_id, t.attempt_number) for t in tasks()}
    pdf = frames(seed=1)[0].iloc[: n * 20]
    counts = dd.from_pandas(pdf, npartitions=n).shuffle("k", npartitions=m).map_partitions(len)
    assert counts.compute().sum() == len(pdf)
    submitted = ray_oob_sched.last_stats().ray_tasks
    # Task events reach the state API within about a second: wait (bounded) until
    # at least what the scheduler submitted is listed, all of it finished.
    deadline = time.monotonic() + WAIT
    while True:
        new = [t for t in tasks() if (t.task_id, t.attempt_number) not in before]
        unpacks = [t for t in new if t.func_or_class_name.endswith(".unpack")]
        if len(new) >= submitted and all(t.state == "FINISHED" for t in new):
            break
        assert time.monotonic() < deadline, f"{len(new)} of {submitted} tasks listed"
        time.sleep(0.5)
    # Unpacks of one actor go in batches of up to fuse.unpack-batch (8) per call.
    assert -(-m // 8) <= len(unpacks) < m, f"{len(unpacks)} unpack calls for {m} outputs"
    assert len(new) <= 3 * (n + m) + 16, f"{len(new)} Ray tasks and actor calls for 64 x 64"
    return f"64 x 64: {len(new)} Ray tasks and actor calls, {submitted} submitted"


def check_shuffle_and_merge(oob: OOB) -> None:
    left, right = frames()
    dleft = dd.from_pandas(left, npartitions=9)
    dright = dd.from_pandas(right, npartitions=4)

    (shuffled,) = dask.persist(dleft.shuffle("k", npartitions=7))
    parts = [shuffled.partitions[p].compute() for p in range(7)]
    del shuffled
    keys = [set(p.k) for p in parts]
    assert all(not (a & b) for i, a in enumerate(keys) for b in keys[i + 1 :])
    pd.testing.assert_frame_equal(pd.concat(parts).sort_index(), left)

    with RunsAtFinish(oob) as probe:
        merged = dleft.merge(
            dright, on="k", how="left", npartitions=6, shuffle_method="p2p", broadcast=False
        ).compute()
    assert ray_oob_sched.last_stats().shuffles == 2
    expected = left.merge(right, on="k", how="left")
    order = ["k", "v"]
    pd.testing.assert_frame_equal(
        merged.sort_values(order).reset_index(drop=True),
        expected.sort_values(order).reset_index(drop=True),
    )
    infos = probe.infos
    assert infos is not None and len(infos) == 2 * ACTORS  # both sides' runs on every actor
    assert len({i.participant for i in infos}) == ACTORS
    for info in infos:
        # 6 output partitions over the actors, an equal block each.
        assert info.stats.shards_received > 0 and info.stats.outputs_read == 6 // ACTORS
    # More received than the budget must have spilled: the left side's runs.
    big = [i for i in infos if i.stats.bytes_received > SPILL_BUDGET]
    assert len(big) == ACTORS and all(i.spill_directory is not None for i in big)


SPILL_BUDGET = 8 * 2**10


def three_node_scenario() -> None:
    """Run in a subprocess by ``test_three_nodes``; raises on any failure."""
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import it
    # The dashboard serves ray.util.state.
    nodes = [1] * (NODES - 1)
    with scenario_cluster(head_cpus=1, node_cpus=nodes, dashboard=True) as (cluster, _):
        with tempfile.TemporaryDirectory() as tmp, ray_oob_sched.enable():
            spill = Path(tmp)
            with configured_service(
                spill, memory_limit=SPILL_BUDGET, actors_per_node=ACTORS_PER_NODE
            ) as oob:
                with cleanup_checked(oob):
                    check_actors(oob)
                    counts = check_task_counts(oob, cluster.address)
                with cleanup_checked(oob):
                    check_shuffle_and_merge(oob)
                handles = [a.handle for a in oob.service.actors()]
            # configured_service closed the service: its actors are gone.
            for handle in handles:
                assert_dies(handle, wait=WAIT)
        print(f"{NODES} nodes OK; {counts}", flush=True)


def test_three_nodes() -> None:
    stdout = run_scenario(
        "tests.integration.test_p2p_multinode", "three_node_scenario()", timeout=240
    )
    assert f"{NODES} nodes OK" in stdout
