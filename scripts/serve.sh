#!/usr/bin/env bash
# Set up (first time only) and serve: on the embedded tiny model, or `--model DIR`.
# Any `tritonvl serve` option works: --http-port, --grpc-port, --metrics-port, --device, -- <tritonserver args>
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
exec tritonvl serve "$@"
