#!/usr/bin/env bash
# Flash Communication on every visible GPU (2..8) in ONE device call, logs and JSON in OUT_DIR:
#   1. gpu tests:  tests/dist (symmetric-memory transport and one-shot exact path vs NCCL, bit for
#                  bit, on 2 of the GPUs) and tests/test_fast_launch.py
#   2. comm_symm:  NCCL bf16 vs the NCCL-transport and symmetric-memory paths, int8/int6/int4, and
#                  the one-shot exact all-reduce, 8 KB..256 MB; prints the measured
#                  SYMM_FASTER[(world, bits, gather_bits)] and SYMM_EXACT_FASTER[world] entries
#   3. with APPLY=1 those entries are appended to THIS COPY's catkit/dist/flash_all_reduce.py
#      (a device copy: commit them by hand afterwards), so step 4 measures what a user gets
#   4. comm + comm_tp (python -m catkit.bench.comm): every size, the *_auto pass, TP=#GPUs TTFT
# Usage: [APPLY=1] scripts/gpu_comm.sh OUT_DIR        (about 6 minutes on 2 H200s)
# T_TESTS / T_SYMM / T_COMM (default 240 / 300 / 420): each step's time limit in seconds
set -uo pipefail
out=${1:?usage: [APPLY=1] scripts/gpu_comm.sh OUT_DIR}
cd "$(dirname "$0")/.."
mkdir -p "$out"
# no NVLink multicast on the GPU machines (shared/GPU.md)
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 \
    TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NCCL_NVLS_ENABLE=0
status=0
nvidia-smi -L 2>&1 | tee "$out/info.log"
timeout ${T_TESTS:-240} python3 -m pytest -q -s -rs -m gpu -p no:cacheprovider tests/dist tests/test_fast_launch.py \
    > "$out/gpu_tests.log" 2>&1 || status=1
grep -E "passed|failed|error" "$out/gpu_tests.log" | tail -3
timeout ${T_SYMM:-300} python3 -m catkit.bench.comm_symm --out "$out" > "$out/comm_symm.log" 2>&1 || status=1
entries=$(grep -o "SYMM_[A-Z_]*\[[^]]*\] = \[.*\]" "$out/comm_symm.log")
echo "$entries"
if [ "${APPLY:-0}" = 1 ] && [ -n "$entries" ]; then
    { echo; echo "# measured by scripts/gpu_comm.sh on this machine (device copy)"; echo "$entries"; } \
        >> src/catkit/dist/flash_all_reduce.py
    echo "gpu_comm: applied to this copy's flash_all_reduce.py"
fi
timeout ${T_COMM:-420} python3 -m catkit.bench.comm --out "$out" > "$out/comm.log" 2>&1 || status=1
grep -E "measured fallback|Error" "$out/comm.log" | cut -c1-300 | head -3
echo "gpu_comm: done (exit $status); results in $out"
exit $status
