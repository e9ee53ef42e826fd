#!/usr/bin/env bash
# GPU check of the split dq/dk/dg backward (branch wip/delta-bwd-split), one device call:
#   1. gpu-marked delta-rule tests (kernel vs references, bf16 at full size)
#   2. per-kernel profile, fg2 vs fla KDA, T = 2K and 32K (B*T = 32K, H = 16, K = V = 128, bf16)
#   3. the delta_rule benchmark suite
#   4. sweep: every launch option of the two new kernels (scripts/sweep_delta_bwd.py); not by default
# Usage: [STEPS="gpu_tests profile bench sweep"] bash scripts/gpu_verify_delta_bwd.sh [OUT_DIR]
# (default OUT_DIR: $OUT; default STEPS: gpu_tests profile bench, at most 560 s in all). fla wheels are taken from
# $WHL_DIR, else .whl/ here or ../.whl/; without them the fla rows are skipped. Exit status is 1
# if any step failed; every step runs anyway, each under its own time limit.
set -uo pipefail
out=${1:-${OUT:?usage: gpu_verify_delta_bwd.sh OUT_DIR}}
cd "$(dirname "$0")/.."
mkdir -p "$out"
export PYTHONUNBUFFERED=1
status=0
whl=${WHL_DIR:-}
for d in .whl ../.whl; do
    [ -z "$whl" ] && ls "$d"/fla_core-*.whl >/dev/null 2>&1 && whl=$d
done
site=""
if [ -n "$whl" ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$whl"/fla_core-0.6.0-py3-none-any.whl \
        "$whl"/flash_linear_attention-0.6.0-py3-none-any.whl 2>&1 | tee "$out/pip.log"; then
    site=/tmp/site:
else
    echo "gpu_verify: no fla wheels installed (WHL_DIR=${whl:-unset}); fla rows will be missing" | tee -a "$out/pip.log"
fi
export PYTHONPATH="${site}$PWD/src"
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  git log -1 --oneline 2>/dev/null || cat COMMIT 2>/dev/null  # a git-archive copy carries COMMIT
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } \
    2>&1 | tee "$out/env.log"
steps=" ${STEPS:-gpu_tests profile bench} "
step() {  # step NAME SECONDS CMD...: run with a time limit, log to $out/NAME.log, remember failure
    local name=$1 secs=$2
    shift 2
    [[ "$steps" == *" $name "* ]] || return 0
    echo "== $name: $*"
    timeout "$secs" "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc"
    [ "$rc" -eq 0 ] || status=1
}
step gpu_tests 180 python3 -m pytest -q -s -rs -m gpu -p no:cacheprovider \
    tests/ops/test_delta_rule.py tests/layers/test_delta_net.py
step profile 180 python3 scripts/profile_delta_rule.py "$out" 2048,32768 fg2,fla_kda
step bench 200 python3 -m catkit.cli bench delta_rule --out "$out"
step sweep 400 python3 scripts/sweep_delta_bwd.py "$out" 2048
echo "gpu_verify: done (exit $status); logs in $out"
exit $status
