"""The scheduler object inside dask.config: copyable and picklable (no Ray)."""

from __future__ import annotations

import copy
import pickle

import cloudpickle
import dask.config
import pytest

import ray_oob_sched
from ray_oob_sched import RaySchedule


def test_dask_config_deep_copies_with_enable_active():
    with ray_oob_sched.enable():
        copied = copy.deepcopy(dask.config.config)
        assert copied["scheduler"] == ray_oob_sched.get
        assert copied["scheduler"].__self__ is ray_oob_sched._schedule  # shared, not copied
        assert copy.copy(ray_oob_sched._schedule) is ray_oob_sched._schedule


@pytest.mark.parametrize(
    "dumps, loads", [(pickle.dumps, pickle.loads), (cloudpickle.dumps, cloudpickle.loads)]
)
def test_the_package_scheduler_pickles_by_reference(dumps, loads):
    with ray_oob_sched.enable():
        config = loads(dumps(dask.config.config))
    assert config["scheduler"].__self__ is ray_oob_sched._schedule


def test_a_hand_made_scheduler_refuses_pickling_by_name():
    with pytest.raises(TypeError, match="only ray_oob_sched's own scheduler"):
        pickle.dumps(RaySchedule().get)
