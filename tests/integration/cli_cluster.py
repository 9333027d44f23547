"""A Ray cluster started with the ``ray start`` CLI on this machine, stopped exactly.

Other Ray instances run on the same machine, so the cluster has its own temp dir,
auth token and ports, and stopping it ends only the processes it started: the
``ray start --block`` processes, their descendants (GCS, raylets, workers, agents),
and anything else whose command line names the cluster's temp dir. Never
``ray stop``, which ends every Ray on the machine.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

RAY = str(Path(sys.executable).with_name("ray"))
START_TIMEOUT = 90.0


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports that were free a moment ago (bound to port 0, then freed)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class CliCluster:
    temp_dir: str
    gcs_address: str
    client_port: int
    env: dict[str, str]  # what a driver of this cluster needs (token, no RAY_ADDRESS)
    starters: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    def processes(self) -> list[psutil.Process]:
        """Every live process of this cluster: the starters' descendants and every
        process whose command line names the cluster's temp dir."""
        found: dict[int, psutil.Process] = {}
        for starter in self.starters:
            with contextlib.suppress(psutil.NoSuchProcess):
                p = psutil.Process(starter.pid)
                found[p.pid] = p
                for child in p.children(recursive=True):
                    found[child.pid] = child
        for p in psutil.process_iter(["cmdline"]):
            cmdline = " ".join(p.info["cmdline"] or [])
            if self.temp_dir in cmdline and p.pid != os.getpid():
                found[p.pid] = p
        return [p for p in found.values() if _alive(p)]

    def log_tail(self, chars: int = 4000) -> str:
        return "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-chars:]}" for p in self.logs)


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _node_ports() -> list[str]:
    node_manager, object_manager, agent, agent_grpc, metrics, runtime_env = free_ports(6)
    return [
        f"--node-manager-port={node_manager}",
        f"--object-manager-port={object_manager}",
        f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={runtime_env}",
    ]


def _wait_started(cluster: CliCluster, starter: subprocess.Popen[bytes], log: Path) -> None:
    """Until ``ray start`` says its node runs (it then blocks), or fail with its log."""
    deadline = time.monotonic() + START_TIMEOUT
    while "Ray runtime started" not in log.read_text(errors="replace"):
        if starter.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"ray start did not start its node:\n{cluster.log_tail()}")
        time.sleep(0.2)  # polling a log file, under the deadline above


@contextlib.contextmanager
def cli_cluster(
    *,
    head_ip: str,
    worker_ip: str,
    object_store_bytes: int,
    memory_bytes: int,
    ucx_net_devices: str | None,
) -> Iterator[CliCluster]:
    """A head and one worker node, one CPU each; the head has the custom resource
    ``roos_head``. Stops exactly its own processes and checks that none is left.
    ``ucx_net_devices``: UCX_NET_DEVICES of the cluster's processes (None: UCX's
    default, every device)."""
    temp_dir = tempfile.mkdtemp(prefix="roos-cl-", dir="/tmp")  # short: unix socket paths
    gcs_port, client_port = free_ports(2)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env |= {
        # Its own token: the default token file (~/.ray/auth_token) is shared by every
        # Ray on this machine.
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env.pop("UCX_NET_DEVICES", None)
    if ucx_net_devices is not None:
        env["UCX_NET_DEVICES"] = ucx_net_devices
    cluster = CliCluster(
        temp_dir=temp_dir,
        gcs_address=f"{head_ip}:{gcs_port}",
        client_port=client_port,
        env=env,
    )
    common = [
        "--block",
        "--num-cpus=1",
        f"--object-store-memory={object_store_bytes}",
        f"--memory={memory_bytes}",
        "--disable-usage-stats",
    ]
    head = [
        RAY, "start", "--head", f"--node-ip-address={head_ip}", f"--port={gcs_port}",
        f"--ray-client-server-port={client_port}", f"--temp-dir={temp_dir}",
        '--resources={"roos_head": 1}', "--include-dashboard=false", *common, *_node_ports(),
    ]  # fmt: skip
    worker = [
        RAY, "start", f"--address={cluster.gcs_address}", f"--node-ip-address={worker_ip}",
        *common, *_node_ports(),
    ]  # fmt: skip
    try:
        for name, cmd in (("head", head), ("worker", worker)):
            log = Path(temp_dir) / f"ray-start-{name}.log"
            cluster.logs.append(log)
            with open(log, "wb") as f:
                starter = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
            cluster.starters.append(starter)
            _wait_started(cluster, starter, log)
        yield cluster
    finally:
        _stop(cluster)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _stop(cluster: CliCluster) -> None:
    procs = cluster.processes()
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=5)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=10)
    for starter in cluster.starters:
        with contextlib.suppress(subprocess.TimeoutExpired):
            starter.wait(timeout=5)
    left = cluster.processes()
    assert left == [], f"processes of the test cluster left running: {left}"
