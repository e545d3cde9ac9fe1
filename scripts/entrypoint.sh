#!/usr/bin/env bash
# The containers' entrypoint (Dockerfile.triton, Dockerfile.ascend, deploy/): `tritonvl serve`
# configured from environment variables. `exec`, so that the runtime's SIGTERM reaches
# `tritonvl serve`, which forwards it to tritonserver (drain, then exit; docs/DEPLOY.md).
#
#   TRITONVL_MODEL        Hugging Face model directory (unset: the embedded tiny random model)
#   TRITONVL_DEVICE       cpu | cuda | npu (unset: what the instance groups say)
#   TRITONVL_SET          whitespace-separated MODEL.KEY=VALUE overrides, each a `--set`
#                         (e.g. "llm.instance_kind=KIND_GPU llm.kv_cache_bytes=21474836480")
#   TRITONVL_HTTP_PORT, TRITONVL_GRPC_PORT, TRITONVL_METRICS_PORT   (8000, 8001, 8002)
#   TRITONVL_OPENAI_PORT  also serve the OpenAI-compatible gateway on this port
# Arguments are passed on to `tritonvl serve`; tritonserver's own go after `--`.
set -euo pipefail

args=(--http-port "${TRITONVL_HTTP_PORT:-8000}" --grpc-port "${TRITONVL_GRPC_PORT:-8001}"
      --metrics-port "${TRITONVL_METRICS_PORT:-8002}")
if [ -n "${TRITONVL_MODEL:-}" ]; then args+=(--model "$TRITONVL_MODEL"); fi
if [ -n "${TRITONVL_DEVICE:-}" ]; then args+=(--device "$TRITONVL_DEVICE"); fi
read -r -a sets <<< "${TRITONVL_SET:-}"
for s in "${sets[@]}"; do args+=(--set "$s"); done
if [ -n "${TRITONVL_OPENAI_PORT:-}" ]; then args+=(--openai-port "$TRITONVL_OPENAI_PORT"); fi

exec tritonvl serve "${args[@]}" "$@"
