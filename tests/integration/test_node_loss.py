"""A node removed mid-shuffle from a 3-node ``ray.cluster_utils.Cluster``.

Its shuffle actor dies with it while Ray still reports the node alive for some
seconds. The shuffle restarts on the two surviving nodes (the partitions that lived
on the removed node are recomputed through Ray's lineage) and gives pandas' result,
or, with no restarts allowed, fails with ``ShuffleActorLostError`` naming the node.

The removal happens once the node's actor has received messages of the shuffle:
the task computing one input partition signals that, then holds its partition back
until the node is gone, so the old run cannot complete whatever the timing. Each
scenario runs in a subprocess (one process holds one Ray connection, and the test
session's is in use).
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest

ray = pytest.importorskip("ray")

import ray_oob_sched
from tests.conftest import run_scenario, scenario_cluster
from tests.integration.p2p_support import WAIT, configured_service, run_infos

pytestmark = [pytest.mark.ray, pytest.mark.slow]

NPARTS = 8
ROWS = 4_000


def _messages(actor: Any) -> int:
    return sum(i.stats.messages_received for i in ray.get(actor.runs.remote(), timeout=WAIT))


def _wait_for(condition: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {WAIT:g} s"
        time.sleep(0.05)


def hold_until_removed(
    df: pd.DataFrame, *, actor: Any, first_row: int, ready: str, removed: str
) -> pd.DataFrame:
    """In the partition holding ``first_row``: once ``actor`` received a message, say
    so (``ready``) and return only after the driver removed its node (``removed``).
    A retry (this task ran on the removed node) or a rerun after the restart passes."""
    if first_row not in df.index or Path(removed).exists():
        return df
    _wait_for(lambda: _messages(actor) >= 1, "the victim's actor received nothing")
    Path(ready).write_text("ready")
    _wait_for(lambda: Path(removed).exists(), "the node was not removed")
    return df


def _remove_when_ready(cluster: Any, node: Any, ready: Path, removed: Path, at: list) -> None:
    """A crash of ``node``: its raylet and every worker it started die at once (Ray
    learns of it late; removing the node alone lets workers outlive their raylet)."""
    import psutil
    from ray._private import ray_constants

    _wait_for(ready.exists, "no input partition reached the victim's actor")
    (raylet,) = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET]
    workers = psutil.Process(raylet.process.pid).children(recursive=True)
    cluster.remove_node(node, allow_graceful=False)
    for worker in workers:
        with contextlib.suppress(psutil.NoSuchProcess):
            worker.kill()
    at.append(time.monotonic())
    removed.write_text("removed")


def node_loss_scenario(max_restarts: int, transport: str) -> None:
    """Run in a subprocess by the tests below; raises on any failure."""
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import it
    with scenario_cluster(head_cpus=1, node_cpus=[1, 1]) as (cluster, workers):
        rng = np.random.default_rng(7)
        pdf = pd.DataFrame({"k": rng.integers(0, 50, ROWS), "v": rng.normal(size=ROWS)})
        ddf = dd.from_pandas(pdf, npartitions=NPARTS)
        config = {
            "dataframe.shuffle.method": "p2p",
            "ray-oob-sched.scheduler.fuse.max-tasks": 2,
            "ray-oob-sched.shuffle.max-restarts": max_restarts,
        }
        with tempfile.TemporaryDirectory() as tmp, ray_oob_sched.enable():
            (Path(tmp) / "spill").mkdir()
            with (
                dask.config.set(config),
                configured_service(
                    Path(tmp) / "spill", actors_per_node=1, transport=transport
                ) as oob,
            ):
                victim_node = workers[1]
                (victim,) = [a for a in oob.service.actors() if a.node_id == victim_node.node_id]
                ready, removed = Path(tmp) / "ready", Path(tmp) / "removed"
                doomed = ddf.map_partitions(
                    hold_until_removed,
                    actor=victim.handle,
                    first_row=ddf.divisions[NPARTS - 1],
                    ready=str(ready),
                    removed=str(removed),
                    meta=ddf._meta,
                )
                at: list[float] = []
                remover = threading.Thread(
                    target=_remove_when_ready, args=(cluster, victim_node, ready, removed, at)
                )
                remover.start()
                try:
                    try:
                        got = doomed.shuffle("k", npartitions=5).compute()
                        outcome: Any = got
                    except ray_oob_sched.ShuffleActorLostError as e:
                        outcome = e
                    took = time.monotonic() - at[0]
                finally:
                    remover.join(WAIT)
                survivors = {a.node_id for a in oob.service.actors()}
                assert victim_node.node_id not in survivors and len(survivors) == 2, survivors
                # Lost while Ray still reported it alive (else it simply left).
                assert oob.service.lost_nodes <= {victim_node.node_id}
                if max_restarts:
                    assert isinstance(outcome, pd.DataFrame), repr(outcome)
                    assert ray_oob_sched.last_stats().restarts == 1
                    pd.testing.assert_frame_equal(
                        outcome.sort_values(["k", "v"]).reset_index(drop=True),
                        pdf.sort_values(["k", "v"]).reset_index(drop=True),
                    )
                else:
                    assert isinstance(outcome, ray_oob_sched.ShuffleActorLostError), outcome
                    assert outcome.actors == (victim.name,)
                    assert outcome.nodes == (victim_node.node_id,)
                    assert victim_node.node_id in str(outcome) and victim.name in str(outcome)
                    del outcome
                assert oob.service.open_runs() == [] and run_infos(oob.service) == []
        print(
            f"node loss OK: max-restarts={max_restarts}, transport {transport}, "
            f"{took:.1f} s from removal to outcome, "
            f"lost before Ray reported it dead: {bool(oob.service.lost_nodes)}",
            flush=True,
        )


# Each outcome on one transport: the loss shows the same way on both (a dead address).
@pytest.mark.parametrize("max_restarts, transport", [(1, "auto"), (0, "tcp")])
def test_node_removed_mid_shuffle(max_restarts: int, transport: str) -> None:
    stdout = run_scenario(
        "tests.integration.test_node_loss",
        f"node_loss_scenario({max_restarts}, {transport!r})",
        timeout=300,
    )
    (line,) = [line for line in stdout.splitlines() if "node loss OK" in line]
    print(line)  # the time from removal to outcome, shown under pytest -s
