"""Compile the symmetric-memory transport's kernels for sm_90 without a GPU and compare their
global memory instructions with the NCCL path's kernels (same tile, same flags).

Usage: PYTHONPATH=src python scripts/sm90_compile_symm.py
What it shows: both symm kernels compile with this machine's Triton; step 1 (quantize straight
into the peer picked at run time) keeps the NCCL quantize kernel's 16-byte vector stores (the
pointer if-chain keeps the arguments' alignment), and step 2 stores its row W times; the fp32
op counts of step 2 vs ``_reduce_requant_kernel`` (W = 2 unrolls the row loop once more: one
extra decode's fma + add, nothing else) back the bit-identity the GPU test checks.
Method as scripts/sm90_regs_quant.py (pointers and sizes 16-byte divisible, as 64 KB..256 MB
messages give).
"""
import os
import re
from collections import Counter

os.environ["TRITON_INTERPRET"] = "0"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import catkit.dist.symm_all_reduce as sm  # noqa: E402
import catkit.ops.quant.groupwise as gw  # noqa: E402

PTRS = {"x_ptr": "*bf16", "buf_ptr": "*u8", "meta_ptr": "*fp32", "idx_ptr": "*i16", "obuf_ptr": "*u8",
        "ometa_ptr": "*fp32", "oidx_ptr": "*i16", **{f"R{i}": "*u8" for i in range(8)},
        **{f"O{i}": "*u8" for i in range(8)}}


def compile_one(fn, consts, num_warps):
    params = fn.arg_names
    consts = {n: v for n, v in consts.items() if n in params}
    sig = {p: "constexpr" if p in consts else PTRS.get(p, "i32") for p in params}
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(params)
             if sig[p] != "constexpr" and p not in ("size_key", "rank")}
    return triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps))


def summary(kern) -> str:
    ptx = kern.asm["ptx"]
    mem = Counter(m.group(1) for m in re.finditer(r"\b((?:ld|st)\.global(?:\.[a-z0-9]+)*)", ptx))
    ops = {op: len(re.findall(rf"\b{re.escape(op)}\s", ptx)) for op in ("fma.rn.f32", "add.f32", "mul.f32")}
    return " ".join(f"{k}:{v}" for k, v in sorted(mem.items())) + "  " + " ".join(f"{k}:{v}" for k, v in ops.items())


def main():
    for W in (2, 8):
        for bits, gbits in ((8, 8), (4, 8), (4, 4)):
            for vals, warps in ((4096, 4), (8192, 8)):
                c = dict(G=128, BITS=bits, SPIKE=False, WHOLE=True, VALS=vals, HP=max(1, vals // (512 * warps)))
                r = dict(c, OBITS=gbits, OSPIKE=False)
                kernels = (("symm quantize", sm._symm_quant_kernel, dict(c, META16=False, W=W)),
                           ("nccl quantize", gw._quant_kernel, c),
                           ("symm reduce", sm._symm_reduce_kernel, dict(r, OMETA16=False, W=W)),
                           ("nccl reduce", gw._reduce_requant_kernel, r))
                for k, (name, fn, consts) in enumerate(kernels):
                    tag = f"W={W} int{bits}->{gbits} {vals}/{warps}" if k == 0 else ""
                    print(f"{tag:28s} {name:15s} {summary(compile_one(fn, consts, warps))}", flush=True)


if __name__ == "__main__":
    main()
