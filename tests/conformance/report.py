"""Compare the JUnit files of a conformance run (``tests.conformance.run``).

Outcomes per test id: ``passed``, ``failed`` (a failure or an error in setup or
teardown), ``skipped`` (skips and expected failures), ``crashed`` (the test killed its
process by a signal; the runner ran the module again without it and lists it in
``<module>.crashed``). A module whose XML is missing (not run, timed out) counts no test
in that mode.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

MODES = ("sync", "ray", "distributed")


def outcomes(xml: Path) -> dict[str, tuple[str, str]]:
    """``{test id: (outcome, first line of its error)}`` of one JUnit file."""
    out: dict[str, tuple[str, str]] = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        test = f"{case.get('classname')}::{case.get('name')}"
        outcome, line = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed"
                message = child.get("message") or (child.text or "")
                line = (message.strip().splitlines() or [""])[0][:300]
                break
            if child.tag == "skipped" and outcome == "passed":
                outcome = "skipped"
        out[test] = (outcome, line)
    return out


def crashed(path: Path) -> dict[str, tuple[str, str]]:
    """``{test id: ("crashed", ...)}`` from a ``.crashed`` file of pytest node ids."""
    out: dict[str, tuple[str, str]] = {}
    for nodeid in path.read_text().split():
        parts = nodeid.split("::")
        classname = ".".join([parts[0].removesuffix(".py").replace("/", "."), *parts[1:-1]])
        out[f"{classname}::{parts[-1]}"] = ("crashed", "the test crashed its process")
    return out


def _results(out: Path, mode: str, module: str) -> dict[str, tuple[str, str]] | None:
    xml, crash = out / mode / f"{module}.xml", out / mode / f"{module}.crashed"
    if not xml.exists():
        return None
    return outcomes(xml) | (crashed(crash) if crash.exists() else {})


def compare(out: Path, modules: list[str]) -> dict[str, Any]:
    """Counts per module and mode, and the tests passing under sync only."""
    report: dict[str, Any] = {"modules": {}, "regressions": []}
    keys = [*MODES, "sync_passed_ray_passed", "sync_where_ray_ran"]
    totals: dict[str, int | None] = dict.fromkeys(keys, None)
    for module in modules:
        runs = {mode: _results(out, mode, module) for mode in MODES}
        counts: dict[str, int | None] = {
            mode: None if r is None else sum(o == "passed" for o, _ in r.values())
            for mode, r in runs.items()
        }
        sync, ray, dist = runs["sync"] or {}, runs["ray"], runs["distributed"]
        both = 0
        for test, (outcome, _) in sorted(sync.items()):
            if outcome != "passed" or ray is None:
                continue
            ray_outcome, line = ray.get(test, ("missing", ""))
            if ray_outcome == "passed":
                both += 1
                continue
            dist_outcome = "not run" if dist is None else dist.get(test, ("missing", ""))[0]
            report["regressions"].append(
                {
                    "module": module,
                    "test": test,
                    "ray": ray_outcome,
                    "distributed": dist_outcome,
                    "error": line,
                }
            )
        report["modules"][module] = counts | {
            "sync_passed_ray_passed": both,
            "sync_where_ray_ran": counts["sync"] if ray is not None else None,
        }
        for key, value in report["modules"][module].items():
            if value is not None:
                totals[key] = (totals[key] or 0) + value
    report["totals"] = totals
    return report


def write_report(out: Path, *, modules: list[str]) -> str:
    """Write ``report.json`` and ``report.md`` under ``out``; return the markdown."""
    report = compare(out, modules)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    lines = [
        "| module | sync | ray_oob_sched | distributed | sync-passing also passing on ours |",
        "|---|---:|---:|---:|---:|",
    ]
    rows = [*report["modules"].items(), ("total", report["totals"])]
    for module, c in rows:
        share = (
            f"{100 * c['sync_passed_ray_passed'] / c['sync_where_ray_ran']:.1f}%"
            if c["sync_where_ray_ran"]
            else "-"
        )
        lines.append(
            f"| {module} | {_n(c['sync'])} | {_n(c['ray'])} | {_n(c['distributed'])} | {share} |"
        )
    lines += ["", "Passing under sync, not under ray_oob_sched:", ""]
    for r in report["regressions"]:
        lines.append(
            f"- `{r['test']}` (ours: {r['ray']}, distributed: {r['distributed']}): {r['error']}"
        )
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    return text


def _n(value: int | None) -> str:
    return "-" if value is None else str(value)
