#!/usr/bin/env bash
# The one-command GPU check (bench/gpu_check.py has the stages and what they report).
#
#   bench/gpu_check.sh --prepare      # on a machine with the package index: wheels into .whl/
#   bench/gpu_check.sh [STAGE ...]    # on the GPU machine, no network: bf16 switch compile fp8 lora cache profile (default all)
#
# The GPU machine has torch, transformers, peft and accelerate but not diffusers, msgspec
# or torchao: they are installed from .whl/ into a private folder, never over its packages.
# Results go to $OUT/gpu_check.jsonl (or bench/out/), one JSON line per figure, written as
# they come, so a stage that fails or a run cut short keeps what it had measured.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(diffusers==0.42.1 msgspec==0.22.0 torchao==0.17.0 importlib_metadata==10.2.0)
if [ "${1:-}" = "--prepare" ]; then
    mkdir -p .whl
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
    exit 0
fi
SITE=${GPU_CHECK_SITE:-/tmp/genserve-gpu-site}
if ! python3 -c "import diffusers, msgspec" 2>/dev/null; then
    ls .whl/*.whl >/dev/null 2>&1 || { echo "no .whl/ folder: run bench/gpu_check.sh --prepare first" >&2; exit 2; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
RESULTS_DIR=${OUT:-bench/out}
mkdir -p "$RESULTS_DIR"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
python3 -m bench.gpu_check --stage "${@:-all}" --out "$RESULTS_DIR/gpu_check.jsonl"
