"""The layering of ``shuffle/``, checked over whole folders (docs/architecture.md).

Only ``shell/`` imports Ray, only ``device/`` imports the GPU libraries, only
``_transport/ucx.py`` imports ucxx, and nothing in ``shuffle`` imports the scheduler
(``ray_oob_sched`` uses ``shuffle``, never the reverse). Checked twice: statically
(every import statement of every module, lazy ones included) and by importing every
module outside those folders in a fresh interpreter.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import shuffle

PACKAGE = Path(shuffle.__file__).resolve().parent
ROOT = PACKAGE.parent

#: Top-level import name -> the only place (a folder or a module, relative to
#: ``shuffle/``) allowed to import it; ``None``: nowhere.
ALLOWED = {
    "ray": "shell",
    "cupy": "device",
    "rmm": "device",
    "cudf": "device",
    "pylibcudf": "device",
    "ucxx": "_transport/ucx.py",
    "ucp": None,
    "ray_oob_sched": None,
}

PURE = ["_ids", "_exceptions", "_spec", "shell._placement", "_limiter", "_buffer", "_store"]


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def dotted(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(path: Path) -> set[str]:
    """Top-level names of every absolute import in ``path``, at any depth."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.partition(".")[0])
    return names


def allowed_in(path: Path, place: str | None) -> bool:
    if place is None:
        return False
    relative = path.relative_to(PACKAGE).as_posix()
    return relative == place or relative.startswith(place + "/")


def imported_after(names: list[str]) -> set[str]:
    code = (
        "import sys\n"
        + "".join(f"import {n}\n" for n in names)
        + "print(' '.join(sorted({n.partition('.')[0] for n in sys.modules})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    return set(out.stdout.split())


def test_the_walk_sees_every_folder() -> None:
    folders = {p.relative_to(PACKAGE).parts[0] for p in modules() if p.parent != PACKAGE}
    assert folders == {"_transport", "device", "shell", "wire"}


@pytest.mark.parametrize("library", sorted(ALLOWED))
def test_only_its_folder_imports(library: str) -> None:
    offenders = [
        p.relative_to(PACKAGE).as_posix()
        for p in modules()
        if library in imported_names(p) and not allowed_in(p, ALLOWED[library])
    ]
    assert offenders == [], f"{library} is imported outside {ALLOWED[library]}: {offenders}"


def test_the_allowed_places_do_import_them() -> None:
    # Guards the static check itself: if it stopped seeing imports, this fails.
    seen = {library for p in modules() for library in imported_names(p) if library in ALLOWED}
    assert {"ray", "cupy", "rmm", "cudf", "ucxx"} <= seen


def test_everything_outside_the_shell_loads_without_ray_ucxx_or_gpu_libraries() -> None:
    outside = [
        dotted(p)
        for p in modules()
        if not allowed_in(p, "shell") and not allowed_in(p, "_transport/ucx.py")
    ]
    loaded = imported_after(outside)
    assert not loaded & {"ray", "ucxx", "ucp", "cupy", "rmm", "cudf", "ray_oob_sched"}


def test_control_plane_modules_stay_free_of_data_libraries() -> None:
    # Specs, limits and buffers are imported by the driver and every actor: keep them cheap.
    loaded = imported_after([f"shuffle.{m}" for m in PURE])
    assert not loaded & {"pandas", "pyarrow", "numpy", "dask"}
