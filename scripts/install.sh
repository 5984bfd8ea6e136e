#!/usr/bin/env bash
# Create .venv and install GenServe with the node and test extras.
#
# torch is pinned to 2.13.0. On a machine without an NVIDIA driver we insist on
# the CPU build so that pip never pulls several GB of CUDA wheels by accident:
# a local 2.13.0+cpu wheel (pip's find-links) is used when there is one,
# otherwise PyTorch's CPU index (override with GENSERVE_TORCH_INDEX). With a
# driver present, the regular (CUDA) build of the same version is installed.
set -euo pipefail
VENV=${VENV:-.venv}
TORCH_VERSION=${GENSERVE_TORCH_VERSION:-2.13.0}
PY=${PYTHON:-python3}

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"

if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    $PIP install -q "torch==$TORCH_VERSION"
  else
    report=$(mktemp)
    $PIP install -q --dry-run --no-deps --report "$report" "torch==$TORCH_VERSION" >/dev/null
    if grep -q "+cpu" "$report"; then
      $PIP install -q "torch==$TORCH_VERSION"
    else
      # Ask for the CPU build by its local version label: never the CUDA one by accident.
      index=${GENSERVE_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}
      $PIP install -q "torch==$TORCH_VERSION+cpu" --extra-index-url "$index"
    fi
    rm -f "$report"
  fi
fi
$PIP install -q -e ".[node,test]"
"$VENV/bin/python" - <<'PY'
import torch
print(f"torch {torch.__version__} (cuda available: {torch.cuda.is_available()})")
PY
