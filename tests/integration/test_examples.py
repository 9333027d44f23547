"""The example scripts users copy from, each run at a small size as a user runs it.

Each runs in its own process with an embedded Ray (bounded: 2 CPUs, 128 MiB object
store), checks its results itself and exits non-zero when one is wrong.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run_example(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env |= {
        "RAY_USAGE_STATS_ENABLED": "0",
        "DASK_RAY_OOB_SCHED__INIT__NUM_CPUS": "2",
        "DASK_RAY_OOB_SCHED__INIT__OBJECT_STORE_MEMORY": str(128 * 2**20),
        "DASK_RAY_OOB_SCHED__INIT__LOG_TO_DRIVER": "false",
    }
    return subprocess.run(
        [sys.executable, str(EXAMPLES / args[0]), *args[1:]],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def assert_ran(out: subprocess.CompletedProcess[str], *expected: str) -> None:
    assert out.returncode == 0, f"{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    assert "WRONG" not in out.stdout
    for text in expected:
        assert text in out.stdout, out.stdout


def test_etl_dataframe(tmp_path):
    out = run_example("etl_dataframe.py", "--size", "40000", "--partitions", "8",
                      "--out", str(tmp_path))  # fmt: skip
    assert_ran(
        out,
        "ETL of 40,000 orders x 2,000 customers",
        "merge: the joined rows                       correct",
        "groupby(region, day) with split_out          correct",
        "sort_values(amount), Parquet round trip      correct",
    )
    shuffles = re.search(r" s in (\d+) out-of-band shuffles", out.stdout)
    assert shuffles is not None and int(shuffles.group(1)) >= 2, out.stdout
    assert list(tmp_path.glob("orders_by_amount.parquet/*.parquet"))


def test_climate_rechunk(tmp_path, monkeypatch):
    # At this size the plan is small enough for plain tasks: ask for the actors.
    monkeypatch.setenv("DASK_RAY_OOB_SCHED__SHUFFLE__RECHUNK_TASKS_MAX_PIECES", "0")
    out = run_example("climate_rechunk.py", "--size", "48", "--out", str(tmp_path))
    assert_ran(
        out,
        "cube of 48 days x 180 x 360",
        "1 out-of-band rechunk(s)",
        "per-pixel mean and p90, Zarr round trip      correct",
    )
    assert (tmp_path / "pixel_stats.zarr").is_dir()


def test_cluster_example_on_an_embedded_ray_when_asked():
    out = run_example("cluster.py", "--local", "--size", "50000", "--transport", "tcp")
    assert_ran(out, "connected to an embedded local Ray: 1 node(s)", "1 out-of-band shuffle(s)")
    assert out.stdout.count("correct") == 2


def test_cluster_example_refuses_to_start_a_ray_unasked():
    out = run_example("cluster.py", "--size", "1000")
    assert out.returncode != 0
    assert "no cluster given: set RAY_ADDRESS" in out.stderr
    out = run_example("cluster.py", "--address", "ray://head:10001")
    assert out.returncode != 0
    assert "Ray Client address" in out.stderr
