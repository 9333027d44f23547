"""Compute keywords meant for other schedulers: honoured, ignored or refused (no Ray)."""

from __future__ import annotations

import pytest

from ray_oob_sched._keywords import IgnoredKeywordsWarning, sort_keywords, warn_ignored


def test_local_pool_sizes_are_dropped_silently():
    kw = sort_keywords({"num_workers": 4, "pool": None, "chunksize": 2, "ray_persist": True})
    assert kw.annotations == {} and kw.ignored == ()


def test_resources_and_retries_become_compute_wide_annotations():
    kw = sort_keywords({"resources": {"CPU": 2}, "retries": 3, "priority": 1})
    assert kw.annotations == {"resources": {"CPU": 2}, "retries": 3}
    assert kw.ignored == ("priority",)


def test_hints_for_other_schedulers_are_ignored_by_name():
    hints = {"workers": ["w1"], "allow_other_workers": True, "fifo_timeout": "60s"}
    kw = sort_keywords({**hints, "bogus_keyword": 10, "rerun_exceptions_locally": True})
    assert kw.ignored == tuple(sorted([*hints, "bogus_keyword", "rerun_exceptions_locally"]))


@pytest.mark.parametrize("name", ["cache", "actors"])
def test_keywords_whose_loss_changes_results_are_refused(name):
    with pytest.raises(TypeError, match=rf"cannot honour compute keywords \['{name}'\]"):
        sort_keywords({name: {}, "bogus_keyword": 1})


def test_one_warning_names_every_ignored_keyword():
    with pytest.warns(IgnoredKeywordsWarning) as record:
        warn_ignored(("bogus_keyword", "workers"), stacklevel=1)
    assert len(record) == 1
    assert "['bogus_keyword', 'workers']" in str(record[0].message)


def test_a_misspelt_ray_keyword_is_refused_not_ignored():
    with pytest.raises(TypeError, match=r"unknown keywords \['ray_remote_arg'\].*ray_remote_args="):
        sort_keywords({"ray_remote_arg": {"num_cpus": 1}})
