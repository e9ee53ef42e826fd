"""Per-chunk variants of chunk_intra + chunk_tsolve (see chunk_fwd.py for the algebra and the decay
factorisation). Every variant ends where the default pair ends: P (lower) and T = (I + A)^-1 in Tm
(zeros above the diagonal); A itself is only needed inside, so it is stored only with STORE_A (tests).
No A round trip through HBM (per (chunk, head): A fp32 16 KB written and read back, Tm 16 KB read
by chunk_tsolve) and no chunk_tsolve launch. Chosen through ``intra_options`` (chunk_fwd.py): a
first option with FUSED = 1 / 2 runs ``intra_solve``'s per-chunk path; INTRA_BEST holds the
sweep's winner (scripts/sweep_delta_fwd_variants.py, ONLY=intra).

Why the default is slow (H200, 32K tokens x 16 heads, K = 128: chunk_intra 1.22 ms + chunk_tsolve
0.39 ms): chunk_intra runs 32768 programs of 2 warps at 255 registers (4 CTAs = 8 warps per SM);
a program of sub-chunk a > 0 forms 144 x 128 exps (R on all BT rows, F, four diagonal levels),
63.5K per (chunk, head), ~0.52 G in all (~0.12 ms of MUFU at 16 / clock / SM); its tensor-core
work (~34 GFLOP tf32, ~0.07 ms) and bytes (~1.1 GB in, mostly L2; 230 MB out) are far below a
millisecond: latency at low occupancy. chunk_tsolve: 8192 programs, 4 warps, 246 registers (two
CTAs per SM), four [64, 64, 64] tf32x3 products (~52 GFLOP), ~0.4 GB.

``chunk_intra_fused_kernel`` (FUSED 1), one program per (chunk, head), row block by row block:

  * blocks (a, b < a) of A and P as 16x16 tensor-core products, factored through the last row r_a
    of sub-chunk a - 1: exp(G_i - G_j) = exp(G_i - G_ra) exp(G_ra - G_j), both exponents <= 0.
    Exps per key channel at BT = 64: 3 x 16 (F) + 6 x 16 (R) = 144, against 3 x (16 + 64) = 240.
  * T by block forward substitution, T_aa = D_a^-1, T_ab = -D_a^-1 sum_{b <= c < a} A_ac T_cb:
    16 products of 16x16x16 instead of four [64, 64, 64].
  * Cost: Triton lays every 16x16 product of this chain out as warpsPerCTA [num_warps, 1], so each
    warp holds whole tiles (8 registers per 16x16 fp32 tile): 254 registers at 4 warps (DIAG 1).

``chunk_intra_wide_kernel`` (FUSED 2), one program per (chunk, head) on whole [BT, BT] tiles (M = BT
rows split over the warps): A and P from the recursive reference-row form on the whole chunk
(_half_pairs with BT rows: level S pairs rows of the lower half of each S-block with the upper half
through its last row, one exp tile per level serving both sides), then chunk_tsolve's solve in
registers. Levels S > BC cover the blocks left of the diagonal: 2 exp tiles per key block at
BT = 64 (16K exps per (chunk, head); with DIAG 1's pass 48K in all against chunk_intra's 63.5K),
4.2 MFLOP tf32 + the solve's 6.3 (tf32x3; 2.1 with SOLVE_TF32). 247 registers at 8 warps.

Both forms: DIAG 1 takes the diagonal blocks (A, P and D_a^-1) from chunk_intra_kernel run first
with LEFT = 0 (its left products switched off: 149 registers at 2 warps, so 6 CTAs per SM instead
of 4, and a third of its exps); DIAG 0 forms them in the kernel too (one launch, but it spills).
SOLVE_TF32 runs the solve's products past D^-1 in one tf32 pass instead of tf32x3 on the 16-bit
path (167 registers for FUSED 2 / 8 warps). Register counts: sm_90a estimates with Triton 3.9
(scripts/sweep_delta_fwd_variants.py --regs, scripts/sm90_regs_delta.py ... fused).
"""

from __future__ import annotations

import triton
import triton.language as tl

import catkit.ops.delta_rule.chunk_fwd as cf
from catkit.ops.delta_rule.chunk_fwd import _exp, _half_pairs, _seq_bounds, chunk_intra_kernel, chunk_tsolve_kernel


@triton.jit
def _rows(ptr, t0, a, eos, hoff, ck, H: tl.constexpr, K: tl.constexpr, BC: tl.constexpr):
    """Rows of sub-chunk ``a`` on key columns ck as fp32 [BC, len(ck)], and their mask."""
    r = t0 + a * BC + tl.arange(0, BC)
    m = (r < eos)[:, None] & (ck[None, :] < K)
    return tl.load(ptr + r[:, None] * (H * K) + hoff + ck[None, :], mask=m, other=0.0).to(tl.float32), m


@triton.jit
def _ref_row(G, t0, a, eos, hoff, ck, H: tl.constexpr, K: tl.constexpr, BC: tl.constexpr):
    """G at the reference row of sub-chunk a's left blocks: the last row of sub-chunk a - 1
    (clamped into the sequence: every valid column j <= r then, so G_r - G_j <= 0 still)."""
    r = tl.minimum(t0 + a * BC - 1, eos - 1)
    return tl.load(G + r * (H * K) + hoff + ck, mask=ck < K, other=0.0)


@triton.jit
def _right(b_G, m, G_r, FAST_EXP: tl.constexpr):
    # F = exp(G_i - G_r) on the rows of the later sub-chunk (exponent <= 0)
    return tl.where(m, _exp(tl.where(m, b_G - G_r[None, :], 0.0), FAST_EXP), 0.0)


@triton.jit
def _left(b_k, b_G, m, G_r, FAST_EXP: tl.constexpr):
    # R = k_j exp(G_r - G_j) on the rows of an earlier sub-chunk (exponent <= 0)
    return tl.where(m, b_k * _exp(tl.where(m, G_r[None, :] - b_G, 0.0), FAST_EXP), 0.0)


@triton.jit
def _diag(b_k, b_q, b_G, G, tb, eos, hoff, ck, H: tl.constexpr, K: tl.constexpr, BC: tl.constexpr,
          DOT_PREC: tl.constexpr, FAST_EXP: tl.constexpr):
    """A and P entries of one diagonal block on key columns ck (recursive reference rows; P's
    diagonal added separately, as it needs no exp)."""
    c16 = tl.arange(0, BC)
    d_a = tl.zeros([BC, BC], dtype=tl.float32)
    d_p = tl.where(c16[:, None] == c16[None, :], tl.sum(b_q * b_k, axis=1)[:, None], 0.0)
    for lv in tl.static_range(0, 4):
        if (BC >> lv) >= 2:
            x_a, x_p = _half_pairs(b_k, b_q, b_G, G, tb, eos, hoff, ck, H, K, BC, BC >> lv, DOT_PREC, FAST_EXP)
            d_a += x_a
            d_p += x_p
    return d_a, d_p


@triton.jit
def _inv16(b_a, BC: tl.constexpr, INV_PREC: tl.constexpr):
    # (I + A_aa)^-1 = (I + N)(I + N^2)(I + N^4)(I + N^8), N = -A_aa strictly lower (N^16 = 0)
    c16 = tl.arange(0, BC)
    eye = tl.where(c16[:, None] == c16[None, :], 1.0, 0.0)
    b_n = -b_a
    b_n2 = tl.dot(b_n, b_n, input_precision=INV_PREC)
    b_n4 = tl.dot(b_n2, b_n2, input_precision=INV_PREC)
    b_n8 = tl.dot(b_n4, b_n4, input_precision=INV_PREC)
    b_t = eye + b_n + b_n2 + tl.dot(b_n, b_n2, input_precision=INV_PREC)
    b_t += tl.dot(b_t, b_n4, input_precision=INV_PREC)
    b_t += tl.dot(b_t, b_n8, input_precision=INV_PREC)
    return b_t


@triton.jit
def _put(ptr, x, t0, a, b, eos, i_h, H: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    """Store the 16x16 block (a, b) of a per-chunk [BT, BT] matrix (rows past eos dropped)."""
    c16 = tl.arange(0, BC)
    r = t0 + a * BC + c16
    tl.store(ptr + r[:, None] * (H * BT) + i_h * BT + b * BC + c16[None, :], x.to(ptr.dtype.element_ty),
             mask=(r < eos)[:, None])


@triton.jit
def _get_diag(Tm, t0, a, eos, i_h, H: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    c16 = tl.arange(0, BC)
    r = t0 + a * BC + c16
    return tl.load(Tm + r[:, None] * (H * BT) + i_h * BT + a * BC + c16[None, :], mask=(r < eos)[:, None],
                   other=0.0)


@triton.jit
def _mmi(a, b, INV_PREC: tl.constexpr):
    return tl.dot(a, b, input_precision=INV_PREC)


@triton.jit
def _pair(b_k, b_q, kF, qF, k, G, t0, b: tl.constexpr, eos, hoff, ck, G_r, H: tl.constexpr, K: tl.constexpr,
          BC: tl.constexpr, DOT_PREC: tl.constexpr, FAST_EXP: tl.constexpr):
    """Block (a, b < a) of A and P on key columns ck: (k_a F) R_b^T and (q_a F) R_b^T."""
    k_b, m_b = _rows(k, t0, b, eos, hoff, ck, H, K, BC)
    G_b, _ = _rows(G, t0, b, eos, hoff, ck, H, K, BC)
    R = tl.trans(_left(k_b, G_b, m_b, G_r, FAST_EXP))
    return tl.dot(kF, R, input_precision=DOT_PREC), tl.dot(qF, R, input_precision=DOT_PREC)


@triton.jit
def _row_pass(q, k, G, A, P, t0, a: tl.constexpr, eos, i_h, H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr,
              BC: tl.constexpr, BKS: tl.constexpr, NK: tl.constexpr, DOT_PREC: tl.constexpr,
              FAST_EXP: tl.constexpr, DIAG: tl.constexpr, STORE_A: tl.constexpr):
    """Row block ``a`` of A and P: blocks (a, b) for b < a (and b = a with DIAG 0), summed over the
    key blocks. P's blocks are stored here; A's are returned, (A_a0, A_a1, A_a2, A_aa), for the
    solve. One row block at a time keeps only its own rows' q, k, G and at most four pairs of
    16x16 accumulators live (the rows of the earlier blocks are re-read per pair: L1 / L2 hits)."""
    hoff = i_h * K
    z = tl.zeros([BC, BC], dtype=tl.float32)
    x0, x1, x2, xd = z, z, z, z
    y0, y1, y2, yd = z, z, z, z
    for i_k in range(0, NK):
        ck = i_k * BKS + tl.arange(0, BKS)
        b_k, m = _rows(k, t0, a, eos, hoff, ck, H, K, BC)
        b_q, _ = _rows(q, t0, a, eos, hoff, ck, H, K, BC)
        b_G, _ = _rows(G, t0, a, eos, hoff, ck, H, K, BC)
        if DIAG == 0:
            d_a, d_p = _diag(b_k, b_q, b_G, G, t0 + a * BC, eos, hoff, ck, H, K, BC, DOT_PREC, FAST_EXP)
            xd += d_a
            yd += d_p
        if a >= 1:
            G_r = _ref_row(G, t0, a, eos, hoff, ck, H, K, BC)
            F = _right(b_G, m, G_r, FAST_EXP)
            kF, qF = b_k * F, b_q * F
            d_a, d_p = _pair(b_k, b_q, kF, qF, k, G, t0, 0, eos, hoff, ck, G_r, H, K, BC, DOT_PREC, FAST_EXP)
            x0 += d_a
            y0 += d_p
            if a >= 2:
                d_a, d_p = _pair(b_k, b_q, kF, qF, k, G, t0, 1, eos, hoff, ck, G_r, H, K, BC, DOT_PREC, FAST_EXP)
                x1 += d_a
                y1 += d_p
            if a >= 3:
                d_a, d_p = _pair(b_k, b_q, kF, qF, k, G, t0, 2, eos, hoff, ck, G_r, H, K, BC, DOT_PREC, FAST_EXP)
                x2 += d_a
                y2 += d_p
    c16 = tl.arange(0, BC)
    xd = tl.where(c16[:, None] > c16[None, :], xd, 0.0)
    if DIAG == 0:
        _put(P, tl.where(c16[:, None] >= c16[None, :], yd, 0.0), t0, a, a, eos, i_h, H, BT, BC)
        if STORE_A:
            _put(A, xd, t0, a, a, eos, i_h, H, BT, BC)
    if a >= 1:
        _put(P, y0, t0, a, 0, eos, i_h, H, BT, BC)
        if STORE_A:
            _put(A, x0, t0, a, 0, eos, i_h, H, BT, BC)
    if a >= 2:
        _put(P, y1, t0, a, 1, eos, i_h, H, BT, BC)
        if STORE_A:
            _put(A, x1, t0, a, 1, eos, i_h, H, BT, BC)
    if a >= 3:
        _put(P, y2, t0, a, 2, eos, i_h, H, BT, BC)
        if STORE_A:
            _put(A, x2, t0, a, 2, eos, i_h, H, BT, BC)
    return x0, x1, x2, xd


@triton.jit
def _dinv(xd, Tm, t0, a: tl.constexpr, eos, i_h, H: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
          INV_PREC: tl.constexpr, DIAG: tl.constexpr, NS: tl.constexpr):
    """D_a^-1 = T_aa, stored with the zero blocks right of it (DIAG 1: read from Tm instead, where
    the LEFT = 0 pass put it)."""
    if DIAG == 0:
        t = _inv16(xd, BC, INV_PREC)
        _put(Tm, t, t0, a, a, eos, i_h, H, BT, BC)
    else:
        t = _get_diag(Tm, t0, a, eos, i_h, H, BT, BC)
    for b in tl.static_range(a + 1, NS):
        _put(Tm, tl.zeros([BC, BC], dtype=tl.float32), t0, a, b, eos, i_h, H, BT, BC)
    return t


@triton.jit
def chunk_intra_fused_kernel(q, k, G, A, P, Tm, chunk_indices, cu_seqlens,
                             H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                             BKS: tl.constexpr, NK: tl.constexpr, DOT_PREC: tl.constexpr,
                             INV_PREC: tl.constexpr, FAST_EXP: tl.constexpr, DIAG: tl.constexpr = 0,
                             STORE_A: tl.constexpr = 0, OFF_PREC: tl.constexpr = "tf32x3"):
    """P (lower) and T = (I + A)^-1 (into Tm) of one chunk and head; see the module docstring.
    Row block by row block (NS = BT / BC in (1, 2, 4)): A's row block a, then T's row block a by
    forward substitution, T_ab = -D_a^-1 sum_{b <= c < a} A_ac T_cb, from the T blocks of the
    earlier rows (kept in registers: at most six 16x16 tiles)."""
    NS: tl.constexpr = BT // BC
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    t0, eos = _seq_bounds(chunk_indices, cu_seqlens, i_t, BT)
    z = tl.zeros([BC, BC], dtype=tl.float32)
    xd = z
    if DIAG == 0:
        _, _, _, xd = _row_pass(q, k, G, A, P, t0, 0, eos, i_h, H, K, BT, BC, BKS, NK, DOT_PREC, FAST_EXP, DIAG,
                                STORE_A)
    t00 = _dinv(xd, Tm, t0, 0, eos, i_h, H, BT, BC, INV_PREC, DIAG, NS)
    if NS >= 2:
        a10, _, _, xd = _row_pass(q, k, G, A, P, t0, 1, eos, i_h, H, K, BT, BC, BKS, NK, DOT_PREC, FAST_EXP,
                                  DIAG, STORE_A)
        t11 = _dinv(xd, Tm, t0, 1, eos, i_h, H, BT, BC, INV_PREC, DIAG, NS)
        t10 = -_mmi(t11, _mmi(a10, t00, OFF_PREC), OFF_PREC)
        _put(Tm, t10, t0, 1, 0, eos, i_h, H, BT, BC)
    if NS >= 4:
        a20, a21, _, xd = _row_pass(q, k, G, A, P, t0, 2, eos, i_h, H, K, BT, BC, BKS, NK, DOT_PREC, FAST_EXP,
                                    DIAG, STORE_A)
        t22 = _dinv(xd, Tm, t0, 2, eos, i_h, H, BT, BC, INV_PREC, DIAG, NS)
        t21 = -_mmi(t22, _mmi(a21, t11, OFF_PREC), OFF_PREC)
        t20 = -_mmi(t22, _mmi(a20, t00, OFF_PREC) + _mmi(a21, t10, OFF_PREC), OFF_PREC)
        _put(Tm, t20, t0, 2, 0, eos, i_h, H, BT, BC)
        _put(Tm, t21, t0, 2, 1, eos, i_h, H, BT, BC)
        a30, a31, a32, xd = _row_pass(q, k, G, A, P, t0, 3, eos, i_h, H, K, BT, BC, BKS, NK, DOT_PREC, FAST_EXP,
                                      DIAG, STORE_A)
        t33 = _dinv(xd, Tm, t0, 3, eos, i_h, H, BT, BC, INV_PREC, DIAG, NS)
        t32 = -_mmi(t33, _mmi(a32, t22, OFF_PREC), OFF_PREC)
        t31 = -_mmi(t33, _mmi(a31, t11, OFF_PREC) + _mmi(a32, t21, OFF_PREC), OFF_PREC)
        t30 = -_mmi(t33, _mmi(a30, t00, OFF_PREC) + _mmi(a31, t10, OFF_PREC) + _mmi(a32, t20, OFF_PREC),
                    OFF_PREC)
        _put(Tm, t30, t0, 3, 0, eos, i_h, H, BT, BC)
        _put(Tm, t31, t0, 3, 1, eos, i_h, H, BT, BC)
        _put(Tm, t32, t0, 3, 2, eos, i_h, H, BT, BC)


@triton.jit
def chunk_intra_wide_kernel(q, k, G, A, P, Tm, chunk_indices, cu_seqlens,
                            H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                            BKS: tl.constexpr, NK: tl.constexpr, DOT_PREC: tl.constexpr,
                            INV_PREC: tl.constexpr, FAST_EXP: tl.constexpr, DIAG: tl.constexpr = 1,
                            STORE_A: tl.constexpr = 0, OFF_PREC: tl.constexpr = "tf32x3"):
    """FUSED 2: P and T of one chunk and head on whole [BT, BT] tiles (M = BT rows split over the
    warps, nothing replicated per warp, unlike the 16x16 blocks above). A and P come from the
    recursive reference-row form on the whole chunk (chunk_fwd._half_pairs with BT rows): at level
    S = BT, BT/2, ..., the pairs (i in the lower, j in the upper half of the same S-block), one
    exp tile exp(-|G - G_r(row)|) per level serving both sides. DIAG 1: levels S > BC only (the
    blocks left of the diagonal; 2 exp tiles per key block at BT = 64), the diagonal blocks and
    their inverses from the LEFT = 0 pass in Tm / P; DIAG 0: every level (6 exp tiles) and the
    diagonal inverses as the Neumann product on the block-diagonal part (six [BT, BT] products).
    Then chunk_tsolve's solve, T = (I + M^2)(I - M) D^-1 with M = D^-1 L, in registers."""
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    t0, eos = _seq_bounds(chunk_indices, cu_seqlens, i_t, BT)
    rows = tl.arange(0, BT)
    rb = rows // BC
    valid = (t0 + rows) < eos
    offc = (t0 + rows)[:, None] * (H * BT) + i_h * BT + rows[None, :]
    b_a = tl.zeros([BT, BT], dtype=tl.float32)
    b_p = tl.zeros([BT, BT], dtype=tl.float32)
    b_pd = tl.zeros([BT], dtype=tl.float32)
    for i_k in range(0, NK):
        ck = i_k * BKS + tl.arange(0, BKS)
        m = valid[:, None] & (ck[None, :] < K)
        off = (t0 + rows)[:, None] * (H * K) + i_h * K + ck[None, :]
        b_k = tl.load(k + off, mask=m, other=0.0).to(tl.float32)
        b_q = tl.load(q + off, mask=m, other=0.0).to(tl.float32)
        b_G = tl.load(G + off, mask=m, other=0.0)
        for lv in tl.static_range(0, 7):
            if ((BT >> lv) >= 2) and (DIAG == 0 or (BT >> lv) > BC):
                d_a, d_p = _half_pairs(b_k, b_q, b_G, G, t0, eos, i_h * K, ck, H, K, BT, BT >> lv, DOT_PREC,
                                       FAST_EXP)
                b_a += d_a
                b_p += d_p
        if DIAG == 0:
            b_pd += tl.sum(b_q * b_k, axis=1)
    lo = rows[:, None] >= rows[None, :]
    off_d = rb[:, None] > rb[None, :]  # blocks left of the diagonal
    if DIAG == 0:
        b_p = tl.where(lo, b_p + tl.where(rows[:, None] == rows[None, :], b_pd[:, None], 0.0), 0.0)
        tl.store(P + offc, b_p.to(P.dtype.element_ty), mask=valid[:, None])
        b_a = tl.where(rows[:, None] > rows[None, :], b_a, 0.0)
        if STORE_A:
            tl.store(A + offc, b_a, mask=valid[:, None])
        # D^-1 for every diagonal block at once: (I + N)(I + N^2)(I + N^4)(I + N^8) with N the
        # negated block-diagonal part (N^16 = 0 block by block), as chunk_intra does per block
        b_n = -tl.where(rb[:, None] == rb[None, :], b_a, 0.0)
        b_n2 = tl.dot(b_n, b_n, input_precision=INV_PREC)
        b_Td = tl.where(rows[:, None] == rows[None, :], 1.0, 0.0)
        b_Td += b_n + b_n2 + tl.dot(b_n, b_n2, input_precision=INV_PREC)
        b_n2 = tl.dot(b_n2, b_n2, input_precision=INV_PREC)  # N^4
        b_Td += tl.dot(b_Td, b_n2, input_precision=INV_PREC)
        b_n2 = tl.dot(b_n2, b_n2, input_precision=INV_PREC)  # N^8
        b_Td += tl.dot(b_Td, b_n2, input_precision=INV_PREC)
        b_L = tl.where(off_d, b_a, 0.0)
    else:
        tl.store(P + offc, b_p.to(P.dtype.element_ty), mask=valid[:, None] & off_d)
        b_L = tl.where(off_d, b_a, 0.0)
        if STORE_A:
            tl.store(A + offc, b_L, mask=valid[:, None] & off_d)
        b_Td = tl.load(Tm + offc, mask=valid[:, None] & (rb[:, None] == rb[None, :]), other=0.0)
    # chunk_tsolve's solve (exact for NS <= 4): T = Y + M^2 Y, Y = D^-1 - M D^-1, M = D^-1 L
    b_M = tl.dot(b_Td, b_L, input_precision=OFF_PREC)
    b_T = b_Td - tl.dot(b_M, b_Td, input_precision=OFF_PREC)
    b_M = tl.dot(b_M, b_M, input_precision=OFF_PREC)
    b_T += tl.dot(b_M, b_T, input_precision=OFF_PREC)
    tl.store(Tm + offc, b_T, mask=valid[:, None])


HOST_KEYS = ("FUSED", "DBKS", "DW", "SOLVE_TF32", "DMAXNREG")  # option keys read here, not kernel constants


def diag_option(opt):
    """The LEFT = 0 chunk_intra_kernel launch option of a DIAG 1 option."""
    o = dict(BKS=opt["DBKS"], NK=triton.cdiv(opt["NK"] * opt["BKS"], opt["DBKS"]), FAST_EXP=opt["FAST_EXP"],
             num_warps=opt["DW"], num_stages=opt["num_stages"])
    if opt.get("DMAXNREG"):
        o["maxnreg"] = opt["DMAXNREG"]
    return o


def intra_solve(args, NT, H, K, BT, pr, opts, tsolve_opts, store_a=False):
    """P (lower) and T = (I + A)^-1 into Tm for ``args = (q, k, G, A, P, Tm, chunk_indices,
    cu_seqlens)``: with the first of ``opts`` a FUSED option, chunk_intra_fused_kernel (after the
    LEFT = 0 diagonal pass for DIAG 1) over the FUSED options of ``opts`` (the next is tried on
    OutOfResources); else chunk_intra_kernel then chunk_tsolve_kernel, as before. (cf.launch, looked
    up per call: scripts/sweep_delta_fwd_variants.py records the launches by patching it.) A is complete
    (strict lower, every block) only on the default path or with ``store_a``."""
    BC = min(16, BT)
    consts = dict(H=H, K=K, BT=BT, BC=BC, DOT_PREC=pr["DOT_PREC"], INV_PREC=pr["INV_PREC"])
    if opts[0].get("FUSED"):
        form = lambda o: (o.get("FUSED"), o.get("DIAG", 0), o.get("SOLVE_TF32", 0))  # noqa: E731
        fused = [o for o in opts if form(o) == form(opts[0])]
        if opts[0].get("DIAG", 0):
            cf.launch(chunk_intra_kernel, lambda o: (NT, H, BT // BC), args, dict(consts, LEFT=0),
                   [diag_option(o) for o in fused])
        kernel = chunk_intra_wide_kernel if opts[0]["FUSED"] == 2 else chunk_intra_fused_kernel
        # SOLVE_TF32: the products of the solve past the diagonal inverses in one tf32 pass instead of
        # tf32x3 (16-bit inputs only; fp32 inputs keep ieee): A itself comes from tf32 products on
        # that path, and T only enters bf16-rounded W / U. ~100 registers less (sm_90a estimates).
        off = "tf32" if opts[0].get("SOLVE_TF32") and pr["INV_PREC"] == "tf32x3" else pr["INV_PREC"]
        cf.launch(kernel, lambda o: (NT, H), args, dict(consts, STORE_A=int(store_a), OFF_PREC=off),
               [{n: v for n, v in o.items() if n not in HOST_KEYS} for o in fused])
        return
    cf.launch(chunk_intra_kernel, lambda o: (NT, H, BT // BC), args, consts, [o for o in opts if not o.get("FUSED")])
    q, k, G, A, P, Tm, ci, cu = args
    cf.launch(chunk_tsolve_kernel, lambda o: (NT, H), (A, Tm, ci, cu), dict(H=H, BT=BT, BC=BC, INV_PREC=pr["INV_PREC"]),
           tsolve_opts)
