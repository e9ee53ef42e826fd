"""Time the delta-rule forward per launch option of each kernel (the others at their defaults).

Usage (GPU): PYTHONPATH=src python3 scripts/sweep_delta_fwd.py OUT_DIR [T,...]
For each option of chunk_intra, chunk_prep, chunk_fwd_state (both STATE_PREFETCH settings) and
chunk_fwd_o prints the fg2 forward do_bench median at B*T = 32K, H = 16, K = V = 128, bf16 (default
T = 2048,32768: the state pass has few programs at 32K), the kernel's registers/spills, and the
relative RMS of o against the default options (same inputs). Writes OUT_DIR/sweep-delta_fwd.json.
The fastest correct option belongs first in ``intra_options`` / ``prep_options`` /
``vtile_options`` (chunk_fwd.py), or STATE_PREFETCH (chunk_fwd_state.py) flipped; the variants
behind constexpr switches are timed by sweep_delta_fwd_variants.py.
"""
import json
import os
import sys

import torch

import catkit.bench.delta_rule as bench
import catkit.ops.delta_rule.chunk_fwd as cf
from catkit.utils.testing import rel_rms


def run(x):
    with torch.no_grad():
        return bench._ours()["fg2"](x)


def main():
    out = sys.argv[1]
    lengths = [int(t) for t in (sys.argv[2] if len(sys.argv) > 2 else "2048,32768").split(",")]
    K = V = bench.D
    BK = K
    saved = dict(intra=cf.intra_options, prep=cf.prep_options, state=cf.state_options,
                 o=cf.vtile_options)
    rows = []
    for T in lengths:
        B = bench.TOKENS // T
        x = bench._inputs(B, T)
        cf._CHOSEN.clear()
        ref = run(x)
        base_ms = bench.time_cuda(lambda: run(x))
        print(json.dumps(dict(T=T, default_ms=base_ms)), flush=True)
        # pinned before any override: state_options reads the module's vtile_options
        state0 = saved["state"](V, B * bench.H, x["q"].device)
        cases = [("intra", o) for o in saved["intra"](BK, K)]
        cases += [("prep", o) for o in saved["prep"](K, V)]
        cases += [("state", dict(o, PREFETCH=p)) for p in (True, False) for o in cf.vtile_options(V)]
        cases += [("o", o) for o in saved["o"](V)]
        names = dict(intra="chunk_intra_kernel", prep="chunk_prep_kernel",
                     state="chunk_fwd_state_kernel", o="chunk_fwd_o_kernel")
        for which, opt in cases:
            cf._CHOSEN.clear()
            cf.intra_options = (lambda *a, o=opt: [o]) if which == "intra" else saved["intra"]
            cf.prep_options = (lambda *a, o=opt: [o]) if which == "prep" else saved["prep"]
            cf.state_options = (lambda *a, o=opt: [o]) if which == "state" else (lambda *a: state0)
            # chunk_fwd_o takes vtile_options directly (the state pass has its own list)
            cf.vtile_options = (lambda *a, o=opt: [o]) if which == "o" else saved["o"]
            row = dict(T=T, kernel=which, **opt)
            try:
                got = run(x)
                row["err"] = rel_rms(got.float(), ref.float())
                kern = cf.COMPILED[names[which]]
                row.update(n_regs=getattr(kern, "n_regs", None), spills=getattr(kern, "n_spills", None))
                row["ms"] = bench.time_cuda(lambda: run(x))
            except Exception as e:  # noqa: BLE001 - out of resources, compile errors: record, go on
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            print(json.dumps(row), flush=True)
            rows.append(row)
        for n, f in saved.items():
            setattr(cf, {"intra": "intra_options", "prep": "prep_options", "state": "state_options",
                         "o": "vtile_options"}[n], f)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "sweep-delta_fwd.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
