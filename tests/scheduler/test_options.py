"""Tier 1: annotations and ray_remote_args become Ray task options (no Ray)."""

from __future__ import annotations

import pytest

from ray_oob_sched._options import InvalidOptionsError, options_token, per_key_options


def test_per_key_ray_remote_args_override_compute_wide():
    out = per_key_options(
        ["a", "b", "c"],
        {"ray_remote_args": {"a": {"num_cpus": 2}}},
        compute_annotations={},
        compute_remote_args={"num_cpus": 0.5, "max_retries": 1},
    )
    assert out["a"] == {"num_cpus": 2, "max_retries": 1}
    assert out["b"] == out["c"] == {"num_cpus": 0.5, "max_retries": 1}


def test_dask_resources_and_retries_are_mapped():
    out = per_key_options(
        ["a"],
        {"resources": {"a": {"CPU": 2, "GPU": 1, "disk": 1}}, "retries": {"a": 3}},
        compute_annotations={},
        compute_remote_args=None,
    )
    assert out["a"] == {
        "num_cpus": 2,
        "num_gpus": 1,
        "resources": {"disk": 1},
        "max_retries": 3,
        "retry_exceptions": True,
    }


def test_compute_time_annotation_context_applies_to_all_keys():
    out = per_key_options(
        ["a", "b"],
        {},
        compute_annotations={"ray_remote_args": {"num_gpus": 1}},
        compute_remote_args=None,
    )
    assert out == {"a": {"num_gpus": 1}, "b": {"num_gpus": 1}}


def test_keys_without_options_are_left_out():
    assert per_key_options(["a"], {}, compute_annotations={}, compute_remote_args=None) == {}


@pytest.mark.parametrize("bad", [{"num_returns": 2}, {"name": "x"}])
def test_reserved_options_are_refused(bad):
    with pytest.raises(InvalidOptionsError, match="set by ray_oob_sched"):
        per_key_options(
            ["a"], {"ray_remote_args": {"a": bad}}, compute_annotations={}, compute_remote_args=None
        )
    with pytest.raises(InvalidOptionsError, match="compute-wide"):
        per_key_options(["a"], {}, compute_annotations={}, compute_remote_args=bad)


def test_ray_remote_args_must_be_a_mapping():
    with pytest.raises(InvalidOptionsError, match="must be a dict"):
        per_key_options(
            ["a"], {"ray_remote_args": {"a": 3}}, compute_annotations={}, compute_remote_args=None
        )


def test_options_token_equal_for_equal_options():
    assert options_token({"a": {"x": 1}, "b": 2}) == options_token({"b": 2, "a": {"x": 1}})
    assert options_token({"a": 1}) != options_token({"a": 2})
