"""Ray Client (ray://) is refused at once, with what to do instead (no Ray started)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import ray.util.client

import ray_oob_sched
from ray_oob_sched import RayClientNotSupportedError
from ray_oob_sched._runtime import refuse_ray_client


def test_a_client_session_is_refused_naming_what_to_do():
    with pytest.raises(RayClientNotSupportedError, match="through ray://") as info:
        refuse_ray_client(connected=True, address=None)
    assert "ray job submit" in str(info.value) and "RAY_ADDRESS=<head>:6379" in str(info.value)


@pytest.mark.parametrize("address", [None, "", "127.0.0.1:6379", "auto"])
def test_a_driver_address_is_accepted(address):
    refuse_ray_client(connected=False, address=address)


def test_get_refuses_a_client_session_before_any_work(monkeypatch):
    monkeypatch.setattr(ray.util.client.ray, "is_connected", lambda: True)
    ran = []
    with pytest.raises(RayClientNotSupportedError):
        ray_oob_sched.get({"x": (ran.append, 1)}, "x")
    assert ran == []


def test_a_ray_client_address_fails_the_first_compute_at_once():
    """RAY_ADDRESS=ray://...: the first compute fails without connecting anywhere."""
    code = (
        "import dask, ray, ray_oob_sched\n"
        "try:\n"
        "    dask.delayed(sum)([1, 2]).compute(scheduler=ray_oob_sched.get)\n"
        "except ray_oob_sched.RayClientNotSupportedError as e:\n"
        "    print('refused:', e)\n"
        "print('initialized:', ray.is_initialized())\n"
    )
    env = {**os.environ, "RAY_ADDRESS": "ray://127.0.0.1:1"}
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "refused: ray_oob_sched does not support Ray Client" in out.stdout
    assert "'ray://127.0.0.1:1'" in out.stdout
    assert "initialized: False" in out.stdout
