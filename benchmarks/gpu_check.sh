#!/usr/bin/env bash
# The GPU checks of the shuffle in one call, from the repository root of a GPU node:
#   1. the gpu-marked tests of tests/shuffle;
#   2. benchmarks/device_bandwidth.py (device frames over UCX against host staging);
#   3. benchmarks/device_rechunk.py (a CuPy rechunk through runs against NumPy);
#   4. the rest of tests/shuffle.
# Each step has its own time limit and none stops the others. Logs (and JUnit XML) go to
# $OUT (default /tmp/gpu-check-out). Wheels in ./.whl (e.g. ucxx-cu13, libucxx-cu13,
# libucx-cu13, rmm-cu13, dask) are installed into /tmp/site first when present.
#   bash benchmarks/gpu_check.sh
# Environment: STEPS (a subset of the step names below), RECHUNK_ROWS/RECHUNK_COLS (the
# rechunked array, default 2 GiB of float32), GPU_TESTS_LIMIT, BANDWIDTH_LIMIT,
# RECHUNK_LIMIT, SHUFFLE_TESTS_LIMIT (seconds), PYTHON (default python3).
set -u
OUT=${OUT:-/tmp/gpu-check-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl > "$OUT/env.log" 2>&1 || echo "wheel install failed"
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

declare -A RC
STEPS=${STEPS:-gpu_tests bandwidth rechunk shuffle_tests}  # which steps to run
step() {  # step NAME SECONDS COMMAND...: run with a limit, log to $OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    [[ " $STEPS " == *" $name "* ]] || return 0
    local start=$SECONDS
    echo "== $name (limit ${limit}s): $*"
    timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    RC[$name]=$?
    echo "== $name: rc=${RC[$name]} in $((SECONDS - start)) s"
}

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
    "$PY" - <<'EOF'
import importlib.metadata as md, sys
print("python", sys.version.split()[0])
for name in ("cupy-cuda13x", "numpy", "ucxx-cu13", "libucxx-cu13", "libucx-cu13",
             "rmm-cu13", "dask", "pandas", "pyarrow", "pytest", "hypothesis"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "not installed")
try:
    import cupy
    print("CUDA runtime", cupy.cuda.runtime.runtimeGetVersion(),
          "driver", cupy.cuda.runtime.driverGetVersion())
except Exception as e:
    print("cupy:", repr(e))
try:
    import ucxx
    print("UCX", ucxx.get_ucx_version())
except Exception as e:
    print("ucxx:", repr(e))
try:
    from shuffle.device._cuda import gpu_status
    print("shuffle gpu_status:", gpu_status())
except Exception as e:
    print("gpu_status:", repr(e))
EOF
} >> "$OUT/env.log" 2>&1
tail -n 25 "$OUT/env.log"

PYTEST=("$PY" -m pytest -p no:cacheprovider -q -rs --continue-on-collection-errors)
step gpu_tests "${GPU_TESTS_LIMIT:-60}" "${PYTEST[@]}" -m gpu tests/shuffle \
    --junitxml="$OUT/gpu_tests.xml"
step bandwidth "${BANDWIDTH_LIMIT:-90}" env UCX_PROTO_INFO=y "$PY" \
    benchmarks/device_bandwidth.py --sizes 1MiB,16MiB,64MiB,256MiB --repetitions 7 \
    --ucx-log "$OUT/ucx_proto.log"
step rechunk "${RECHUNK_LIMIT:-90}" "$PY" benchmarks/device_rechunk.py \
    --rows "${RECHUNK_ROWS:-16384}" --cols "${RECHUNK_COLS:-32768}" --chunks 8 --repeat 3
XDIST=()  # the rest of tests/shuffle spread over 8 processes where pytest-xdist is there
"$PY" -c "import xdist" 2> /dev/null && XDIST=(-n 8 -p no:benchmark)  # pytest-benchmark warns under xdist
step shuffle_tests "${SHUFFLE_TESTS_LIMIT:-150}" "${PYTEST[@]}" "${XDIST[@]}" -m "not gpu" \
    tests/shuffle --junitxml="$OUT/shuffle_tests.xml"

echo
echo "---- gpu tests";     tail -n 15 "$OUT/gpu_tests.log"
echo "---- shuffle tests"; grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/shuffle_tests.log" | tail -n 25
echo "---- rechunk";       tail -n 4 "$OUT/rechunk.log"
echo "---- bandwidth";     tail -n 55 "$OUT/bandwidth.log"
echo
for name in gpu_tests bandwidth rechunk shuffle_tests; do
    printf '%-14s rc=%s\n' "$name" "${RC[$name]:-not run}"
done
