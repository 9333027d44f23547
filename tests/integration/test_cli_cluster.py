"""A real two-node cluster started with ``ray start``, joined through RAY_ADDRESS.

The head and a worker node each have their own raylet, object store (100 MiB) and
one CPU; the cluster has its own temp dir, ports and auth token. Two set-ups: the
worker on a loopback address of its own (127.0.0.2) with the TCP transport, and both
nodes on the machine's address (Ray replaces a given 127.0.0.1 by it) with UCX. A
driver in a subprocess joins through RAY_ADDRESS (as a user's script does) and runs a
shuffle and a rechunk whose tasks are all pinned to the head, so every piece owned
by the worker node's shuffle actor crosses nodes; the cluster example runs the same
way, and a Ray Client driver is refused.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from shuffle._transport import ucx as ucx_module
from tests.integration.cli_cluster import cli_cluster, free_ports

pytestmark = [pytest.mark.slow, pytest.mark.ray]

HEAD_IP = "127.0.0.1"
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

DRIVER = r"""
import json, os, sys, time
import dask, dask.array as da, dask.dataframe as dd, numpy as np, pandas as pd, ray
from distributed.shuffle._rechunk import rechunk_unpack
from distributed.shuffle._shuffle import shuffle_unpack
import ray_oob_sched

# The first compute joins the cluster named by RAY_ADDRESS.
assert dask.delayed(sum)([1, 2]).compute(scheduler=ray_oob_sched.get) == 3
deadline = time.monotonic() + 60
while sum(n["Alive"] for n in ray.nodes()) < 2:
    assert time.monotonic() < deadline, ray.nodes()
    time.sleep(0.2)
nodes = {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}
head = next(i for i, n in nodes.items() if "roos_head" in n["Resources"])
pin = {"resources": {"roos_head": 0.01}}  # every task on the head node


def unpack_locations(collection, func):
    graph = collection.__dask_graph__()
    keys = [k for k, t in dict(graph).items() if getattr(t, "func", None) is func]
    refs = ray_oob_sched.get_refs(graph, keys, ray_remote_args=pin)
    located = ray.experimental.get_object_locations(refs)
    return sorted({n for loc in located.values() for n in loc["node_ids"]})


rng = np.random.default_rng(0)
n = 200_000
pdf = pd.DataFrame({"k": rng.integers(0, 1000, n), "v": np.arange(n), "w": rng.random(n)})
cube = rng.random((32, 128, 128))
with ray_oob_sched.enable():
    shuffled = dd.from_pandas(pdf, npartitions=8).shuffle("k", npartitions=8)
    got = shuffled.compute(ray_remote_args=pin)
    shuffle_ok = bool(got.sort_values("v").reset_index(drop=True).equals(pdf))
    shuffle_nodes = unpack_locations(shuffled, shuffle_unpack)

    x = da.from_array(cube, chunks=(2, 128, 128)).rechunk((32, 32, 32))
    rechunk_ok = bool(np.allclose(x.mean(axis=0).compute(ray_remote_args=pin), cube.mean(0)))
    rechunk_nodes = unpack_locations(x, rechunk_unpack)

actors = ray_oob_sched._schedule.shuffle_service().actors()
print(json.dumps({
    "nodes": sorted(nodes), "head": head,
    "addresses": {i: n["NodeManagerAddress"] for i, n in nodes.items()},
    "shuffle_ok": shuffle_ok, "shuffle_nodes": shuffle_nodes,
    "rechunk_ok": rechunk_ok, "rechunk_nodes": rechunk_nodes,
    "actors": [[a.node_id, a.address] for a in actors],
}))
"""

CLIENT = r"""
import sys, time
import dask, ray, ray_oob_sched
ray.init(sys.argv[1])
start = time.monotonic()
try:
    dask.delayed(sum)([1, 2]).compute(scheduler=ray_oob_sched.get)
except ray_oob_sched.RayClientNotSupportedError as e:
    print(f"refused after {time.monotonic() - start:.2f} s: {e}")
"""


@dataclass(frozen=True)
class Setup:
    transport: str
    worker_ip: str
    ucx_net_devices: str | None


SETUPS = [
    # The worker on a loopback address of its own, the TCP transport.
    pytest.param(Setup("tcp", "127.0.0.2", "lo"), id="tcp-worker-on-127.0.0.2"),
    # Both nodes on the machine's address (Ray's replacement for 127.0.0.1), UCX with
    # its default devices. (UCX did not connect to a worker on 127.0.0.2.)
    pytest.param(
        Setup("ucx", "127.0.0.1", None),
        id="ucx-both-on-the-machine-address",
        marks=[
            pytest.mark.ucx,
            pytest.mark.skipif(not ucx_module.is_available(), reason="ucxx cannot be imported"),
        ],
    ),
]


@pytest.fixture(scope="module", params=SETUPS)
def cluster(request):
    setup = request.param
    with cli_cluster(
        head_ip=HEAD_IP,
        worker_ip=setup.worker_ip,
        object_store_bytes=100 * 2**20,
        memory_bytes=2 * 2**30,
        ucx_net_devices=setup.ucx_net_devices,
    ) as c:
        yield c, setup


def _run(cluster, code, *args, **env):
    return _run_argv(cluster, ["-c", code, *args], **env)


def _run_argv(cluster, argv, **env):
    out = subprocess.run(
        [sys.executable, *argv],
        env={**cluster.env, **env},
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert out.returncode == 0, f"{out.stdout[-3000:]}\n{out.stderr[-6000:]}"
    return out.stdout


def test_a_driver_joins_through_ray_address_and_shuffles_across_nodes(cluster):
    cluster, setup = cluster
    first = free_ports(1)[0]
    port_range = (first, first + 7)
    stdout = _run(
        cluster,
        DRIVER,
        RAY_ADDRESS=cluster.gcs_address,
        DASK_RAY_OOB_SCHED__SHUFFLE__PORT_RANGE=f"{port_range[0]}-{port_range[1]}",
        DASK_RAY_OOB_SCHED__SHUFFLE__TRANSPORT=setup.transport,
    )
    result = json.loads(stdout.strip().splitlines()[-1])
    assert len(result["nodes"]) == 2
    worker = next(n for n in result["nodes"] if n != result["head"])
    head_address = result["addresses"][result["head"]]
    assert result["addresses"][worker] == (
        head_address if setup.worker_ip == HEAD_IP else setup.worker_ip
    )
    assert result["shuffle_ok"] and result["rechunk_ok"]
    # Every task ran on the head, yet output partitions and chunks were made by the
    # worker node's actor too: its pieces crossed nodes.
    assert result["shuffle_nodes"] == result["nodes"]
    assert result["rechunk_nodes"] == result["nodes"]
    # One shuffle actor per node (one CPU each), listening within the port range on its
    # node's own address.
    assert sorted(node for node, _ in result["actors"]) == result["nodes"]
    for node, address in result["actors"]:
        host, port = address.split("://", 1)[1].rsplit(":", 1)
        assert host == result["addresses"][node]
        assert address.startswith(f"{setup.transport}://")
        assert port_range[0] <= int(port) <= port_range[1]


@pytest.mark.xfail(
    reason="Ray's own client server sometimes fails to start on the 2-core machine; "
    "the refusal itself is tested without it in tests/scheduler/test_ray_client.py",
    strict=False,
)
def test_a_ray_client_driver_is_refused_at_once(cluster):
    cluster, _ = cluster
    stdout = _run(cluster, CLIENT, f"ray://{HEAD_IP}:{cluster.client_port}")
    assert "refused after" in stdout
    assert "does not support Ray Client" in stdout


def test_the_cluster_example_joins_through_ray_address(cluster):
    cluster, setup = cluster
    first = free_ports(1)[0]
    stdout = _run_argv(
        cluster,
        [
            str(EXAMPLES / "cluster.py"),
            "--size",
            "100000",
            "--transport",
            setup.transport,
            "--actors-per-node",
            "1",
            "--memory-limit",
            "64MiB",
            "--port-range",
            f"{first}-{first + 7}",
        ],
        RAY_ADDRESS=cluster.gcs_address,
    )
    assert f"connected to the cluster at {cluster.gcs_address}: 2 node(s)" in stdout
    assert stdout.count(f"  {setup.worker_ip} ") == (setup.worker_ip != HEAD_IP)
    assert stdout.count("correct") == 2 and "WRONG" not in stdout
