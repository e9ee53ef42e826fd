"""Time the delta-rule forward kernels alone per variant x launch option: chunk_fwd_state (STATE_BF16
x KSPLIT x PREFETCH x H_BF16 x BV/warps, ``fwd_sweep_options.state_sweep_options``), chunk_prep (NSB
x PREP_BF16 x BKS/warps, ``fwd_sweep_options.prep_sweep_options``), chunk_fwd_o (BV/warps on an fp32 or a
bf16 h, ``o_sweep_options``), chunk_tsolve (warps) and chunk_intra + chunk_tsolve together against the per-chunk
FUSED variants of chunk_fwd_intra.py (``fwd_sweep_options.intra_sweep_options``: FUSED 1 / 2 x DIAG 0 / 1 x BKS/warps).

Usage (GPU): PYTHONUNBUFFERED=1 PYTHONPATH=src python3 scripts/sweep_delta_fwd_variants.py OUT_DIR
      (CPU):  PYTHONPATH=src SMALL=1 python3 scripts/sweep_delta_fwd_variants.py OUT_DIR   (or --small;
              TRITON_INTERPRET=1, tiny shapes, wall-clock times)
      (regs): PYTHONPATH=src python3 scripts/sweep_delta_fwd_variants.py --regs   (no GPU: every sweep
              option compiled for sm_90a by the installed Triton, via scripts/sm90_regs_delta.py)
BUDGET_S (default 150): stop starting new options past this many seconds (skipped ones are listed).
ONLY (e.g. ONLY=intra): a comma-separated subset of the kernels state, prep, o, tsolve, intra.
A CUDA error (an option that miscompiles into an illegal access) poisons the process: the sweep
records that option as failed and exits with status 3; RESUME=1 then starts a fresh process that
keeps OUT_DIR/sweep-fwd.json's rows and runs only the options not tried yet, e.g.
    until RESUME=$r python3 scripts/sweep_delta_fwd_variants.py OUT; [ $? -ne 3 ]; do r=1; done

For every option (the first rows of each kernel are today's defaults, the GPU-verified baseline):
  * time: the kernel alone (catkit.bench.registry.time_cuda median; ``intra``: chunk_intra + chunk_tsolve for
    the default, the variant's one or two launches otherwise, both through chunk_fwd_intra.intra_solve)
    at B*T = 32K tokens (T = 2048, B = 16 and T = 32768, B = 1, packed as equal-length sequences),
    H = 16, K = V = 128, bf16, on the inputs the real fg2 forward hands it (captured from chunk_fwd's
    launches);
  * check vs the default: its outputs on those inputs against the default option's (rel RMS);
  * check vs fp64: the whole fg2 forward + backward with that option (others at their defaults) on
    packed odd-length sequences (300, 77, 1000 tokens; mild and x30 decay) against the fp64 token
    loop on the same bf16-rounded inputs: o, final state, dq, dk, dv, dg, dbk (bounds 3e-2, dg
    6e-2, or 1.25 x the default options' own error where that is larger);
  * registers / spills of the compiled kernel.
One line per option, OUT_DIR/sweep-fwd.json (rewritten after every option), then per kernel
``BEST_FWD_OPTION=`` a python literal dict(kernel=..., hook=..., option=..., ms=..., default_ms=...,
fastest=...): the fastest correct non-default option by the sum of the two shapes' times (the state
pass: per shape, since its grid differs: STATE_BEST from T = 2048 x 16, STATE_BEST_FEW from
T = 32768 x 1); ``option`` is None unless it beats today's default by more than 1%. To use it: paste
``option`` as that hook (PREP_BEST / O_BEST / TSOLVE_BEST / INTRA_BEST in src/catkit/ops/delta_rule/chunk_fwd.py,
STATE_BEST / STATE_BEST_FEW in chunk_fwd_state.py); it is then tried first. Finally
``PIPELINE`` lines time the whole forward and forward + backward with the defaults and with all
BEST options applied (the backward gains from a bf16 h too).
"""
import json
import os
import sys
import time

import torch

# before triton: SMALL=1 without CUDA turns on the interpreter
from delta_sweep_common import BOUND64, BOUND_DEFAULT, CHECK_LENS, D, DEV, H, SHAPES, SMALL, inputs, print_row

import triton  # noqa: E402

import catkit.ops.delta_rule.chunk_fwd as cf  # noqa: E402
import catkit.ops.delta_rule.chunk_fwd_intra as ci  # noqa: E402
import catkit.ops.delta_rule.chunk_fwd_state as cs  # noqa: E402
import catkit.ops.delta_rule.fwd_sweep_options as fso  # noqa: E402
from catkit.bench.registry import time_cuda  # noqa: E402
from catkit.ops.delta_rule import chunk_fg2_delta_rule  # noqa: E402
from catkit.ops.delta_rule.naive import naive_fg2_delta_rule  # noqa: E402
from catkit.utils.testing import rel_rms  # noqa: E402

BUDGET_S = float(os.environ.get("BUDGET_S", "150"))
NAMES = ("o", "ht", "q", "k", "v", "g", "bk")
KERNELS = {"state": "chunk_fwd_state_kernel", "prep": "chunk_prep_kernel", "o": "chunk_fwd_o_kernel",
           "tsolve": "chunk_tsolve_kernel", "intra": "chunk_intra_kernel"}
ONLY = [w for w in os.environ.get("ONLY", ",".join(KERNELS)).split(",") if w]
PATCH = {"state": "state_options", "prep": "prep_options", "o": "o_options", "tsolve": "tsolve_options",
         "intra": "intra_options"}
HOOKS = {"prep": (cf, "PREP_BEST"), "o": (cf, "O_BEST"), "tsolve": (cf, "TSOLVE_BEST"), "intra": (cf, "INTRA_BEST")}
# output positions in args (intra: P and T, compared on the entries every path writes)
OUTS = {"state": (4, 5, 7), "prep": (4, 5, 6, 7), "o": (4,), "tsolve": (1,), "intra": (4, 5)}
H_ARG = {"state": 5, "o": 3}  # where h sits in the args (H_BF16 options get a bf16 one)


def rounds(opt):
    # FUSED: other reference rows / products at tf32 and P rounded to bf16 after another summation
    # order: within tf32 / bf16 rounding of the default, not bit-close to it
    return bool(opt.get("STATE_BF16") or opt.get("PREP_BF16") or opt.get("H_BF16") or opt.get("FUSED"))


def intra_call(seen, opt):
    """chunk_intra + chunk_tsolve (or the FUSED variant ``opt``) on the captured inputs, as chunk_fwd
    runs it."""
    kernel, grid_fn, args, consts, _ = seen[KERNELS["intra"]]
    pr = dict(DOT_PREC=consts["DOT_PREC"], INV_PREC=consts["INV_PREC"])
    tsolve = [seen[KERNELS["tsolve"]][4]]
    NT = grid_fn({})[0]
    return lambda: ci.intra_solve(args, NT, consts["H"], consts["K"], consts["BT"], pr, [opt], tsolve)


def intra_masks(P, BT):
    """P: lower triangle of each chunk; T: all of it (sequences are whole chunks in the timing)."""
    r = torch.arange(P.shape[0], device=P.device) % BT
    c = torch.arange(BT, device=P.device)
    return (r[:, None] >= c[None, :])[:, None, :].expand(P.shape), None


def kopt(opt):
    return {n: v for n, v in opt.items() if n != "H_BF16"}


def fwd_bwd(fn, x, cu, do, dht):
    """o, final state and the gradients of q, k, v, g, bk for the loss <o, do> + <ht, dht>."""
    xs = {n: t.detach().clone().requires_grad_() for n, t in x.items()}
    o, ht = fn(xs["q"], xs["k"], xs["v"], xs["g"], xs["bk"], cu_seqlens=cu, output_final_state=True)
    grads = torch.autograd.grad([o, ht], [xs[n] for n in NAMES[2:]], [do.to(o.dtype), dht.to(ht.dtype)])
    return (o.detach(), ht.detach()) + tuple(grads)


def capture(x, cu):
    """Run the fg2 forward once with the options it ships with; return chunk_fwd's launches (kernel,
    grid_fn, args, consts, first option) by name, and tsolve's Tm on entry (it works in place).
    INTRA_BEST is off here, so that chunk_intra and chunk_tsolve both launch (a FUSED winner
    replaces them; it is timed again as the intra list's first option, against that pair)."""
    seen, orig, intra_best = {}, cf.launch, cf.INTRA_BEST
    cf.INTRA_BEST = None

    def rec(kernel, grid_fn, args, consts, options):
        seen[kernel.fn.__name__] = (kernel, grid_fn, args, consts, dict(options[0]))
        if kernel is cf.chunk_tsolve_kernel:
            seen["Tm_in"] = args[1].clone()
        return orig(kernel, grid_fn, args, consts, options)

    cf.launch = rec
    try:
        with torch.no_grad():
            chunk_fg2_delta_rule(x["q"], x["k"], x["v"], x["g"], x["bk"], cu_seqlens=cu, output_final_state=True)
    finally:
        cf.launch, cf.INTRA_BEST = orig, intra_best
    return seen


def option_lists():
    NHs = [B * H for _, B in SHAPES]
    lists = dict(state=fso.state_sweep_options(D, NHs, torch.device(DEV)), prep=fso.prep_sweep_options(D, D),
                 o=fso.o_sweep_options(D), tsolve=fso.tsolve_sweep_options(),
                 intra=fso.intra_sweep_options(max(16, triton.next_power_of_2(D)), D))
    lists = {n: v for n, v in lists.items() if n in ONLY}
    if SMALL:  # the interpreter ignores num_warps: one option per distinct computation
        for n, opts in lists.items():
            keep = {}
            for o in opts:
                what = tuple((k, v) for k, v in o.items() if k not in ("num_warps", "num_stages", "DW", "maxnreg",
                                                                     "DMAXNREG"))
                keep.setdefault(what, o)
            lists[n] = list(keep.values())
    return lists


def regs():
    """Registers / stack of every sweep option on sm_90a (K = V = 128, bf16), no GPU needed."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import sm90_regs_delta as r

    global D, H
    D, H = 128, 16
    base = dict(H=16, K=128, V=128, BT=64, BK=128, BC=16, OP_BF16=True, DOT_PREC="tf32", INV_PREC="tf32x3", LEFT=1,
                HAS_H0=True, STORE_FINAL=True, NATIVE=True, STATE_BF16=0, KSPLIT=1, NSB=1, PREP_BF16=0)
    for which, opts in option_lists().items():
        fn = getattr(cf, KERNELS[which])
        for opt in opts:
            if which == "intra" and opt.get("FUSED"):
                fk = ci.chunk_intra_wide_kernel if opt["FUSED"] == 2 else ci.chunk_intra_fused_kernel
                ko = {n: v for n, v in opt.items() if n not in ci.HOST_KEYS + ("num_warps", "num_stages", "maxnreg")}
                off = "tf32" if opt.get("SOLVE_TF32") else base["INV_PREC"]
                line = "fused " + r.usage(fk, {**base, **ko, "STORE_A": 0, "OFF_PREC": off}, opt["num_warps"],
                                          opt.get("maxnreg"))
                if opt.get("DIAG"):
                    d = ci.diag_option(opt)
                    line += ", LEFT=0 pass " + r.usage(cf.chunk_intra_kernel, {**base, "BKS": d["BKS"], "NK": d["NK"],
                                                                               "FAST_EXP": d["FAST_EXP"], "LEFT": 0},
                                                       d["num_warps"], d.get("maxnreg"))
                print(which, opt, line, flush=True)
                continue
            (r.BF16.add if opt.get("H_BF16") else r.BF16.discard)("h")
            o = {n: v for n, v in kopt(opt).items() if n not in ("num_warps", "num_stages")}
            try:
                print(which, opt, r.usage(fn, {**base, **o}, opt["num_warps"]), flush=True)
            except Exception as ex:  # noqa: BLE001
                print(which, opt, "ERROR", type(ex).__name__, str(ex)[:200], flush=True)


def run_option(which, opt, timing, ref_all):
    """Time ``opt`` of kernel ``which`` on every shape's captured inputs; compare with the default."""
    row = {"ms": {}}
    err = 0.0
    kern = None
    for (T, B), (seen, h16) in timing.items():
        ref = ref_all[T, B]
        kernel, grid_fn, args, consts, _ = seen[KERNELS[which]]
        args = list(args)
        if opt.get("H_BF16") and which in H_ARG:
            args[H_ARG[which]] = h16 if which == "state" else ref["h"].to(torch.bfloat16)
        outs = [args[j] for j in OUTS[which]]
        if which == "tsolve":
            outs[0].copy_(seen["Tm_in"])
        else:
            for o in outs:
                o.fill_(float("nan"))
        ko = cf.for_inputs([kopt(opt)], torch.bfloat16, max(16, triton.next_power_of_2(D)))[0]
        call = (intra_call(seen, ko) if which == "intra"
                else lambda: kernel[grid_fn(ko)](*args, **consts, **ko))
        try:
            kern = call()
            if which == "intra":
                nm = ("chunk_intra_wide_kernel" if opt.get("FUSED") == 2 else "chunk_intra_fused_kernel"
                      if opt.get("FUSED") else KERNELS["intra"])
                kern = cf.COMPILED.get(nm)
                pm = intra_masks(outs[0], consts["BT"])[0]
                es = [rel_rms(outs[0][pm].float(), ref[which][0][pm].float()),
                      rel_rms(outs[1].float(), ref[which][1].float())]
            else:
                es = [rel_rms(a.float(), b.float()) for a, b in zip(outs, ref[which])]
            row[f"err_vs_default_T{T}"] = es
            err = max(err, max(es) / BOUND_DEFAULT[rounds(opt)])
            row["ms"][f"T{T}"] = time_cuda(call)
        finally:
            for o, r in zip(outs, ref[which]):  # later kernels read these
                o.copy_(r)
    row.update(n_regs=getattr(kern, "n_regs", None), n_spills=getattr(kern, "n_spills", None))
    return row, err


def check64(which, opt, checks):
    """max over the fp64 checks of error / bound, the whole pass with ``opt`` for ``which``."""
    saved = {n: getattr(cf, n) for n in PATCH.values()}
    setattr(cf, PATCH[which], lambda *a, o=opt: [o])
    if which == "o" and opt.get("H_BF16"):  # the state pass must then hand o a bf16 h
        cf.state_options = lambda *a: [dict(o, H_BF16=1) for o in saved["state_options"](*a)]
    worst, per = 0.0, []
    try:
        for x, cu, do, dht, ref64, bound in checks:
            got = fwd_bwd(chunk_fg2_delta_rule, x, cu, do, dht)
            es = {n: rel_rms(a.double(), b) for n, a, b in zip(NAMES, got, ref64)}
            per.append(max(es.values()))
            worst = max(worst, max(e / bound[n] for n, e in es.items()))
    finally:
        for n, f in saved.items():
            setattr(cf, n, f)
    return worst, per


def pipeline(best, checks):
    """Whole forward and forward + backward times, defaults vs every BEST option applied."""
    x, cu, do, dht = inputs([SHAPES[0][0]] * SHAPES[0][1], seed=2)
    x32, cu32, do32, dht32 = inputs([SHAPES[1][0]] * SHAPES[1][1], seed=2)
    hooks = dict(HOOKS, state=(cs, "STATE_BEST"), state_few=(cs, "STATE_BEST_FEW"))
    old = {k: getattr(m, a) for k, (m, a) in hooks.items()}
    out = {}
    for label, apply in (("default", False), ("best", True)):
        for k, (m, a) in hooks.items():
            # a hook the sweep picked nothing for (not swept, or no winner) keeps what ships
            setattr(m, a, (best.get(k) or old[k]) if apply else old[k])
        cf._CHOSEN.clear()
        try:
            for (T, B), (xx, cc, dd, hh) in zip(SHAPES, ((x, cu, do, dht), (x32, cu32, do32, dht32))):
                def fwd():
                    with torch.no_grad():
                        chunk_fg2_delta_rule(xx["q"], xx["k"], xx["v"], xx["g"], xx["bk"], cu_seqlens=cc)
                out[f"{label}_fwd_T{T}"] = time_cuda(fwd)
                out[f"{label}_fwdbwd_T{T}"] = time_cuda(lambda: fwd_bwd(chunk_fg2_delta_rule, xx, cc, dd, hh))
            errs = []
            for xc, cuc, doc, dhtc, ref64, bound in checks:
                got = fwd_bwd(chunk_fg2_delta_rule, xc, cuc, doc, dhtc)
                errs.append(max(rel_rms(a.double(), b) / bound[n] for n, a, b in zip(NAMES, got, ref64)))
            out[f"{label}_err_over_bound"] = max(errs)
        finally:
            for k, (m, a) in hooks.items():
                setattr(m, a, old[k])
            cf._CHOSEN.clear()
    return out


def main():
    if "--regs" in sys.argv:
        return regs()
    out_dir = next((a for a in sys.argv[1:] if not a.startswith("--")), None)
    if out_dir is None:
        sys.exit(__doc__)
    os.makedirs(out_dir, exist_ok=True)
    t_start = time.time()
    lists = option_lists()
    # inputs the kernels see in the real pass, per timing shape, and the default options' outputs
    timing, ref_all, default_ms, default_opt = {}, {}, {}, {}
    for T, B in SHAPES:
        x, cu, _, _ = inputs([T] * B, seed=2)
        seen = capture(x, cu)
        ref = {}
        for which, name in KERNELS.items():
            kernel, grid_fn, args, consts, first = seen[name]
            ref[which] = [args[i].clone() for i in OUTS[which]]
            default_opt[which, T] = first
            if which not in ONLY:
                continue
            if which == "intra":  # chunk_intra + chunk_tsolve (rewrites P and T with the same values)
                default_ms[which, T] = time_cuda(intra_call(seen, first))
                continue
            default_ms[which, T] = time_cuda(lambda: kernel[grid_fn(first)](*args, **consts, **first))
            if which == "tsolve":  # timing ran it again on its own output: same T (idempotent)
                args[1].copy_(ref[which][0])
        ref["h"] = ref["state"][1]
        h = seen[KERNELS["state"]][2][5]
        timing[T, B] = (seen, torch.empty(h.shape, device=h.device, dtype=torch.bfloat16))
        ref_all[T, B] = ref
    # fp64 references of the whole pass (bf16-rounded inputs), mild and strong decay
    checks = []
    for decay in (1.0, 30.0):
        x, cu, do, dht = inputs(CHECK_LENS, decay=decay, seed=1)
        x64 = {n: t.double() for n, t in x.items()}
        ref64 = fwd_bwd(naive_fg2_delta_rule, x64, cu, do, dht)
        # the default options' own errors: an option may match them (x1.25) where they pass the bound
        got = fwd_bwd(chunk_fg2_delta_rule, x, cu, do, dht)
        bound = {n: max(BOUND64.get(n, BOUND64["*"]), 1.25 * rel_rms(a.double(), b))
                 for n, a, b in zip(NAMES, got, ref64)}
        checks.append((x, cu, do, dht, ref64, bound))
    dev_name = torch.cuda.get_device_name() if DEV == "cuda" else "CPU (interpreter)"
    print(f"sweep_delta_fwd_variants on {dev_name}, triton {triton.__version__}, H={H} K=V={D}; defaults "
          + " ".join(f"{w}@T{T}={ms:.3f}ms" for (w, T), ms in default_ms.items())
          + f"; inputs and references ready in {time.time() - t_start:.1f}s", flush=True)

    rows = []
    done = []  # RESUME: the rows of the earlier runs, kept; their options are not run again
    path = os.path.join(out_dir, "sweep-fwd.json")
    if os.environ.get("RESUME") == "1" and os.path.exists(path):
        with open(path) as f:
            done = [r for r in json.load(f)["rows"] if "skipped" not in r.get("error", "")]
        print(f"RESUME: {len(done)} rows kept from {path}", flush=True)

    def dump():
        with open(path, "w") as f:
            json.dump(dict(device=dev_name, triton=triton.__version__, H=H, K=D, V=D, shapes=SHAPES,
                           default_ms={f"{w}@T{T}": v for (w, T), v in default_ms.items()}, rows=rows), f, indent=1)

    # round robin over the kernels (each list most promising first), so that the time budget
    # cuts the tail of every list rather than a whole kernel
    order = [(which, i, opts[i]) for i in range(max(map(len, lists.values())))
             for which, opts in lists.items() if i < len(opts)]
    for which, i, opt in order:
        prev = [r for r in done if r["kernel"] == which and r["option"] == opt]
        row = prev[0] if prev else dict(kernel=which, option=dict(opt))
        rows.append(row)
        if prev:
            continue
        if time.time() - t_start > BUDGET_S and i > 0:
            row.update(ok=False, error="skipped: time budget")
            print(which, opt, "skipped (BUDGET_S)", flush=True)
            continue
        try:
            r, err = run_option(which, opt, timing, ref_all)
            row.update(r)
            e64, per = check64(which, opt, checks)
            row.update({f"err64_decay{c}": e for c, e in enumerate(per)})
            err = max(err, e64)
            row["ok"] = bool(err <= 1.0)
            row["max_err_over_bound"] = err
        except Exception as ex:  # noqa: BLE001 - out of resources / compile error: record, go on
            row.update(ok=False, error=f"{type(ex).__name__}: {str(ex)[:300]}")
            if "CUDA error" in str(ex):  # the context is gone: every later option would fail too
                dump()
                print(f"{which:6s} {opt} CUDA_ERROR {str(ex)[:120]}; rerun with RESUME=1", flush=True)
                sys.exit(3)
        dump()
        print_row(which, opt, row, 6)

    best = {}

    def pick(which, hook, shapes, cond=lambda r: True):
        # today's default at these shapes is the baseline (default_ms), not a candidate
        good = [r for r in rows if r["kernel"] == which and r["ok"] and len(r.get("ms", {})) == len(SHAPES)
                and cond(r) and any(r["option"] != default_opt[which, T] for T, _ in shapes)]
        base = sum(default_ms[which, T] for T, _ in shapes)
        if not good:
            print(f"BEST_FWD_OPTION=None  # {which} ({hook}): no correct option other than the default")
            return
        r = min(good, key=lambda r: sum(r["ms"][f"T{T}"] for T, _ in shapes))
        ms = sum(r["ms"][f"T{T}"] for T, _ in shapes)
        # only worth a hook when it beats today's default by more than the timing noise (~1%)
        best[hook] = r["option"] if ms < 0.99 * base else None
        print("BEST_FWD_OPTION=" + repr(dict(kernel=KERNELS[which], hook=hook, option=best[hook],
                                             ms=round(ms, 4), default_ms=round(base, 4), fastest=r["option"])))

    if "state" in ONLY:
        pick("state", "state", SHAPES[:1])
        pick("state", "state_few", SHAPES[1:])
    if "prep" in ONLY:
        pick("prep", "prep", SHAPES)
    # chunk_fwd_o on the h the chosen state pass writes (at the full-grid shape's choice)
    hb = int(bool((best.get("state") or {}).get("H_BF16")))
    if "o" in ONLY:
        pick("o", "o", SHAPES, lambda r: int(bool(r["option"].get("H_BF16"))) == hb)
    if "tsolve" in ONLY:
        pick("tsolve", "tsolve", SHAPES)
    if "intra" in ONLY:  # its time includes chunk_tsolve's (default) or replaces it (FUSED)
        pick("intra", "intra", SHAPES)
    print("# apply: chunk_fwd_state.py STATE_BEST = option of hook 'state', STATE_BEST_FEW = of 'state_few';"
          " chunk_fwd.py PREP_BEST / O_BEST / TSOLVE_BEST / INTRA_BEST = of 'prep' / 'o' / 'tsolve' / 'intra'"
          " (None: keep the default)")
    skipped = sum("skipped" in r.get("error", "") for r in rows)
    print(f"sweep_delta_fwd_variants: {sum(r['ok'] for r in rows)}/{len(rows) - skipped} options run correct, "
          f"{skipped} skipped (BUDGET_S), {time.time() - t_start:.1f}s", flush=True)
    try:
        pipe = pipeline(best, checks)
    except Exception as ex:  # noqa: BLE001 - e.g. a CUDA error left by an option: the lines above stand
        pipe = dict(error=f"{type(ex).__name__}: {str(ex)[:300]}")
        print("PIPELINE failed:", pipe["error"], flush=True)
    with open(os.path.join(out_dir, "sweep-fwd-pipeline.json"), "w") as f:
        json.dump(dict(best=best, **pipe), f, indent=1)
    print("PIPELINE " + " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in pipe.items()),
          flush=True)
    print(f"sweep_delta_fwd_variants done in {time.time() - t_start:.1f}s", flush=True)


if __name__ == "__main__":
    main()
