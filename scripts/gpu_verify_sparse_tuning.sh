#!/usr/bin/env bash
# Next GPU session, branch wip/sparse-tune-by-length: gpu tests + the sparse_attention bench with
# one autotuner per length bucket. Merge into main if every row is correct and no ratio drops.
# Usage: scripts/gpu_verify_sparse_tuning.sh OUT_DIR
set -uo pipefail
out=${1:?usage: scripts/gpu_verify_sparse_tuning.sh OUT_DIR}
cd "$(dirname "$0")/.."
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -m pytest -q -s -m gpu tests/ops/test_sparse_attention.py tests/layers/test_streaming_attention.py \
    tests/reproduce/test_loza.py 2>&1 | tee "$out/gpu_tests.log"
python3 -m catkit.cli bench sparse_attention --out "$out" 2>&1 | tee "$out/bench.log"
