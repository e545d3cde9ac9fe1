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
#   TRITONVL_OPENAI_PORT  also serve the OpenAI-compatible gateway on this port (unset or empty: no
#                         gateway). Refused without TRITONVL_API_KEY unless TRITONVL_OPENAI_HOST is
#                         a loopback address: the gateway must not answer anyone who reaches it.
#   TRITONVL_API_KEY      the gateway's key (from a Secret); the gateway, a child of `tritonvl serve`,
#                         reads it from the environment
#   TRITONVL_OPENAI_HOST  the gateway's address (default 0.0.0.0: a container's loopback is
#                         unreachable from outside it)
#   TRITONVL_ADMIN_KEY    the value of the `tritonvl-admin-key` header (gRPC metadata
#                         `triton-grpc-protocol-tritonvl-admin-key`) that Triton's management APIs
#                         require; letters, digits and . _ ~ - only. Unset: a random key per start,
#                         so nobody can use them.
# Always passed to tritonserver: --model-control-mode=none, and the model-repository, model-config,
# shared-memory, statistics, trace and logging APIs restricted to that header on HTTP and gRPC
# (docs/SECURITY.md). Arguments are passed on to `tritonvl serve`; tritonserver's own go after `--`
# and come after these (a second --model-control-mode there wins; a restricted API cannot be named
# twice, tritonserver refuses that).
set -euo pipefail

die() { echo "tritonvl entrypoint: $*" >&2; exit 2; }

serve_args=() server_args=() after=0
for a in "$@"; do
  if [ "$after" = 0 ] && [ "$a" = "--" ]; then after=1; continue; fi
  if [ "$after" = 0 ]; then serve_args+=("$a"); else server_args+=("$a"); fi
done

args=(--http-port "${TRITONVL_HTTP_PORT:-8000}" --grpc-port "${TRITONVL_GRPC_PORT:-8001}"
      --metrics-port "${TRITONVL_METRICS_PORT:-8002}")
if [ -n "${TRITONVL_MODEL:-}" ]; then args+=(--model "$TRITONVL_MODEL"); fi
if [ -n "${TRITONVL_DEVICE:-}" ]; then args+=(--device "$TRITONVL_DEVICE"); fi
read -r -a sets <<< "${TRITONVL_SET:-}"
for s in "${sets[@]}"; do args+=(--set "$s"); done

if [ -n "${TRITONVL_OPENAI_PORT:-}" ] && [ "$TRITONVL_OPENAI_PORT" != 0 ]; then
  host=${TRITONVL_OPENAI_HOST:-0.0.0.0}
  case "$host" in
    127.*|localhost|::1) ;;
    *) [ -n "${TRITONVL_API_KEY:-}" ] || die "TRITONVL_OPENAI_PORT=$TRITONVL_OPENAI_PORT starts the OpenAI gateway on $host" \
         "without a key, so it would answer anyone: set TRITONVL_API_KEY (from a Secret; clients send" \
         "'Authorization: Bearer <key>'), or TRITONVL_OPENAI_HOST=127.0.0.1, or leave TRITONVL_OPENAI_PORT unset" ;;
  esac
  # `tritonvl serve` binds the gateway to loopback unless told otherwise; the key reaches the gateway
  # as $TRITONVL_API_KEY, inherited, never on a command line.
  args+=(--openai-port "$TRITONVL_OPENAI_PORT" --openai-host "$host")
fi

admin_key=${TRITONVL_ADMIN_KEY:-$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')}
[[ "$admin_key" =~ ^[A-Za-z0-9._~-]+$ ]] || die "TRITONVL_ADMIN_KEY: letters, digits and . _ ~ - only"
restricted=model-repository,model-config,shared-memory,statistics,trace,logging
triton=(--model-control-mode=none
        "--http-restricted-api=$restricted:tritonvl-admin-key=$admin_key"
        "--grpc-restricted-protocol=$restricted:tritonvl-admin-key=$admin_key")

exec tritonvl serve "${args[@]}" "${serve_args[@]}" -- "${triton[@]}" "${server_args[@]}"
