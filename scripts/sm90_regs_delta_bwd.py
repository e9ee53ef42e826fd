"""Registers and spills of the delta-rule dq/dk/dg backward kernels on sm_90a, without a GPU.

Usage: PYTHONPATH=src python scripts/sm90_regs_delta_bwd.py [SRC_ROOT]
Compiles chunk_bwd_dqkg_inter / chunk_bwd_dqkg_intra (K = V = 128, BT = 64, bf16 inputs) for every
launch option with the installed Triton's own ptxas (target cuda:90, 16-byte aligned pointers as the
JIT specializes them) and prints cuobjdump's REG / STACK. Written against Triton 3.9's
ASTSource(fn, signature, constexprs, attrs); the H200 runs Triton 3.6, whose counts came out close
(chunk_intra: 126 here vs 124 there; the fused dqkg kernel: 255 + spills in both), so read these as
estimates and trust the GPU profile's n_regs / n_spills.
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

H, K, V, BT, BK = 16, 128, 128, 64, 128
BF16 = {"q", "k", "do", "dq", "dk"}


def usage(fn, consts, num_warps):
    params = fn.arg_names
    consts = {n: v for n, v in consts.items() if n in params}
    sig = {p: "constexpr" if p in consts else ("fp32" if p == "scale" else "*i32" if p in
           ("chunk_indices", "cu_seqlens") else "*bf16" if p in BF16 else "*fp32") for p in params}
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(params) if sig[p].startswith("*")}
    kern = triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=1))
    tool = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kern.asm["cubin"])
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    return " ".join(w for line in out.splitlines() if "REG" in line for w in line.split()
                    if w.startswith(("REG", "STACK")))


def main():
    base = dict(H=H, K=K, V=V, BT=BT, BC=16, OP_BF16=True, DOT_PREC="tf32")
    for opt in cb.dqkg_inter_options(BK, K, V):
        o = {n: v for n, v in opt.items() if n not in ("num_warps", "num_stages")}
        regs = usage(cb.chunk_bwd_dqkg_inter_kernel, {**base, **o}, opt["num_warps"])
        print("inter", opt, regs, flush=True)
    for opt in cb.dqkg_intra_options(BK, K):
        o = {n: v for n, v in opt.items() if n not in ("num_warps", "num_stages")}
        regs = usage(cb.chunk_bwd_dqkg_intra_kernel, {**base, **o}, opt["num_warps"])
        print("intra", opt, regs, flush=True)


if __name__ == "__main__":
    main()
