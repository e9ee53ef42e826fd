#!/usr/bin/env bash
# GPU check of the whole delta-rule stack (forward and split backward kernels), ONE device call,
# at most $TOTAL seconds (default 400):
#   1. fwd_kernels: every forward intermediate vs fp64 (names the kernel a miscompile comes from)
#   2. gpu_tests:   gpu-marked delta-rule tests (kernels vs references, bf16 at full size)
#   3. profile:     per-kernel profile + registers, fg2 vs fla KDA, T = 2K and 8K
#                   (B*T = 32K, H = 16, K = V = 128, bf16)
#   4. bench:       the delta_rule benchmark suite (--quick: T = 2K only; BENCH_FULL=1 for all T)
#   5. sweep_fwd / sweep_bwd: every launch option of the forward / split backward kernels
#      (not by default: STEPS="sweep_fwd" in a later call)
# Before them, when named in STEPS (variant sweeps, then their winners, all in this copy):
#   0a. sweep_fwd_variants / sweep_bwd_variants: scripts/sweep_delta_{fwd,bwd}_variants.py
#   0b. apply: scripts/apply_sweep_best.py on those logs sets the winning *_BEST hooks, so the
#       steps after it test and time the winners (commit the printed hooks by hand)
#   e.g. STEPS="sweep_fwd_variants apply fwd_kernels gpu_tests bench" BENCH_FULL=1 TOTAL=560
# Usage: [STEPS="fwd_kernels gpu_tests profile bench"] [TOTAL=400] bash scripts/gpu_verify_delta.sh [OUT_DIR]
# Steps run in the order above, each under min(its own limit, what is left of TOTAL); every step
# runs even if an earlier one failed; exit 1 if any failed. fla wheels come from $WHL_DIR, else
# .whl/ here or ../.whl/; without them the fla rows are missing.
# If fwd_kernels or gpu_tests flag the forward, fwd_kernels.log names the first wrong intermediate
# and so the kernel: G -> chunk_cumsum, P (or A / T with P fine) -> chunk_intra, T only ->
# chunk_tsolve, W / QG / KD -> chunk_prep, vn / h / final -> chunk_fwd_state, o only -> chunk_fwd_o.
set -uo pipefail
out=${1:-${OUT:?usage: gpu_verify_delta.sh OUT_DIR}}
cd "$(dirname "$0")/.."
mkdir -p "$out"
export PYTHONUNBUFFERED=1
status=0
start=$SECONDS
total=${TOTAL:-400}
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
steps=" ${STEPS:-fwd_kernels gpu_tests profile bench} "
step() {  # step NAME SECONDS CMD...: run with a time limit, log to $out/NAME.log, remember failure
    local name=$1 secs=$2
    shift 2
    [[ "$steps" == *" $name "* ]] || return 0
    local left=$((total - (SECONDS - start)))
    [ "$left" -lt "$secs" ] && secs=$left
    if [ "$secs" -lt 20 ]; then
        echo "== $name: skipped, ${left}s of TOTAL=$total left" | tee "$out/$name.log"
        status=1
        return 0
    fi
    echo "== $name (${secs}s): $*"
    timeout "$secs" "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - start))s in all"
    [ "$rc" -eq 0 ] || status=1
}
bench_quick=--quick
[ "${BENCH_FULL:-0}" = 1 ] && bench_quick=
for which in fwd bwd; do
    [ -f "scripts/sweep_delta_${which}_variants.py" ] && step "sweep_${which}_variants" 300 \
        python3 "scripts/sweep_delta_${which}_variants.py" "$out/sweep-${which}-variants"
done
logs=$(ls "$out"/sweep_fwd_variants.log "$out"/sweep_bwd_variants.log 2>/dev/null)
[ -n "$logs" ] && step apply 20 python3 scripts/apply_sweep_best.py $logs
step fwd_kernels 60 python3 scripts/check_delta_fwd_kernels.py "$out"
step gpu_tests 150 python3 -m pytest -q -s -rs -m gpu -p no:cacheprovider \
    tests/ops/test_delta_rule.py tests/ops/test_delta_scaled.py tests/layers/test_delta_net.py
step profile 150 python3 scripts/profile_delta_rule.py "$out" 2048,8192 fg2,fla_kda
step bench 420 python3 -m catkit.cli bench delta_rule $bench_quick --out "$out"
step sweep_fwd 400 python3 scripts/sweep_delta_fwd.py "$out" 2048,32768
step sweep_bwd 400 python3 scripts/sweep_delta_bwd.py "$out" 2048
echo "gpu_verify: done (exit $status, ${SECONDS}s); logs in $out"
exit $status
