#!/usr/bin/env bash
# The README's main job: install (first run only), then run the demo workload on
# an embedded local Ray. Extra arguments go to examples/demo.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup
export RAY_USAGE_STATS_ENABLED=0
exec .venv/bin/python examples/demo.py "$@"
