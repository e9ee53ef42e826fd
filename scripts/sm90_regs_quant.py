"""Registers, spills and memory instructions of the quant kernels on sm_90a, without a GPU.

Usage: PYTHONPATH=src python scripts/sm90_regs_quant.py [G] [filter]
Compiles ``_quant_kernel`` / ``_dequant_kernel`` / ``_reduce_requant_kernel`` (groupwise.py) with
this machine's Triton for every (values per program, warps) in ``TUNE_CONFIGS``, bf16 message,
fp32 metadata, 16-byte aligned pointers and sizes (as the all-reduce's 64/256 MB messages give),
and prints per kernel variant: REG / STACK (cuobjdump), the global loads / stores in the PTX by
width (``ld.global.v4.b32`` = 16 bytes), and how many layout conversions (``convert_layout``, a
trip through shared memory or shuffles) the TTGIR kept. Estimates only: the GPU's Triton (3.6)
may differ by a few registers; timings are the truth (scripts/sweep_quant.py).
Method as scripts/sm90_regs_delta.py. Filter: substring of the printed variant name.
"""
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter

os.environ["TRITON_INTERPRET"] = "0"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import catkit.ops.quant.groupwise as gw  # noqa: E402

PTRS = {"x_ptr": "*bf16", "out_ptr": "*bf16", "buf_ptr": "*u8", "obuf_ptr": "*u8", "meta_ptr": "*fp32",
        "ometa_ptr": "*fp32", "idx_ptr": "*i16", "oidx_ptr": "*i16"}


def compile_one(fn, consts, num_warps):
    params = fn.arg_names
    consts = {n: v for n, v in consts.items() if n in params}
    sig = {p: "constexpr" if p in consts else PTRS.get(p, "i32") for p in params}
    # pointers and integer sizes divisible by 16 (what Triton specializes at launch for such sizes)
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(params)
             if sig[p] != "constexpr" and p != "size_key"}
    return triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps))


def report(kern):
    tool = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kern.asm["cubin"])
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout
    res = " ".join(w for line in out.splitlines() if "REG" in line for w in line.split()
                   if w.startswith(("REG", "STACK")))
    # static SASS instructions (no loops but the reduce's row loop): x warps / VALS = warp-instructions
    # a value; an H200 issues ~1e12 warp-instructions/s, so a quantize at 4.8 TB/s (~3 B a value)
    # affords about 0.65 a value
    n_sass = len(re.findall(r"/\*[0-9a-f]{4}\*/", sass))
    ptx = kern.asm["ptx"]
    mem = Counter(m.group(1) for m in re.finditer(r"\b((?:ld|st)\.global(?:\.[a-z0-9]+)*)", ptx))
    conv = kern.asm["ttgir"].count("ttg.convert_layout")
    smem = kern.metadata.shared
    return f"{res} sass={n_sass} cvt_layout={conv} smem={smem} " + " ".join(f"{k}:{v}" for k, v in sorted(mem.items()))


def variants(G):
    lay = dict(G=G)
    for bits in (8, 4):
        for spike in (False, True):
            tag = f"b{bits}{'s' if spike else ''}"
            yield f"quant.{tag}", gw._quant_kernel, dict(lay, BITS=bits, SPIKE=spike, WHOLE=True)
            yield f"dequant.{tag}", gw._dequant_kernel, dict(lay, BITS=bits, SPIKE=spike, REDUCE=False, WHOLE=True)
            yield f"reduce_requant.{tag}", gw._reduce_requant_kernel, dict(lay, BITS=bits, SPIKE=spike, OBITS=bits,
                                                                           OSPIKE=spike, WHOLE=True)
        yield f"quant.b{bits}.masked", gw._quant_kernel, dict(lay, BITS=bits, SPIKE=False, WHOLE=False)


def main():
    G = int(sys.argv[1]) if len(sys.argv) > 1 else 128
    only = sys.argv[2] if len(sys.argv) > 2 else ""
    for name, fn, consts in variants(G):
        if only not in name:
            continue
        for vals, warps in gw.TUNE_CONFIGS:
            try:
                r = report(compile_one(fn, dict(consts, **gw._config(vals, warps).kwargs), warps))
            except Exception as e:  # a config that does not compile is reported, not fatal
                r = f"FAILED {type(e).__name__}: {str(e)[:200]}"
            print(f"{name:24s} VALS={vals:5d} warps={warps} {r}", flush=True)


if __name__ == "__main__":
    main()
