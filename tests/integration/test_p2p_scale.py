"""p2p shuffles through ``enable()`` at the edges: many partitions, more data than budget.

- A 64 x 64 shuffle costs O(N + M) Ray tasks, actor calls and messages, not N x M,
  and its transfer tasks join their inputs into fewer pieces.
- A shuffle of 4x an actor's memory budget (``ray-oob-sched.shuffle.memory-limit``)
  completes, really spills (the spill files are counted while the run is open), and
  leaves no spill file behind.

The cluster-wide count with ``ray.util.state`` runs on a fresh cluster, in
``test_p2p_multinode.py``; here the session's Ray counts through ``last_stats()`` and
the actors' own run statistics.
"""

from __future__ import annotations

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest

import ray_oob_sched
from tests.integration.p2p_support import (
    OOB,
    RunsAtFinish,
    oob_fixtures,
)

pytestmark = pytest.mark.ray

BUDGET = 64 * 2**10  # bytes an actor keeps in memory per run
MESSAGE_BYTES = 16 * 2**10  # pieces are batched into messages of about this size


# One actor: the tests read its run's statistics and its budget as the node's.
module_oob, oob = oob_fixtures(
    "p2p-scale", memory_limit=BUDGET, message_bytes=MESSAGE_BYTES, actors_per_node=1
)


def frame(rows: int, *, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "k": rng.integers(0, 10_000, rows),
            "v": rng.random(rows),
            "s": pd.array(rng.choice(["ab", "cde", None], rows), dtype="string[pyarrow]"),
        }
    )


def test_64_by_64_shuffle_costs_o_of_n_plus_m_tasks_and_calls(oob: OOB) -> None:
    n = m = 64
    pdf = frame(64 * 40)
    ddf = dd.from_pandas(pdf, npartitions=n)
    with RunsAtFinish(oob) as probe:
        got = ddf.shuffle("k", npartitions=m).map_partitions(len).compute()
    stats = ray_oob_sched.last_stats()
    assert stats.shuffles == 1 and got.sum() == len(pdf) and len(got) == m
    # Ray tasks and actor calls the scheduler submitted: transfers (fused with their
    # inputs), one barrier, unpack calls (one per output at most, batched per actor),
    # the per-output len and a sum.
    assert stats.ray_tasks <= 3 * (n + m) + 8, stats
    (info,) = probe.infos  # one node, one actor
    assert info.stats.outputs_read == m  # every output partition read once
    # A transfer task sends the inputs it computed joined (shuffle._combine): on the
    # session's 2 CPUs fusion puts several in each, so there are far fewer pieces than
    # (input, output) pairs, and about one message per task and MESSAGE_BYTES.
    assert m <= info.stats.shards_received <= n * m // 4
    assert info.stats.messages_received <= n + info.stats.bytes_received // MESSAGE_BYTES


def test_shuffle_of_four_times_the_budget_spills_and_cleans_up(oob: OOB) -> None:
    pdf = frame(12_000, seed=1)
    ddf = dd.from_pandas(pdf, npartitions=8)
    with RunsAtFinish(oob) as probe:
        got = ddf.shuffle("k", npartitions=5).compute()
    pd.testing.assert_frame_equal(got.sort_index(), pdf)
    (info,) = probe.infos
    stored = info.stats.bytes_received  # every piece arrives in a message
    assert stored >= 4 * BUDGET, "the test data must exceed the budget"
    assert info.spill_directory is not None
    # Memory never holds more than the budget, so the rest went to disk (spill files
    # are deleted as their outputs are read, so the run's totals tell).
    (run,) = ray_oob_sched.last_stats().shuffle_runs
    assert run.bytes_spilled >= stored - BUDGET
    assert run.bytes_read_back == run.bytes_spilled
    # cleanup_checked: the spill directory is empty once the compute returned.
