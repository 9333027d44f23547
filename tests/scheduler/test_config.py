"""Tier 1: the configuration YAML, its schema, and reading it (no Ray)."""

from __future__ import annotations

import copy

import dask.config
import jsonschema
import pytest
import yaml

from ray_oob_sched import _config
from ray_oob_sched._config import SchedulerConfig, ray_init_kwargs


def _load(path):
    with open(path) as f:
        return yaml.safe_load(f)


def test_defaults_validate_against_schema():
    jsonschema.validate(_load(_config.DEFAULTS_PATH), _load(_config.SCHEMA_PATH))


def test_schema_is_complete():
    """Every default key is described by the schema, and nothing else is."""

    def walk(defaults, schema, path):
        props = schema.get("properties", {})
        assert set(defaults) == set(props), path
        for k, v in defaults.items():
            if isinstance(v, dict):
                walk(v, props[k], f"{path}.{k}")

    walk(_load(_config.DEFAULTS_PATH), _load(_config.SCHEMA_PATH), "")


def test_schema_rejects_a_bad_value():
    bad = _load(_config.DEFAULTS_PATH)
    bad["ray-oob-sched"]["scheduler"]["max-in-flight"] = 0
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, _load(_config.SCHEMA_PATH))


def test_auto_window_scales_with_cluster():
    assert SchedulerConfig.from_dask_config(cluster_cpus=2).max_in_flight == 32
    assert SchedulerConfig.from_dask_config(cluster_cpus=100).max_in_flight == 400


def test_values_come_from_dask_config():
    with dask.config.set({"ray-oob-sched.scheduler.max-in-flight": 5, "ray-oob-sched.scheduler.fuse.enabled": False}):
        cfg = SchedulerConfig.from_dask_config(cluster_cpus=2)
    assert cfg.max_in_flight == 5 and not cfg.fuse.enabled


def test_bad_window_names_the_key():
    with dask.config.set({"ray-oob-sched.scheduler.max-in-flight": -1}):
        with pytest.raises(ValueError, match="max-in-flight"):
            SchedulerConfig.from_dask_config(cluster_cpus=2)


def test_environment_variables_work_as_for_dask(monkeypatch):
    monkeypatch.setenv("DASK_RAY_OOB_SCHED__SCHEDULER__FUSE__MAX_TASKS", "7")
    saved = copy.deepcopy(dask.config.config)
    try:
        dask.config.refresh()
        assert SchedulerConfig.from_dask_config(cluster_cpus=2).fuse.max_tasks == 7
    finally:
        dask.config.config.clear()
        dask.config.config.update(saved)


def test_init_kwargs_drop_nulls_and_use_underscores():
    with dask.config.set({"ray-oob-sched.init.num-cpus": 3}):
        kw = ray_init_kwargs()
    assert kw["num_cpus"] == 3 and "object_store_memory" not in kw
