"""Annotations become Ray task options; dask's local callbacks see every task."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap

import dask
import dask.array as da
import numpy as np
import pytest
import ray
from dask.diagnostics import Profiler, ProgressBar

import ray_oob_sched
from ray_oob_sched import InvalidOptionsError


def cpus_assigned(*_):
    return ray.get_runtime_context().get_assigned_resources().get("CPU")


def test_annotation_sets_ray_options_per_key(ray_get):
    plain = dask.delayed(cpus_assigned)(0)
    with dask.annotate(ray_remote_args={"num_cpus": 0.25}):
        light = dask.delayed(cpus_assigned)(1)
    with dask.annotate(resources={"CPU": 0.5}):
        half = dask.delayed(cpus_assigned)(2)
    assert dask.compute(plain, light, half) == (1.0, 0.25, 0.5)


def test_annotations_survive_array_optimisation(ray_get):
    x = da.ones((40, 40), chunks=10)
    with dask.annotate(ray_remote_args={"num_cpus": 0.25}):
        y = x.map_blocks(lambda b: np.full(b.shape, cpus_assigned()), dtype=float)
    z = (y + 1).sum()  # blockwise fusion merges y's layer with unannotated ones
    assert set(np.unique(y.compute())) == {0.25}
    assert z.compute() == pytest.approx(40 * 40 * 1.25)


def test_compute_keyword_applies_to_every_task(ray_get):
    parts = [dask.delayed(cpus_assigned)(i) for i in range(3)]
    assert dask.compute(*parts, ray_remote_args={"num_cpus": 0.5}) == (0.5, 0.5, 0.5)


def test_retries_annotation_retries_failing_tasks(ray_get, tmp_path):
    marker = tmp_path / "attempts"

    def flaky():
        n = int(marker.read_text()) if marker.exists() else 0
        marker.write_text(str(n + 1))
        if n < 2:
            raise OSError("transient")
        return n

    with dask.annotate(retries=3):
        task = dask.delayed(flaky, pure=False)()
    assert task.compute() == 2


@pytest.mark.parametrize(
    "args, match",
    [
        ({"num_cpus": -1}, "num_cpus"),
        ({"not_an_option": 1}, "not_an_option"),
        ({"num_returns": 3}, "num_returns"),
    ],
)
def test_wrong_options_fail_before_anything_runs(ray_get, tmp_path, args, match):
    marker = tmp_path / "ran"
    task = dask.delayed(marker.write_text)("x")
    with pytest.raises(InvalidOptionsError, match=match):
        task.compute(ray_remote_args=args)
    assert not marker.exists()


def test_progress_bar_and_profiler_see_every_task(ray_get):
    x = da.ones((100, 100), chunks=10)
    out = io.StringIO()
    with ProgressBar(out=out, minimum=0, dt=0.01), Profiler() as prof:
        assert (x + 1).sum().compute() == 20_000
    assert "100% Completed" in out.getvalue()
    keys = {r.key for r in prof.results}
    assert len(keys) > 100 and all(r.end_time >= r.start_time for r in prof.results)
    assert all(isinstance(r.worker_id, str) and ":" in r.worker_id for r in prof.results)


def test_shutdown_never_stops_a_ray_it_did_not_start(ray_session):
    assert ray_oob_sched.shutdown() is False
    assert ray_session.is_initialized()


@pytest.mark.slow
def test_embedded_ray_is_started_once_and_logged(tmp_path):
    """In a fresh process with no Ray: the first compute starts one, logged once."""
    script = textwrap.dedent(
        """
        import logging, dask, ray, ray_oob_sched
        logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
        assert not ray.is_initialized()
        with ray_oob_sched.enable():
            a = dask.delayed(sum)([1, 2, 3]).compute()
            b = dask.delayed(sum)([4, 5]).compute()
        assert (a, b) == (6, 9), (a, b)
        assert ray.is_initialized()
        print("cpus", ray.cluster_resources()["CPU"])
        print("shutdown", ray_oob_sched.shutdown(), ray.is_initialized())
        """
    )
    env = {
        "PATH": "/usr/bin:/bin",
        "DASK_RAY_OOB_SCHED__INIT__NUM_CPUS": "1",
        "DASK_RAY_OOB_SCHED__INIT__OBJECT_STORE_MEMORY": str(80 * 2**20),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cpus 1.0" in proc.stdout
    assert "shutdown True False" in proc.stdout
    assert proc.stderr.count("started an embedded local Ray") == 1


def test_unknown_compute_keywords_are_ignored_with_one_warning(ray_get):
    x = da.ones(10, chunks=5)
    with pytest.warns(ray_oob_sched.IgnoredKeywordsWarning, match="bogus_keyword") as record:
        assert x.sum().compute(bogus_keyword=10, workers=["w"]) == 10
    assert len(record) == 1 and "workers" in str(record[0].message)


def test_compute_wide_resources_keyword_is_honoured(ray_get):
    assert dask.delayed(cpus_assigned)(0).compute(resources={"CPU": 0.5}) == 0.5


def test_cache_keyword_is_refused_before_anything_runs(ray_get, tmp_path):
    marker = tmp_path / "ran"
    task = dask.delayed(marker.touch)()
    with pytest.raises(TypeError, match=r"cannot honour compute keywords \['cache'\]"):
        task.compute(cache={})
    assert not marker.exists()
