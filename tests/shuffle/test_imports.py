from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import shuffle

ROOT = Path(shuffle.__file__).resolve().parents[1]

PURE = ["_ids", "_exceptions", "_spec", "_placement", "_limiter", "_buffer", "_store"]
DATA = ["_partition", "_serialize", "_run", "_manager", "_device", "_device_codec"]


def imported_after(modules: list[str]) -> set[str]:
    code = (
        "import sys\n"
        + "".join(f"import shuffle.{m}\n" for m in modules)
        + "print(' '.join(sorted({n.partition('.')[0] for n in sys.modules})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    return set(out.stdout.split())


def test_pure_layer_never_imports_ray_or_ucxx() -> None:
    loaded = imported_after(PURE + DATA)
    assert not loaded & {"ray", "ucxx", "ucp", "cupy", "rmm"}


def test_control_plane_modules_stay_free_of_data_libraries() -> None:
    # Specs, limits and buffers are imported by the driver and every actor: keep them cheap.
    loaded = imported_after(PURE)
    assert not loaded & {"pandas", "pyarrow", "numpy", "dask"}
