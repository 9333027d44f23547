"""Run dask's own test modules under sync, ray_oob_sched and distributed; compare.

    .venv/bin/python -m tests.conformance.run [--modes sync ray distributed]
        [--modules array/tests/test_rechunk.py ...] [--out conformance-results]
    .venv/bin/python -m tests.conformance.run --report-only --out conformance-results

One pytest process per module and mode, on the installed dask's test files, with
``tests/conformance/dask-tests.ini`` (not the project's settings) and the mode's plugin
(``tests.conformance.plugin``). Each writes ``<out>/<mode>/<module>.xml`` (JUnit);
``report`` then writes ``<out>/report.json`` and ``<out>/report.md``: pass counts per
module and mode, and every test that passes under sync but not under ray_oob_sched,
with its error line. Ray runs hold ``/tmp/roos-ray.lock`` (shared machines run one
Ray test process at a time); sync and distributed runs are ``nice``d and lock-free.
Too slow for CI (an hour or more on two cores).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dask

from tests.conformance.report import write_report

#: dask's test modules, relative to the installed ``dask`` package.
MODULES = (
    "array/tests/test_array_core.py",
    "array/tests/test_reductions.py",
    "array/tests/test_rechunk.py",
    "array/tests/test_slicing.py",
    "dataframe/dask_expr/tests/test_shuffle.py",
    "dataframe/dask_expr/tests/test_merge.py",
    "dataframe/dask_expr/tests/test_groupby.py",
    "dataframe/tests/test_multi.py",
    "bag/tests/test_bag.py",
    "tests/test_delayed.py",
)
MODES = ("sync", "ray", "distributed")
LOCK = "/tmp/roos-ray.lock"
INI = Path(__file__).with_name("dask-tests.ini")


def module_name(module: str) -> str:
    """``array/tests/test_rechunk.py`` -> ``array.tests.test_rechunk`` (file names)."""
    return module.removesuffix(".py").replace("/", ".")


def command(module: str, mode: str, out: Path) -> list[str]:
    """The pytest command line of one module in one mode."""
    package = Path(dask.__file__).parent
    xml = out / mode / f"{module_name(module)}.xml"
    pytest = [
        sys.executable,
        "-m",
        "pytest",
        "-c",
        str(INI),
        f"--rootdir={package.parent}",
        f"--conformance-mode={mode}",
        f"--junitxml={xml}",
        "-o",
        "junit_family=xunit2",
        str(package / module),
    ]
    if mode == "ray":
        return ["flock", LOCK, *pytest]
    return ["nice", "-n", "10", *pytest]


def run_one(module: str, mode: str, out: Path, *, timeout: float) -> None:
    (out / mode).mkdir(parents=True, exist_ok=True)
    log = out / mode / f"{module_name(module)}.log"
    start = time.monotonic()
    with log.open("w") as f:
        # A session of its own: on timeout the whole group goes (flock forks pytest).
        proc = subprocess.Popen(
            command(module, mode, out), stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc: int | str = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = "timeout"
    print(f"{mode:12} {module:45} rc={rc} {time.monotonic() - start:6.0f} s", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--modules", nargs="+", default=list(MODULES))
    parser.add_argument("--out", type=Path, default=Path("conformance-results"))
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per module")
    parser.add_argument("--report-only", action="store_true", help="only compare the XML")
    args = parser.parse_args(argv)
    if not args.report_only:
        for module in args.modules:
            for mode in args.modes:
                run_one(module, mode, args.out, timeout=args.timeout)
    print(write_report(args.out, modules=[module_name(m) for m in args.modules]))


if __name__ == "__main__":
    main()
