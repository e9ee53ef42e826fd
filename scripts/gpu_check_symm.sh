#!/usr/bin/env bash
# Flash Communication over torch symmetric memory on 2 GPUs: the bit-for-bit GPU test against the
# NCCL transport, then the timing (NCCL bf16 vs flash over NCCL vs flash over symmetric memory,
# int8 / int6 / int4, 64 KB..256 MB x4 apart), JSON + logs in OUT_DIR. Expected < 3 minutes
# (one 4096/4 tile everywhere, shared by the test and the timing); hard caps 150 s + 200 s.
# Usage: scripts/gpu_check_symm.sh OUT_DIR [--tune]     (--tune: autotune tiles; slower start)
set -uo pipefail
out=${1:?usage: scripts/gpu_check_symm.sh OUT_DIR [--tune]}
shift
cd "$(dirname "$0")/.."
mkdir -p "$out"
# no NVLink multicast on the GPU machines (shared/GPU.md): barriers use the peer-to-peer kernel
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 \
    TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NCCL_NVLS_ENABLE=0
status=0
start=$(date +%s)
{ nvidia-smi -L; nvidia-smi topo -m; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } \
    2>&1 | tee "$out/info.log"
timeout 150 python3 -m pytest -q -m gpu tests/dist/test_symm_all_reduce.py -rs -s 2>&1 | tee "$out/gpu_test.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "gpu_check_symm: test done after $(( $(date +%s) - start )) s" | tee -a "$out/gpu_test.log"
timeout 200 python3 -m catkit.bench.comm_symm --quick --out "$out" "$@" 2>&1 | tee "$out/bench.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "gpu_check_symm: done after $(( $(date +%s) - start )) s (exit $status); results in $out"
exit $status
