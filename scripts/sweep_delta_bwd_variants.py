"""Time the delta-rule backward kernels alone per variant x launch option: chunk_bwd_dqkg_inter
(SPLIT x AP_BF16 x BKS/BV/warps/maxnreg, ``chunk_bwd.dqkg_inter_sweep_options``), then
chunk_bwd_dqkg_intra (DIAG x BKS/warps, ``dqkg_intra_sweep_options``) and chunk_bwd_dap (BV/warps).

Usage (GPU): PYTHONPATH=src python3 scripts/sweep_delta_bwd_variants.py OUT_DIR
      (CPU):  PYTHONPATH=src SMALL=1 python3 scripts/sweep_delta_bwd_variants.py OUT_DIR   (or --small;
              TRITON_INTERPRET=1, tiny shapes, wall-clock times)
BUDGET_S (default 95): stop starting new options past this many seconds (skipped ones are listed).

For every option (the first of each kernel is today's default, the GPU-verified baseline):
  * time: the kernel alone (triton.testing.do_bench median) at B*T = 32K tokens (T = 2048, B = 16
    and T = 32768, B = 1, packed as equal-length sequences), H = 16, K = V = 128, bf16, on the
    inputs the real fg2 forward + backward hands it (captured from chunk_bwd's launches);
  * check vs the default: its outputs on those inputs against the default option's (rel RMS);
  * check vs fp64: the whole fg2 forward + backward with that option (others at their defaults) on
    packed odd-length sequences (300, 77, 1000 tokens; mild and x30 decay) against the fp64 token
    loop on the same bf16-rounded inputs: dq, dk, dv, dg, dbk (bounds 3e-2, dg 6e-2 as the gpu test,
    or 1.25 x the default options' own error where that is larger);
  * registers / spills of the compiled kernel.
One line per option, OUT_DIR/sweep-bwd.json, then per kernel ``BEST_BWD_OPTION=`` a python literal
dict(kernel=..., option=..., ms=..., default_ms=...): the fastest correct option by the sum of the
two shapes' times. To use it: paste ``option`` as DQKG_INTER_BEST / DQKG_INTRA_BEST / DAP_BEST in
src/catkit/ops/delta_rule/chunk_bwd.py (it is then tried first).
"""
import json
import os
import sys
import time

import torch

# before triton: SMALL=1 without CUDA turns on the interpreter
from delta_sweep_common import BOUND64, BOUND_DEFAULT, CHECK_LENS, D, DEV, H, SHAPES, SMALL, inputs, print_row

import triton  # noqa: E402

from catkit.bench.registry import time_cuda  # noqa: E402
import catkit.ops.delta_rule.chunk_bwd as cb  # noqa: E402
from catkit.ops.delta_rule import chunk_fg2_delta_rule  # noqa: E402
from catkit.ops.delta_rule.naive import naive_fg2_delta_rule  # noqa: E402
from catkit.utils.testing import rel_rms  # noqa: E402

BUDGET_S = float(os.environ.get("BUDGET_S", "95"))
NAMES = ("q", "k", "v", "g", "bk")
KERNELS = {"inter": "chunk_bwd_dqkg_inter_kernel", "intra": "chunk_bwd_dqkg_intra_kernel",
           "dap": "chunk_bwd_dap_kernel"}
PATCH = {"inter": "dqkg_inter_options", "intra": "dqkg_intra_options", "dap": "dap_options"}
OUTS = {"inter": (11, 12, 13), "intra": (7, 8, 9), "dap": (8, 9, 10)}  # output positions in args


def fwd_bwd(fn, x, cu, do):
    xs = {n: t.detach().clone().requires_grad_() for n, t in x.items()}
    o = fn(xs["q"], xs["k"], xs["v"], xs["g"], xs["bk"], cu_seqlens=cu)[0]
    return torch.autograd.grad(o, [xs[n] for n in NAMES], do.to(o.dtype))


def capture(x, cu, do):
    """Run the fg2 forward + backward once with the default options; return chunk_bwd's launches
    (kernel, grid_fn, args, consts) by name."""
    seen, orig = {}, cb.launch

    def rec(kernel, grid_fn, args, consts, options):
        seen[kernel.fn.__name__] = (kernel, grid_fn, args, consts)
        return orig(kernel, grid_fn, args, consts, options)

    cb.launch = rec
    try:
        fwd_bwd(chunk_fg2_delta_rule, x, cu, do)
    finally:
        cb.launch = orig
    return seen


def bench(fn):
    # CUDA events (do_bench median) on a GPU; on the CPU (interpreter) a 1 + 3-call wall clock
    return time_cuda(fn, warmup=1, rep=3)


def option_lists():
    BK = max(16, triton.next_power_of_2(D))
    lists = dict(inter=cb.dqkg_inter_sweep_options(BK, D, D), intra=cb.dqkg_intra_sweep_options(BK, D),
                 dap=cb.dap_options(D) + [dict(BV=min(64, BK), num_warps=8, num_stages=1)])
    if SMALL:  # the interpreter ignores num_warps / maxnreg: one option per distinct computation
        for n, opts in lists.items():
            keep = {}
            for o in opts:
                what = tuple((k, v) for k, v in o.items() if k not in ("num_warps", "num_stages", "maxnreg"))
                keep.setdefault(what, o)
            lists[n] = list(keep.values())
    return lists


def main():
    out_dir = next((a for a in sys.argv[1:] if not a.startswith("--")), None)
    if out_dir is None:
        sys.exit(__doc__)
    t_start = time.time()
    lists = option_lists()
    # inputs the kernels see in the real pass, per timing shape, and the default options' outputs
    timing = {}
    for T, B in SHAPES:
        x, cu, do, _ = inputs([T] * B, seed=2)
        seen = capture(x, cu, do)
        ref = {}
        for which, name in KERNELS.items():
            kernel, grid_fn, args, consts = seen[name]
            if which == "intra":  # it reads the partial dG in dg that it overwrites: keep a copy
                dg_in = args[9].clone()
            opt = lists[which][0]
            kernel[grid_fn(opt)](*args, **consts, **opt)
            ref[which] = [args[i].clone() for i in OUTS[which]]
        timing[T, B] = (seen, ref, dg_in)
    # fp64 references of the whole pass (bf16-rounded inputs), mild and strong decay
    checks = []
    for decay in (1.0, 30.0):
        x, cu, do, _ = inputs(CHECK_LENS, decay=decay, seed=1)
        x64 = {n: t.double() for n, t in x.items()}
        ref64 = fwd_bwd(naive_fg2_delta_rule, x64, cu, do)
        # the default options' own errors: an option may match them (x1.25) where they pass the bound
        got = fwd_bwd(chunk_fg2_delta_rule, x, cu, do)
        bound = {n: max(BOUND64.get(n, BOUND64["*"]), 1.25 * rel_rms(a.double(), b))
                 for n, a, b in zip(NAMES, got, ref64)}
        checks.append((x, cu, do, ref64, bound))
    print(f"sweep_delta_bwd_variants on {torch.cuda.get_device_name() if DEV == 'cuda' else 'CPU (interpreter)'}, "
          f"triton {triton.__version__}, H={H} K=V={D}; inputs and references ready in "
          f"{time.time() - t_start:.1f}s", flush=True)

    rows = []
    # round robin over the kernels (each list most promising first), so that the time budget
    # cuts the tail of every list rather than a whole kernel
    order = [(which, i, opts[i]) for i in range(max(map(len, lists.values())))
             for which, opts in lists.items() if i < len(opts)]
    for which, i, opt in order:
        row = dict(kernel=which, option=dict(opt))
        rows.append(row)
        if time.time() - t_start > BUDGET_S and i > 0:
            row.update(ok=False, error="skipped: time budget")
            print(which, opt, "skipped (BUDGET_S)", flush=True)
            continue
        try:
            err = 0.0
            row["ms"] = {}
            for (T, B), (seen, ref, dg_in) in timing.items():
                kernel, grid_fn, args, consts = seen[KERNELS[which]]
                outs = [args[j] for j in OUTS[which]]
                for o in outs:
                    o.fill_(float("nan"))
                if which == "intra":  # its inputs as the default inter option left them
                    args[5].copy_(ref["inter"][0])
                    args[6].copy_(ref["inter"][1])
                    args[9].copy_(dg_in)
                try:
                    kern = kernel[grid_fn(opt)](*args, **consts, **opt)
                    es = [rel_rms(a.float(), b.float()) for a, b in zip(outs, ref[which])]
                    row[f"err_vs_default_T{T}"] = es
                    # either side's bf16 / tf32 rounding counts: the default may be a rounding variant
                    rounds = any(o.get("AP_BF16") or o.get("DIAG") for o in (opt, lists[which][0]))
                    err = max(err, max(es) / BOUND_DEFAULT[rounds])
                    row["ms"][f"T{T}"] = bench(lambda: kernel[grid_fn(opt)](*args, **consts, **opt))
                finally:
                    for o, r in zip(outs, ref[which]):  # later kernels read dap's dA / dP
                        o.copy_(r)
            row.update(n_regs=getattr(kern, "n_regs", None), n_spills=getattr(kern, "n_spills", None))
            # the whole pass against fp64, with this option alone for this kernel
            orig = getattr(cb, PATCH[which])
            setattr(cb, PATCH[which], lambda *a, o=opt: [o])
            try:
                for c, (x, cu, do, ref64, bound) in enumerate(checks):
                    got = fwd_bwd(chunk_fg2_delta_rule, x, cu, do)
                    es = {n: rel_rms(a.double(), b) for n, a, b in zip(NAMES, got, ref64)}
                    row[f"err64_decay{c}"] = max(es.values())
                    err = max(err, max(e / bound[n] for n, e in es.items()))
            finally:
                setattr(cb, PATCH[which], orig)
            row["ok"] = bool(err <= 1.0)
            row["max_err_over_bound"] = err
        except Exception as ex:  # noqa: BLE001 - out of resources / compile error: record, go on
            row.update(ok=False, error=f"{type(ex).__name__}: {str(ex)[:300]}")
        print_row(which, opt, row, 5)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "sweep-bwd.json"), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name() if DEV == "cuda" else "cpu",
                       triton=triton.__version__, H=H, K=D, V=D, shapes=SHAPES, rows=rows), f, indent=1)
    for which in lists:
        mine = [r for r in rows if r["kernel"] == which]  # the default comes first
        good = [r for r in mine if r["ok"] and len(r.get("ms", {})) == len(SHAPES)]
        if not good:
            print(f"BEST_BWD_OPTION=None  # {which}: no correct option")
            continue
        best = min(good, key=lambda r: sum(r["ms"].values()))
        base = sum(mine[0].get("ms", {}).values()) if mine[0]["ok"] else float("nan")
        print("BEST_BWD_OPTION=" + repr(dict(kernel=KERNELS[which], option=best["option"],
                                             ms=round(sum(best["ms"].values()), 4), default_ms=round(base, 4))))
    skipped = sum("skipped" in r.get("error", "") for r in rows)
    print(f"sweep_delta_bwd_variants: {sum(r['ok'] for r in rows)}/{len(rows) - skipped} options run correct, "
          f"{skipped} skipped (BUDGET_S), {time.time() - t_start:.1f}s", flush=True)


if __name__ == "__main__":
    main()
