"""Registers and spills of the delta-rule kernels on sm_90a, without a GPU.

Usage: PYTHONPATH=src python scripts/sm90_regs_delta.py [SRC_ROOT] [intra,tsolve,fused,prep,state,o,inter,dqkg_intra]
Compiles each forward kernel (chunk_intra / chunk_tsolve / chunk_prep / chunk_fwd_state /
chunk_fwd_o; ``fused``: chunk_fwd_intra's per-chunk kernels at every FUSED option of
fwd_sweep_options.intra_sweep_options) and the split dq/dk/dg backward (chunk_bwd_dqkg_inter / _intra) for every launch
option with the installed Triton's own ptxas (target cuda:90, 16-byte aligned pointers as the JIT
specializes them; K = V = 128, BT = 64, bf16 inputs) and prints cuobjdump's REG / STACK.
Estimates only: the H200 runs Triton 3.6, whose counts came out within a few registers of these;
trust the GPU profile's n_regs / n_spills. INV_PREC=tf32 in the environment shows what the
tf32x3 inverse products cost.
"""
import os
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, sys.argv[1] if len(sys.argv) > 1 else "src")
import catkit.ops.delta_rule.chunk_bwd as cb  # noqa: E402
import catkit.ops.delta_rule.chunk_fwd as cf  # noqa: E402
import catkit.ops.delta_rule.chunk_fwd_intra as ci  # noqa: E402
import catkit.ops.delta_rule.fwd_sweep_options as fso  # noqa: E402

H, K, V, BT, BK = 16, 128, 128, 64, 128
# bf16 tensors on the bf16 path (P and vn included); every other pointer is fp32
BF16 = {"q", "k", "v", "W", "U", "QG", "KD", "o", "P", "vn", "do", "dq", "dk"}
I32 = {"chunk_indices", "cu_seqlens", "chunk_offsets"}


def usage(fn, consts, num_warps, maxnreg=None):
    params = fn.arg_names
    consts = {n: v for n, v in consts.items() if n in params}
    sig = {p: "constexpr" if p in consts else ("fp32" if p == "scale" else "*i32" if p in I32
           else "*bf16" if p in BF16 else "*fp32") for p in params}
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(params) if sig[p].startswith("*")}
    kern = triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=1, **({"maxnreg": maxnreg} if maxnreg else {})))
    tool = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kern.asm["cubin"])
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    return " ".join(w for line in out.splitlines() if "REG" in line for w in line.split()
                    if w.startswith(("REG", "STACK")))


def main():
    only = set(sys.argv[2].split(",")) if len(sys.argv) > 2 else None
    base = dict(H=H, K=K, V=V, BT=BT, BK=BK, BC=16, OP_BF16=True, DOT_PREC="tf32",
                INV_PREC=os.environ.get("INV_PREC", "tf32x3"), HAS_H0=True, STORE_FINAL=True,
                # the forward variants' switches at their defaults (a constexpr left out would be
                # typed as a pointer here); scripts/sweep_delta_fwd_variants.py --regs covers the rest
                STATE_BF16=0, KSPLIT=1, NATIVE=True, NSB=1, PREP_BF16=0, LEFT=1, DIAG=0, STORE_A=0,
                OFF_PREC=os.environ.get("INV_PREC", "tf32x3"))
    fused = [o for o in fso.intra_sweep_options(BK, K) if o.get("FUSED")]
    kernels = (("intra", cf.chunk_intra_kernel, cf.intra_options(BK, K)),
               ("tsolve", cf.chunk_tsolve_kernel, [dict(num_warps=4), dict(num_warps=8)]),
               ("fused", ci.chunk_intra_fused_kernel, [o for o in fused if o["FUSED"] == 1]),
               ("fused", ci.chunk_intra_wide_kernel, [o for o in fused if o["FUSED"] == 2]),
               ("prep", cf.chunk_prep_kernel, cf.prep_options(K, V)),
               ("state", cf.chunk_fwd_state_kernel, [dict(o, PREFETCH=p) for p in (True, False)
                                                       for o in cf.vtile_options(V)]),
               ("o", cf.chunk_fwd_o_kernel, cf.vtile_options(V)),
               ("inter", cb.chunk_bwd_dqkg_inter_kernel, cb.dqkg_inter_options(BK, K, V)),
               ("dqkg_intra", cb.chunk_bwd_dqkg_intra_kernel, cb.dqkg_intra_options(BK, K)))
    for name, fn, options in kernels:
        if only is not None and name not in only:
            continue
        for opt in options:
            o = {n: v for n, v in opt.items() if n not in ("num_warps", "num_stages", "maxnreg") + ci.HOST_KEYS}
            if opt.get("SOLVE_TF32"):
                o["OFF_PREC"] = "tf32"
            print(name, opt, usage(fn, {**base, **o}, opt["num_warps"], opt.get("maxnreg")), flush=True)


if __name__ == "__main__":
    main()
