"""Time the split dq/dk/dg backward (chunk_bwd_dqkg_inter + chunk_bwd_dqkg_intra) per launch option.

Usage (GPU): PYTHONPATH=src python3 scripts/sweep_delta_bwd.py OUT_DIR [T]
For each option of one kernel (the other at its default, the first of its list) prints the fg2
fwd+bwd do_bench median at B*T = 32K, H = 16, K = V = 128, bf16, the kernel's registers/spills,
and the largest relative RMS of dq, dk, dv, dg against the default options (same inputs). Writes
OUT_DIR/sweep-delta_bwd.json. The fastest correct option belongs first in
``dqkg_inter_options`` / ``dqkg_intra_options`` (chunk_bwd.py).
"""
import json
import os
import sys

import torch

import catkit.bench.delta_rule as bench
import catkit.ops.delta_rule.chunk_bwd as cb
import catkit.ops.delta_rule.chunk_fwd as cf
from catkit.utils.testing import rel_rms

KEYS = ("q", "k", "v", "g")


def run(x, do):
    xg = bench._with_grad(x, KEYS + ("bk",))
    o = bench._ours()["fg2"](xg)
    return torch.autograd.grad(o, [xg[n] for n in KEYS], do)


def main():
    out = sys.argv[1]
    T = int(sys.argv[2]) if len(sys.argv) > 2 else 2048
    B = bench.TOKENS // T
    x = bench._inputs(B, T)
    do = torch.randn_like(x["v"])
    BK = K = V = bench.D  # power of two
    inter0, intra0 = cb.dqkg_inter_options, cb.dqkg_intra_options
    ref = run(x, do)
    cases = [("inter", o) for o in inter0(BK, K, V)] + [("intra", o) for o in intra0(BK, K)]
    rows = []
    for which, opt in cases:
        cf._CHOSEN.clear()
        cb.dqkg_inter_options = (lambda *a, o=opt: [o]) if which == "inter" else inter0
        cb.dqkg_intra_options = (lambda *a, o=opt: [o]) if which == "intra" else intra0
        row = dict(kernel=which, **opt)
        try:
            got = run(x, do)
            row["err"] = max(rel_rms(a.float(), b.float()) for a, b in zip(got, ref))
            kern = cf.COMPILED[f"chunk_bwd_dqkg_{which}_kernel"]
            row.update(n_regs=getattr(kern, "n_regs", None), spills=getattr(kern, "n_spills", None))
            row["ms"] = bench.time_cuda(lambda: run(x, do))
        except Exception as e:  # noqa: BLE001 - out of resources, compile errors: record and go on
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        print(json.dumps(row), flush=True)
        rows.append(row)
    cb.dqkg_inter_options, cb.dqkg_intra_options = inter0, intra0
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "sweep-delta_bwd.json"), "w") as f:
        json.dump(dict(T=T, B=B, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
