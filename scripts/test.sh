#!/usr/bin/env bash
# Set up (first time only) and run the whole test suite against real tritonservers.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
exec python3 -m pytest -q --durations=20 "$@"
