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
from collections.abc import Sequence
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


#: Tests that crashed their process in one module and mode: each crash reruns the module
#: without the tests that crashed so far, up to this many times.
MAX_CRASHES = 5


def command(module: str, mode: str, out: Path, *, deselect: Sequence[str] = ()) -> list[str]:
    """The pytest command line of one module in one mode."""
    package = Path(dask.__file__).parent
    xml = out / mode / f"{module_name(module)}.xml"
    progress = out / mode / f"{module_name(module)}.running"
    pytest = [
        sys.executable,
        "-m",
        "pytest",
        "-c",
        str(INI),
        f"--rootdir={package.parent}",
        f"--conformance-mode={mode}",
        f"--junitxml={xml}",
        f"--conformance-progress={progress}",
        "-o",
        "junit_family=xunit2",
        *(f"--deselect={nodeid}" for nodeid in deselect),
        str(package / module),
    ]
    if mode == "ray":
        return ["flock", LOCK, *pytest]
    return ["nice", "-n", "10", *pytest]


def run_one(module: str, mode: str, out: Path, *, timeout: float) -> None:
    """Run one module in one mode. A test that crashes the process (a signal) is
    recorded in ``<module>.crashed`` and the module runs again without it."""
    (out / mode).mkdir(parents=True, exist_ok=True)
    name = module_name(module)
    progress, crashed_file = out / mode / f"{name}.running", out / mode / f"{name}.crashed"
    crashed: list[str] = []
    start = time.monotonic()
    while True:
        progress.write_text("")
        rc = _run_pytest(
            command(module, mode, out, deselect=crashed),
            out / mode / f"{name}.log",
            timeout=timeout - (time.monotonic() - start),
        )
        nodeid = progress.read_text().strip()
        if not (isinstance(rc, int) and rc < 0 and nodeid and len(crashed) < MAX_CRASHES):
            break
        crashed.append(nodeid)
    progress.unlink()
    crashed_file.unlink(missing_ok=True)
    if crashed:
        crashed_file.write_text("".join(f"{nodeid}\n" for nodeid in crashed))
    note = f" (crashed in {len(crashed)} tests, run without them)" if crashed else ""
    print(f"{mode:12} {module:45} rc={rc} {time.monotonic() - start:6.0f} s{note}", flush=True)


def _run_pytest(cmd: list[str], log: Path, *, timeout: float) -> int | str:
    with log.open("w") as f:
        # A session of its own: on timeout the whole group goes (flock forks pytest).
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return "timeout"


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
