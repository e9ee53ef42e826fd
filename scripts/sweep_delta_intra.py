"""Time chunk_intra (delta-rule forward: A, P, diagonal-block inverses) per (BKS, num_warps, FAST_EXP).

Usage (GPU): PYTHONPATH=src python3 scripts/sweep_delta_intra.py OUT_DIR
      (CPU):  PYTHONPATH=src SMALL=1 python3 scripts/sweep_delta_intra.py OUT_DIR   (or --small;
              runs under TRITON_INTERPRET=1 with tiny shapes, wall-clock times)

For every option of ``sweep_options`` below (BKS 16/32 x 2/4/8 warps x FAST_EXP on/off;
the first is the baseline the others are compared with):
  * correctness: bf16 inputs on packed odd-length sequences (300, 77, 1000 tokens; H = 16,
    K = 128), mild and x30 decay, A / P / diagonal inverses against an fp64 PyTorch reference;
    fp32 inputs (ieee products) once per FAST_EXP, at its first (BKS, warps);
  * time: chunk_intra alone (triton.testing.do_bench median) at B*T = 32K tokens (T = 2048, B = 16
    and T = 32768, B = 1), H = 16, K = V = 128, bf16 q/k, G from chunk_cumsum_kernel (as chunk_fwd
    prepares it), A / P / Tm allocated as chunk_fwd does; its A, P, Tm are compared with the
    baseline's on the same inputs (the GPU-verified form);
  * registers and spills of the compiled kernel.
One line per option, then ``BEST_INTRA_OPTION=`` the fastest correct option (sum of the two
shapes' times) as a python literal: it belongs first in ``intra_options`` (chunk_fwd.py).
Writes OUT_DIR/sweep-intra.json. A combination that does not compile is reported and skipped.
"""
import json
import os
import sys
import time

import torch

SMALL = bool(os.environ.get("SMALL")) or "--small" in sys.argv
if SMALL and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

from catkit.bench.registry import time_cuda  # noqa: E402
import catkit.ops.delta_rule.chunk_fwd as cf  # noqa: E402
from catkit.ops.delta_rule.chunk import prepare_chunks  # noqa: E402
from catkit.utils.testing import rel_rms  # noqa: E402
from catkit.utils.triton_utils import interpreted  # noqa: E402

BT, BC = 64, 16
DEV = "cuda" if torch.cuda.is_available() else "cpu"
if SMALL:
    H, K, SHAPES, CHECK_LENS, CHECK_H = 2, 32, [(128, 2), (256, 1)], [70, 45], 2
else:
    # the check uses the timing's H: H is a kernel constant, so each option compiles once
    H, K, SHAPES, CHECK_LENS, CHECK_H = 16, 128, [(2048, 16), (32768, 1)], [300, 77, 1000], 16
BK = max(16, triton.next_power_of_2(K))
BOUND = {torch.float32: 1e-5, torch.bfloat16: 5e-3}


def sweep_options():
    """Every (BKS, num_warps, FAST_EXP) this sweep times."""
    fast = (False,) if interpreted() else (True, False)  # the PTX exp exists only compiled
    return [dict(BKS=b, NK=triton.cdiv(K, b), FAST_EXP=f, num_warps=w, num_stages=1)
            for f in fast for b in (16, 32) for w in (2, 4, 8)]


def inputs(lens, nh, dtype, decay=1.0, seed=0):
    """Packed sequences of ``lens`` tokens: q, k (normalised, k scaled as fg2 scales it), g."""
    gen = torch.Generator(device=DEV).manual_seed(seed)
    n = sum(lens)
    r = lambda *s: torch.randn(*s, device=DEV, generator=gen)  # noqa: E731
    q = F.normalize(r(n, nh, K), dim=-1).to(dtype)
    k = (F.normalize(r(n, nh, K), dim=-1) * torch.sigmoid(r(n, nh, K))).to(dtype)
    g = F.logsigmoid(r(n, nh, K) + 3.0) * decay
    cu = [0]
    for t in lens:
        cu.append(cu[-1] + t)
    return q, k, g, cu, prepare_chunks(torch.tensor(cu, device=DEV), BT)


def run_intra(q, k, g, meta, opt):
    """chunk_fwd's G and chunk_intra launch, with the one option ``opt`` (A, P, Tm, kernel)."""
    n, nh, _ = q.shape
    NT = meta["chunk_indices"].shape[0]
    ci, cu = meta["chunk_indices"], meta["cu_seqlens"]
    pr = cf.precisions(q.dtype)
    G = torch.empty(n, nh, K, device=DEV, dtype=torch.float32)
    cf.chunk_cumsum_kernel[(NT, nh)](g, G, ci, cu, H=nh, K=K, BT=BT, BK=BK, G_SCALAR=False,
                                     num_warps=4, num_stages=1)
    A = torch.full((n, nh, BT), float("nan"), device=DEV, dtype=torch.float32)
    Tm = torch.full_like(A, float("nan"))
    P = torch.full((n, nh, BT), float("nan"), device=DEV,
                   dtype=torch.bfloat16 if pr["OP_BF16"] else torch.float32)
    args = (q, k, G, A, P, Tm, ci, cu)
    consts = dict(H=nh, K=K, BT=BT, BC=BC, DOT_PREC=pr["DOT_PREC"], INV_PREC=pr["INV_PREC"], **opt)

    def launch():
        return cf.chunk_intra_kernel[(NT, nh, BT // BC)](*args, **consts)

    kern = launch()
    return A, P, Tm, launch, kern


def reference(q, k, g, cu):
    """fp64 A, P, diagonal-block inverses and masks of the entries chunk_intra writes."""
    q, k, g = q.double(), k.double(), g.double()
    n, nh, _ = q.shape
    out = {x: torch.zeros(n, nh, BT, dtype=torch.float64, device=DEV) for x in ("A", "P", "Tm")}
    mask = {x: torch.zeros(n, nh, BT, dtype=torch.bool, device=DEV) for x in ("A", "P", "Tm")}
    for s0, s1 in zip(cu[:-1], cu[1:]):
        for s in range(s0, s1, BT):
            e = min(s + BT, s1)
            L = e - s
            G = g[s:e].cumsum(0)
            E = torch.exp((G[:, None] - G[None, :]).clamp(max=0))
            A = torch.einsum("ihc,jhc,ijhc->hij", k[s:e], k[s:e], E).tril(-1)
            out["A"][s:e, :, :L] = A.transpose(0, 1)
            out["P"][s:e, :, :L] = torch.einsum("ihc,jhc,ijhc->hij", q[s:e], k[s:e], E).tril(0).transpose(0, 1)
            r = torch.arange(L, device=DEV)
            mask["P"][s:e, :, :L] = (r[:, None] >= r[None, :])[:, None, :]
            mask["A"][s:e, :, :L] = (r[None, :] < (r[:, None] // BC + 1) * BC)[:, None, :]
            for b in range(0, L, BC):
                be = min(b + BC, L)
                eye = torch.eye(be - b, dtype=torch.float64, device=DEV)
                out["Tm"][s + b:s + be, :, b:be] = torch.linalg.inv(eye + A[:, b:be, b:be]).transpose(0, 1)
                mask["Tm"][s + b:s + be, :, b:be] = True
    return out, mask


def errors(got, ref, mask):
    """Max relative RMS over A, P, Tm on the written entries (inf if any is not finite)."""
    return max(rel_rms(x[mask[name]], ref[name][mask[name]]) for name, x in zip(("A", "P", "Tm"), got))


def bench(fn):
    # CUDA events (do_bench median) on a GPU; on the CPU (interpreter) a 1 + 3-call wall clock
    return time_cuda(fn, warmup=1, rep=3)


def main():
    out_dir = next((a for a in sys.argv[1:] if not a.startswith("--")), None)
    if out_dir is None:
        sys.exit(__doc__)
    t_start = time.time()
    opts = sweep_options()
    base = opts[0]
    if SMALL:  # the interpreter ignores num_warps
        opts = [o for o in opts if o["num_warps"] == 4]
    checks = {}
    for dtype in (torch.bfloat16, torch.float32):
        for decay in (1.0, 30.0):
            q, k, g, cu, meta = inputs(CHECK_LENS, CHECK_H, dtype, decay, seed=1)
            checks[dtype, decay] = (q, k, g, meta) + reference(q, k, g, cu)
    timing = {}
    for T, B in SHAPES:
        q, k, g, cu, meta = inputs([T] * B, H, torch.bfloat16, seed=2)
        A, P, Tm, _, _ = run_intra(q, k, g, meta, base)
        written = {n: torch.isfinite(x) for n, x in (("A", A), ("P", P), ("Tm", Tm))}
        timing[T, B] = (q, k, g, meta, dict(A=A.double(), P=P.double(), Tm=Tm.double()), written)
    print(f"sweep_delta_intra on {torch.cuda.get_device_name() if DEV == 'cuda' else 'CPU (interpreter)'}, "
          f"triton {triton.__version__}, H={H} K={K}; inputs ready in {time.time() - t_start:.1f}s", flush=True)
    rows, fp32_done = [], set()
    for opt in opts:
        row = dict(opt)
        try:
            err = 0.0
            for (dtype, decay), (q, k, g, meta, ref, mask) in checks.items():
                if dtype == torch.float32 and opt["FAST_EXP"] in fp32_done:
                    continue
                A, P, Tm, _, kern = run_intra(q, k, g, meta, opt)
                e = errors((A, P, Tm), ref, mask)
                row[f"err_{str(dtype).split('.')[-1]}"] = max(row.get(f"err_{str(dtype).split('.')[-1]}", 0.0), e)
                err = max(err, e / BOUND[dtype])
            fp32_done.add(opt["FAST_EXP"])
            row["ms"] = {}
            for (T, B), (q, k, g, meta, ref, mask) in timing.items():
                A, P, Tm, launch, kern = run_intra(q, k, g, meta, opt)
                e = errors((A, P, Tm), ref, mask)
                row[f"err_vs_first_T{T}"] = e
                err = max(err, e / BOUND[torch.bfloat16])
                row["ms"][f"T{T}"] = bench(launch)
            row.update(n_regs=getattr(kern, "n_regs", None), n_spills=getattr(kern, "n_spills", None))
            row["ok"] = bool(err <= 1.0)
            row["max_err_over_bound"] = err
        except Exception as ex:  # noqa: BLE001 - out of resources / compile error: record, go on
            row["error"] = f"{type(ex).__name__}: {str(ex)[:300]}"
            row["ok"] = False
        rows.append(row)
        ms = " ".join(f"{n}={v:.3f}ms" for n, v in row.get("ms", {}).items())
        print(f"BKS={opt['BKS']:2d} warps={opt['num_warps']} "
              f"fast_exp={int(opt['FAST_EXP'])} {ms} "
              f"regs={row.get('n_regs')} spills={row.get('n_spills')} "
              f"err_bf16={row.get('err_bfloat16', float('nan')):.1e} "
              f"err_fp32={row.get('err_float32', float('nan')):.1e} "
              f"max_err/bound={row.get('max_err_over_bound', float('nan')):.2f} ok={row['ok']}"
              + (f" ERROR {row['error']}" if "error" in row else ""), flush=True)
    good = [r for r in rows if r["ok"] and r.get("ms")]
    best = min(good, key=lambda r: sum(r["ms"].values())) if good else None
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "sweep-intra.json"), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name() if DEV == "cuda" else "cpu",
                       triton=triton.__version__, H=H, K=K, shapes=SHAPES, rows=rows), f, indent=1)
    for T, B in SHAPES:
        if good:
            r = min(good, key=lambda r: r["ms"][f"T{T}"])
            print(f"fastest at T={T} B={B}: BKS={r['BKS']} warps={r['num_warps']} "
                  f"fast_exp={int(r['FAST_EXP'])} {r['ms'][f'T{T}']:.3f} ms (baseline "
                  f"{rows[0].get('ms', {}).get(f'T{T}', float('nan')):.3f} ms)")
    keys = ("BKS", "NK", "FAST_EXP", "num_warps", "num_stages")
    print("BEST_INTRA_OPTION=" + (repr({n: best[n] for n in keys}) if best else "None"))
    print(f"sweep_delta_intra: {len(good)}/{len(rows)} options correct, {time.time() - t_start:.1f}s", flush=True)


if __name__ == "__main__":
    main()
