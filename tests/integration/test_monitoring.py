"""Monitoring a shuffle while it runs: Ray metrics, ``shuffle_status()``, dask's
progress callbacks, and ``last_stats()`` totals.

The metrics test scrapes the node's Prometheus export (``metrics_export_port`` in
Ray's node info); Ray exports every few seconds, so it polls with a deadline. The
status test holds one input partition on a gate file the test creates, so a shuffle
stays in its transfer phase, with the other inputs received, until the test lets it go.
"""

from __future__ import annotations

import io
import re
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
import ray
from dask.callbacks import Callback
from dask.diagnostics import ProgressBar

import ray_oob_sched
from tests.integration.p2p_support import OOB, WAIT, cleanup_checked, configured_service

pytestmark = pytest.mark.ray

NIN, NOUT = 8, 4
HELD = NIN - 1  # the input partition that waits for the gate


@pytest.fixture(scope="module")
def oob(ray_session: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    # memory-limit 0: every piece is spilled, so spilled and read-back bytes are known.
    with configured_service(tmp_path_factory.mktemp("spill"), memory_limit=0) as oob:
        yield oob


@pytest.fixture
def p2p(oob: OOB, ray_get: Any) -> Any:
    # Rechunks through the actors, whose counters these tests read: small plans would
    # otherwise run as plain gather tasks.
    with (
        dask.config.set({"ray-oob-sched.shuffle.rechunk-tasks-max-pieces": 0}),
        cleanup_checked(oob),
    ):
        yield oob


def eventually(predicate: Any, what: str, timeout: float = WAIT) -> Any:
    """Poll ``predicate`` until it returns something truthy, within ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        got = predicate()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        time.sleep(0.05)


# ------------------------------------------------------------------ Ray metrics


def scrape() -> dict[tuple[str, str, str], float]:
    """``{(metric, actor, worker id): value}`` of the shuffle's series on this node's
    export. Actor names repeat across services (each numbers its actors from 1), the
    process (Ray's ``WorkerId`` tag) tells them apart; histograms sum their buckets."""
    node = next(n for n in ray.nodes() if n["Alive"])
    url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    out: dict[tuple[str, str, str], float] = {}
    for line in text.splitlines():
        m = re.match(r"(ray_oob_shuffle_\w+)\{(.*)\} (\S+)$", line)
        if m is None:
            continue
        tags = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
        key = (m.group(1), tags.get("actor", ""), tags.get("WorkerId", ""))
        out[key] = out.get(key, 0.0) + float(m.group(3))
    return out


def test_metrics_on_rays_prometheus_export_match_what_the_rechunk_moved(p2p: OOB) -> None:
    (actor,) = p2p.service.actors()
    before = ray.get(actor.handle.sample.remote(), timeout=WAIT).counters
    a = np.random.default_rng(0).random((64, 48))
    got = da.from_array(a, chunks=(8, 48)).rechunk((64, 6)).compute()
    np.testing.assert_array_equal(got, a)
    (run,) = ray_oob_sched.last_stats().shuffle_runs
    # A rechunk's pieces are raw array bytes: every byte crossed once, no header.
    assert (run.kind, run.bytes_received) == ("rechunk", a.nbytes)
    assert run.bytes_spilled == run.bytes_read_back == a.nbytes  # memory-limit 0
    after = ray.get(actor.handle.sample.remote(), timeout=WAIT).counters
    assert after.bytes_received - before.bytes_received == a.nbytes
    assert after.pieces_received - before.pieces_received == run.pieces_received > 0
    assert after.runs_opened - before.runs_opened == 1

    expected = {
        "ray_oob_shuffle_received_bytes_total": after.bytes_received,
        "ray_oob_shuffle_received_pieces_total": after.pieces_received,
        "ray_oob_shuffle_spilled_bytes_total": after.bytes_spilled,
        "ray_oob_shuffle_read_back_bytes_total": after.bytes_read_back,
        "ray_oob_shuffle_runs_opened_total": after.runs_opened,
        "ray_oob_shuffle_runs_active": 0,
        "ray_oob_shuffle_run_seconds_count": after.runs_opened,
    }

    def exported() -> bool:  # by one process: the actor's
        values = scrape()
        workers = {w for (m, name, w) in values if name == actor.name}
        return any(
            all(values.get((m, actor.name, w)) == v for m, v in expected.items()) for w in workers
        )

    eventually(exported, f"Ray's metrics export shows {expected} for {actor.name}")


def test_a_restart_is_counted_by_the_driver(p2p: OOB) -> None:
    def restarts() -> float:
        return sum(v for k, v in scrape().items() if k[0] == "ray_oob_shuffle_restarts_total")

    before = restarts()
    meta = pd.DataFrame({"k": pd.Series([], dtype=int), "_partitions": pd.Series([], dtype=int)})
    handle = p2p.service.start_run("monitoring-restart", npartitions_out=2, meta=meta)
    p2p.service.close_run(p2p.service.restart_run(handle))
    # At least: a restart counted earlier in this process may still be on its way.
    eventually(lambda: restarts() >= before + 1, "the restart exported")


# ------------------------------------------------------- status while it runs


def make_part(i: int, gate: str) -> pd.DataFrame:
    """Input partition ``i``; the held one waits (bounded) until the test creates ``gate``."""
    if i == HELD:
        deadline = time.monotonic() + 120
        while not Path(gate).exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the test never opened {gate}")
            time.sleep(0.02)
    rng = np.random.default_rng(i)
    return pd.DataFrame({"k": rng.integers(0, 1000, 500), "v": rng.random(500)})


class Finished(Callback):
    """What dask's local callbacks see: keys finished, in order, with the count."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple[str, int]] = []

    def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, id: Any) -> None:
        name = key[0] if isinstance(key, tuple) else key
        self.log.append((str(name), len(state["finished"])))


def test_shuffle_status_during_a_held_shuffle(p2p: OOB, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    df = dd.from_map(make_part, range(NIN), gate=str(gate), enforce_metadata=False)
    shuffled = df.shuffle("k", npartitions=NOUT)
    box: dict[str, Any] = {}
    bar_out = io.StringIO()
    finished = Finished()

    def compute() -> None:
        try:
            with ProgressBar(out=bar_out, dt=0.01), finished:
                box["result"] = shuffled.compute()
        except BaseException as e:  # noqa: BLE001 -- re-raised by the test thread
            box["error"] = e

    assert ray_oob_sched.shuffle_status().runs == ()
    # One Ray task per dask task, so each transfer finishes on its own.
    with dask.config.set({"ray-oob-sched.scheduler.fuse.enabled": False}):
        thread = threading.Thread(target=compute, name="held compute")
        thread.start()
        try:

            def held() -> Any:
                status = ray_oob_sched.shuffle_status()
                runs = [r for r in status.runs if r.inputs_received == NIN - 1]
                return runs[0] if runs and runs[0].actors else None

            run = eventually(held, "a running shuffle with every input but one received")
            # The actor answered with what the received inputs moved, still in the run.
            assert (run.kind, run.inputs_expected) == ("shuffle", NIN)
            assert (run.outputs_done, run.outputs_expected) == (0, NOUT)
            assert run.elapsed > 0 and run.restarts == 0
            (actor,) = run.actors
            assert actor.node_id == p2p.service.actors()[0].node_id
            assert actor.pieces_received >= (NIN - 1)  # a piece per input and output at least
            assert actor.bytes_received > 0
            # memory-limit 0: everything received is on disk
            assert (actor.memory_bytes, actor.disk_bytes) == (0, actor.bytes_received)
            assert run.bytes_received == run.disk_bytes == actor.bytes_received
            # dask's callbacks saw the transfers finish one by one, before the barrier.
            transfers = [n for name, n in finished.log if name.startswith("shuffle-transfer")]
            assert len(transfers) == NIN - 1 and len(set(transfers)) == NIN - 1
            assert not any(name.startswith("shuffle-barrier") for name, _ in finished.log)
        finally:
            gate.touch()
            thread.join(WAIT)
    assert not thread.is_alive()
    if "error" in box:
        raise box["error"]
    expected = pd.concat(make_part(i, str(gate)) for i in range(NIN))
    result = box["result"]
    pd.testing.assert_frame_equal(
        result.sort_values(["k", "v"]).reset_index(drop=True),
        expected.sort_values(["k", "v"]).reset_index(drop=True),
    )
    assert ray_oob_sched.shuffle_status().runs == ()
    (totals,) = ray_oob_sched.last_stats().shuffle_runs
    assert (totals.inputs, totals.outputs) == (NIN, NOUT)
    assert totals.bytes_received > actor.bytes_received  # the held input arrived too
    assert totals.bytes_spilled == totals.bytes_read_back == totals.bytes_received
    assert totals.gb_per_s > 0
    assert ray_oob_sched.last_stats().shuffle_bytes == totals.bytes_received
    assert "100%" in bar_out.getvalue()
