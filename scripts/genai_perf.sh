#!/usr/bin/env bash
# genai-perf against the ensemble: TTFT, inter-token latency, output tokens/s, request latency.
#
#   bash scripts/genai_perf.sh [HOST:GRPC_PORT] [-- extra genai-perf profile arguments]
#
# Runs (documented in docs/CAPACITY.md):
#   HF_HUB_OFFLINE=1 genai-perf profile -m qwen2_5_vl --backend tensorrtllm --endpoint-type kserve \
#     --streaming -u HOST:PORT --tokenizer MODEL_DIR --synthetic-input-tokens-mean 64 \
#     --synthetic-input-tokens-stddev 0 --output-tokens-mean 32 --extra-inputs ignore_eos:true \
#     --concurrency 4 --measurement-interval 4000 --artifact-dir ARTIFACTS
# genai-perf's tensorrtllm backend sends text_input, max_tokens, stream, exclude_input_in_output as
# [1, 1] tensors: text only. Image requests: `python scripts/perf.py run --mode stream`.
#
# Environment: TOKENIZER (a local model directory; default $TRITONVL_MODEL, else the embedded tiny
# model), CONCURRENCY (4), INPUT_TOKENS (64), OUTPUT_TOKENS (32), MEASUREMENT_MS (4000),
# ARTIFACTS (genai-perf-artifacts), GENAI_PERF_VENV (~/.cache/tritonvl/genai-perf-venv).
# genai-perf needs numpy 2, the Triton stub numpy<2: it lives in its own venv, created on first use;
# it drives the perf_analyzer of this interpreter's tritonclient 2.51 (scripts/env.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
URL=${1:-localhost:8001}
[ $# -gt 0 ] && shift
[ "${1:-}" = "--" ] && shift
VENV=${GENAI_PERF_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/tritonvl/genai-perf-venv}
if [ ! -x "$VENV/bin/genai-perf" ]; then
  echo "== installing genai-perf 0.0.16 into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "genai-perf==0.0.16"
fi
source scripts/env.sh
command -v perf_analyzer >/dev/null || { echo "no perf_analyzer: run scripts/setup.sh" >&2; exit 1; }
if [ -z "${TOKENIZER:-}" ]; then
  TOKENIZER=${TRITONVL_MODEL:-$(python3 -c 'from tritonvl.handlers.tiny_model import ensure_default_model as d; print(d())')}
fi
set -x
HF_HUB_OFFLINE=1 "$VENV/bin/genai-perf" profile -m qwen2_5_vl --backend tensorrtllm --endpoint-type kserve \
  --streaming -u "$URL" --tokenizer "$TOKENIZER" \
  --synthetic-input-tokens-mean "${INPUT_TOKENS:-64}" --synthetic-input-tokens-stddev 0 \
  --output-tokens-mean "${OUTPUT_TOKENS:-32}" --extra-inputs ignore_eos:true \
  --concurrency "${CONCURRENCY:-4}" --measurement-interval "${MEASUREMENT_MS:-4000}" \
  --artifact-dir "${ARTIFACTS:-genai-perf-artifacts}" "$@"
