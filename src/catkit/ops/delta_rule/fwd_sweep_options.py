"""The candidate options scripts/sweep_delta_fwd_variants.py times for each forward kernel: every
list starts with the option the kernel ships with (so the sweep's baseline is what users run),
then the variants most promising first. Nothing here runs at training time; the winners go into
the ``*_BEST`` hooks of chunk_fwd.py and chunk_fwd_state.py."""

from __future__ import annotations

import triton

from catkit.ops.delta_rule.chunk_fwd import intra_options, o_options, prep_options, tsolve_options
from catkit.ops.delta_rule.chunk_fwd_state import state_options


def state_sweep_options(V, NHs, dev):
    """Every option scripts/sweep_delta_fwd_variants.py times for the state pass: today's first
    option at each grid size NH in ``NHs`` (full grid, few programs), then the variants, most
    promising first. Never BV = 16 at 8 warps (the illegal memory access noted in state_options
    would end the whole sweep). Register estimates: scripts/sweep_delta_fwd_variants.py --regs."""
    bv = lambda b: min(b, max(16, triton.next_power_of_2(V)))  # noqa: E731
    opts = []
    for nh in NHs:
        o = state_options(V, nh, dev)[0]
        if o not in opts:
            opts.append(o)
    st = opts[0]["num_stages"]
    # (BV, num_warps, num_stages, PREFETCH, STATE_BF16, KSPLIT, H_BF16), ordered so that what may
    # miscompile runs last: a CUDA error ends the sweep's process (it resumes with RESUME=1, but the
    # device call may not have the time). First the fp32-operand products on a bf16 h (chunk_fwd_o
    # on a bf16 h measured correct on an H100); then bf16 products at 2 and 4 warps with the state
    # as two K/2 halves, fla's form for its own state pass; the pipelined loop (num_stages 2)
    # instead of the manual PREFETCH; last 8 warps with bf16 products, whose first option
    # (BV 32, KSPLIT 1, H_BF16) made an illegal memory access on an H100 (Triton 3.6).
    for b, w, ns, p, sb, ks, hb in (
            (32, 8, st, 0, 0, 1, 1), (16, 4, st, 1, 0, 1, 1), (32, 4, st, 0, 0, 2, 1), (64, 8, st, 0, 0, 2, 1),
            (64, 4, st, 0, 1, 2, 1), (32, 4, st, 0, 1, 2, 1), (32, 2, st, 0, 1, 2, 1), (64, 2, st, 0, 1, 2, 1),
            (32, 4, st, 0, 1, 1, 1), (16, 4, st, 1, 1, 1, 1), (16, 4, st, 1, 1, 2, 1), (32, 4, st, 1, 1, 2, 1),
            (16, 2, st, 1, 1, 1, 1), (32, 4, 2, 0, 1, 2, 1), (64, 4, 2, 0, 1, 2, 1), (32, 2, 2, 0, 1, 2, 1),
            (16, 4, 2, 0, 1, 1, 1), (32, 8, st, 0, 1, 1, 1), (64, 8, st, 0, 1, 2, 1), (32, 8, st, 0, 1, 2, 1),
            (32, 8, st, 0, 1, 1, 0), (64, 4, st, 0, 1, 1, 1)):
        o = dict(BV=bv(b), num_warps=w, num_stages=ns, PREFETCH=bool(p), STATE_BF16=sb, KSPLIT=ks, H_BF16=hb)
        if o not in opts:
            opts.append(o)
    return opts


def prep_sweep_options(K, V):
    """chunk_prep options for the sweep, today's first: NSB column blocks per program (T loaded
    once per program) and bf16 products, most promising first. sm_90a estimates (K = V = 128):
    default 94 registers; NSB 4 / PREP_BF16 at BKS 32: 154 (4 warps), 93 (8 warps); NSB 2 at BKS
    64 / 8 warps: 120 (bf16), 102 (tf32)."""
    first = prep_options(K, V)[0]
    mx = max(16, triton.next_power_of_2(max(K, V)))
    opts = [first]
    # (BKS, NSB, PREP_BF16, num_warps)
    for b, n, pb, w in ((32, 4, 1, 4), (32, 4, 0, 4), (64, 2, 1, 4), (64, 2, 1, 8), (32, 2, 1, 4), (32, 1, 1, 4),
                        (64, 1, 1, 4), (128, 1, 1, 8), (16, 8, 1, 4), (32, 4, 1, 8), (64, 2, 0, 8), (16, 4, 1, 2)):
        b = min(b, mx)
        n = max(1, min(n, mx // b))
        o = dict(BKS=b, num_warps=w, num_stages=first["num_stages"], NSB=n, PREP_BF16=pb)
        if o not in opts:
            opts.append(o)
    return opts


def o_sweep_options(V):
    """chunk_fwd_o options for the sweep: today's first, then wider V tiles (fewer programs
    re-reading the same QG / P tiles) and fewer warps. ``H_BF16`` there names the h the option is
    timed on (the sweep hands it a bf16 copy); the kernel takes either."""
    first = o_options(V)[0]
    bv = lambda b: min(b, max(16, triton.next_power_of_2(V)))  # noqa: E731
    opts = [first, dict(first, H_BF16=1)]
    for b, w, hb in ((64, 4, 1), (64, 8, 1), (32, 4, 1), (128, 8, 1), (64, 4, 0), (64, 8, 0), (32, 4, 0),
                     (128, 8, 0), (16, 4, 1), (128, 4, 1)):
        o = dict(BV=bv(b), num_warps=w, num_stages=first["num_stages"], H_BF16=hb)
        if o not in opts and not (hb == 0 and dict(o, H_BF16=0) == dict(first, H_BF16=0)):
            opts.append(o)
    return opts


def tsolve_sweep_options():
    # (2 warps: ~16 KB of stack on sm_90a, not worth a try)
    return tsolve_options()


def intra_sweep_options(BK, K):
    """chunk_intra + chunk_tsolve options for the sweep, today's first, then the per-chunk FUSED
    variants of chunk_fwd_intra.py, most promising first (sm_90a register estimates at K = 128,
    bf16, Triton 3.9, scripts/sweep_delta_fwd_variants.py --regs; the default: 255 + 168 bytes of
    stack): FUSED 2 (whole-chunk tiles) DIAG 1 at 8 warps 247 registers, 167 with SOLVE_TF32;
    FUSED 1 (16x16 blocks) DIAG 1 at 4 warps 254; the DIAG 1 diagonal pass (chunk_intra_kernel,
    LEFT = 0) 149 at DBKS 32 / 2 warps; DIAG 0 (one kernel) spills in both forms, hence last.
    Keys: FUSED, DIAG, BKS / NK / FAST_EXP / num_warps (the fused kernel), DBKS / DW (the DIAG 1
    pass's key block and warps), SOLVE_TF32 (tf32 instead of tf32x3 past the diagonal inverses),
    maxnreg / DMAXNREG (register caps of the fused kernel / the DIAG 1 pass)."""
    first = intra_options(BK, K)[0]
    fe, st = first["FAST_EXP"], first["num_stages"]
    opts = [first]
    # (FUSED, DIAG, BKS, warps, DBKS, DW, SOLVE_TF32, maxnreg, DMAXNREG): maxnreg caps the fused
    # kernel's registers (128 at 8 warps: two CTAs per SM instead of one, ~150-220 bytes of stack),
    # DMAXNREG the DIAG 1 pass's (128 at 2 warps: 8 CTAs per SM instead of 6, 88 bytes of stack)
    for f, d, b, w, db, dw, tf, mx, dmx in (
            (1, 1, 32, 2, 32, 2, 0, 0, 0), (1, 1, 32, 2, 32, 2, 1, 0, 0), (1, 1, 16, 2, 16, 2, 0, 0, 0),
            (1, 1, 16, 2, 16, 2, 1, 0, 0), (1, 1, 32, 2, 32, 2, 0, 0, 128), (1, 1, 32, 2, 16, 2, 0, 0, 0),
            (1, 1, 32, 2, 16, 2, 0, 0, 128), (1, 1, 32, 2, 16, 2, 1, 0, 128), (1, 1, 16, 2, 16, 2, 1, 0, 128),
            (2, 1, 32, 8, 32, 2, 0, 0, 0), (2, 1, 32, 8, 32, 2, 1, 0, 0), (1, 1, 32, 4, 32, 2, 0, 0, 0),
            (2, 1, 16, 8, 16, 2, 1, 0, 0), (2, 1, 16, 8, 16, 2, 1, 128, 0), (1, 1, 32, 4, 32, 2, 1, 0, 0),
            (2, 1, 32, 8, 32, 2, 1, 128, 128), (2, 1, 32, 4, 32, 2, 0, 0, 0), (1, 1, 16, 4, 16, 2, 0, 0, 0),
            (2, 1, 16, 4, 16, 2, 1, 0, 0), (1, 1, 32, 4, 32, 4, 0, 0, 0),
            (2, 1, 64, 8, 64, 4, 1, 0, 0), (1, 0, 32, 4, 0, 0, 0, 0, 0), (1, 0, 16, 2, 0, 0, 1, 0, 0),
            (2, 0, 32, 8, 0, 0, 1, 0, 0), (2, 0, 16, 4, 0, 0, 0, 0, 0)):
        o = dict(FUSED=f, DIAG=d, BKS=b, NK=triton.cdiv(K, b), FAST_EXP=fe, num_warps=w, num_stages=st)
        if d:
            o.update(DBKS=db, DW=dw)
        if tf:
            o["SOLVE_TF32"] = 1
        if mx:
            o["maxnreg"] = mx
        if dmx:
            o["DMAXNREG"] = dmx
        opts.append(o)
    out = []
    for o in opts:  # key blocks wider than this call's K would only mask channels
        if o.get("BKS", 0) <= BK and o.get("DBKS", 0) <= BK and o not in out:
            out.append(o)
    return out
