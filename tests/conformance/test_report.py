"""The conformance report's comparison, on small JUnit files (no dask tests run)."""

from __future__ import annotations

from pathlib import Path

from tests.conformance.report import compare, write_report


def junit(path: Path, cases: dict[str, str], *, classname: str = "m") -> None:
    body = {
        "passed": "",
        "failed": '<failure message="AssertionError: x is y&#10;more">trace</failure>',
        "error": '<error message="TypeError: bad">trace</error>',
        "skipped": '<skipped message="no" />',
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = "".join(
        f'<testcase classname="{classname}" name="{name}">{body[outcome]}</testcase>'
        for name, outcome in cases.items()
    )
    path.write_text(f'<testsuites><testsuite name="pytest">{rows}</testsuite></testsuites>')


def test_counts_and_the_tests_that_pass_under_sync_only(tmp_path: Path) -> None:
    junit(
        tmp_path / "sync" / "mod.xml", {"a": "passed", "b": "passed", "c": "passed", "d": "skipped"}
    )
    junit(tmp_path / "ray" / "mod.xml", {"a": "passed", "b": "failed", "d": "passed"})
    junit(tmp_path / "distributed" / "mod.xml", {"a": "passed", "b": "error", "c": "passed"})
    report = compare(tmp_path, ["mod", "not-run"])
    assert report["modules"]["mod"] == {
        "sync": 3,
        "ray": 2,
        "distributed": 2,
        "sync_passed_ray_passed": 1,
        "sync_where_ray_ran": 3,
    }
    assert report["modules"]["not-run"]["sync"] is None
    assert report["regressions"] == [
        {
            "module": "mod",
            "test": "m::b",
            "ray": "failed",
            "distributed": "failed",
            "error": "AssertionError: x is y",
        },
        {"module": "mod", "test": "m::c", "ray": "missing", "distributed": "passed", "error": ""},
    ]
    text = write_report(tmp_path, modules=["mod"])
    assert "| total | 3 | 2 | 2 | 33.3% |" in text
    assert (tmp_path / "report.json").exists()


def test_tests_that_crashed_their_process_count_as_crashed(tmp_path: Path) -> None:
    both = {"a": "passed", "b": "passed"}
    junit(tmp_path / "sync" / "pkg.mod.xml", both, classname="pkg.mod")
    junit(tmp_path / "ray" / "pkg.mod.xml", {"a": "passed"}, classname="pkg.mod")  # without b
    (tmp_path / "ray" / "pkg.mod.crashed").write_text("pkg/mod.py::b\n")
    junit(tmp_path / "distributed" / "pkg.mod.xml", both, classname="pkg.mod")
    report = compare(tmp_path, ["pkg.mod"])
    assert report["modules"]["pkg.mod"]["sync_passed_ray_passed"] == 1
    (regression,) = report["regressions"]
    assert (regression["test"], regression["ray"]) == ("pkg.mod::b", "crashed")
