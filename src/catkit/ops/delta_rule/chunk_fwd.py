"""Forward kernels of the chunked (WY/UT) delta rule with per-channel decay.

Everything is phrased for the symmetric update on already-scaled keys/values (k~, v~, beta = 1)::

    S_t = (I - k_t k_t^T) Diag(exp(g_t)) S_{t-1} + k_t v_t^T,     o_t = scale * S_t^T q_t

Tokens of all sequences are flattened to ``[NTOK, H, D]`` (a plain batch is the varlen case with
equal lengths), chunks never cross a sequence boundary, and per chunk of C tokens with the
within-chunk cumulative log-decay G (fp32)::

    A = strict_lower(sum_c k_ic k_jc exp(G_ic - G_jc)),  T = (I + A)^-1,  W = T (K * exp(G))
    P = lower(sum_c q_ic k_jc exp(G_ic - G_jc))
    Vn = T V - W S,   O = scale * ((Q * exp(G)) S + P Vn),   S <- exp(G_C) S + (K exp(G_C - G))^T Vn

The decay ratio exp(G_i - G_j) is never split into exp(G_i) * exp(-G_j), whose second factor
overflows fp32 for strong decay at C = 64. Between 16-row sub-chunks it is factored through the
last row r of the earlier sub-chunk, exp(G_i - G_r) * exp(G_r - G_j), both exponents <= 0 (tensor-
core products); inside a sub-chunk, through the same factorisation on halves of the block,
recursively (chunk_intra). The inverses of the 16x16 diagonal
blocks of I + A come from chunk_intra (a product of four Neumann factors), and chunk_prep merges
them into T with an exact block-Neumann step.

Kernels: ``chunk_cumsum`` (G), ``chunk_intra`` (A, P, diagonal inverses; per sub-chunk),
``chunk_tsolve`` (T = (I + A)^-1 per chunk), ``chunk_prep`` (W, U = T V, Q e^G, K e^(G_C - G);
per chunk and column block), ``chunk_fwd_state`` (sequential over chunks per (sequence, head, V
tile): Vn, per-chunk start states, final state; in chunk_fwd_state.py), ``chunk_fwd_o`` (O from
the saved states, parallel over chunks). Variants behind constexpr switches (chunk_prep: NSB,
PREP_BF16; the state pass: STATE_BF16, KSPLIT, H_BF16; chunk_intra + chunk_tsolve: the per-chunk
FUSED kernels of chunk_fwd_intra.py, chosen by an ``intra_options`` entry) are timed by
scripts/sweep_delta_fwd_variants.py, whose winners go into the ``*_BEST`` hooks.

HBM bytes per (chunk, head) at BT = 64, K = V = 128, bf16 inputs (fp32 g), estimates (x 8192 at
32K tokens x 16 heads; 1 GB ~ 0.21 ms at the H200's 4.8 TB/s): cumsum 32 KB in, 32 KB out (G
fp32); intra ~64 KB in (own rows q, k, G; left rows k, G mostly L2 hits), ~24 KB out (A fp32,
P, diagonal inverses); tsolve 32 KB in, 16 KB out; prep ~96 KB in (k, q, v, G; T from L2), 64 KB
out (W, QG, KD, U); state ~48 KB in (W, KD, U), ~80 KB out (Vn, chunk-start states fp32); o
~100 KB in (QG, P, Vn, states), 16 KB out. Every kernel is far from its bandwidth bound (~0.1-0.3
ms each at that shape); what they cost beyond it is latency and occupancy, hence the register
notes per kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from catkit.ops.delta_rule.chunk_fwd_state import _mm_rnd, best_first, chunk_fwd_state_kernel, state_options
from catkit.utils.triton_utils import interpreted


@triton.jit
def _seq_bounds(chunk_indices, cu_seqlens, i_t, BT: tl.constexpr):
    """(first token of this chunk, end of its sequence)."""
    i_n = tl.load(chunk_indices + i_t * 2)
    i_c = tl.load(chunk_indices + i_t * 2 + 1)
    bos = tl.load(cu_seqlens + i_n)
    eos = tl.load(cu_seqlens + i_n + 1)
    return bos + i_c * BT, eos


@triton.jit
def chunk_cumsum_kernel(g, G, chunk_indices, cu_seqlens, H: tl.constexpr, K: tl.constexpr,
                        BT: tl.constexpr, BK: tl.constexpr, G_SCALAR: tl.constexpr):
    # G[t] = sum of g over the chunk's tokens up to t; a scalar g [NTOK, H] is broadcast over K
    # here so that every later kernel sees the per-channel form.
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    t0, eos = _seq_bounds(chunk_indices, cu_seqlens, i_t, BT)
    rows = tl.arange(0, BT)
    ck = tl.arange(0, BK)
    valid = (t0 + rows) < eos
    m = valid[:, None] & (ck[None, :] < K)
    if G_SCALAR:
        gs = tl.load(g + (t0 + rows) * H + i_h, mask=valid, other=0.0).to(tl.float32)
        gt = tl.zeros([BT, BK], dtype=tl.float32) + gs[:, None]
        gt = tl.where(m, gt, 0.0)
    else:
        gt = tl.load(g + (t0 + rows)[:, None] * (H * K) + i_h * K + ck[None, :], mask=m, other=0.0)
        gt = gt.to(tl.float32)
    Gt = tl.cumsum(gt, axis=0)
    tl.store(G + (t0 + rows)[:, None] * (H * K) + i_h * K + ck[None, :], Gt, mask=m)


@triton.jit
def _mm(a, b, OP_BF16: tl.constexpr, DOT_PREC: tl.constexpr):
    # bf16 inputs: bf16 tensor-core products with fp32 accumulation (as the anchor does);
    # fp16: tf32 on fp32 operands (an fp16 state could overflow); fp32: exact ieee products.
    if OP_BF16:
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    else:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=DOT_PREC)


@triton.jit
def _exp(x, FAST_EXP: tl.constexpr):
    # FAST_EXP: ex2.approx.ftz, one MUFU instruction per element; tl.exp's ex2.approx.f32 (no ftz)
    # makes ptxas add a range test and two multiplies for denormal results (products below 1e-38
    # here, negligible): ~10% of chunk_intra's instructions (sm_90a estimate). PTX, so off under
    # the CPU interpreter.
    if FAST_EXP:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [x * 1.4426950408889634],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.exp(x)


@triton.jit
def _left_factors(k, G, b_G, m, left, r_ref, t0, hoff, ck, H: tl.constexpr, K: tl.constexpr,
                  BT: tl.constexpr, FAST_EXP: tl.constexpr):
    """chunk_intra's factors of the blocks left of the diagonal for key columns ck:
    F = exp(G_i - G_r) on the block's rows (b_G, mask m), R = k_j exp(G_r - G_j) on the chunk's
    columns j (zero from the block's first row on)."""
    cols = tl.arange(0, BT)
    ml = left[:, None] & (ck[None, :] < K)
    offl = (t0 + cols)[:, None] * (H * K) + hoff + ck[None, :]
    G_r = tl.load(G + r_ref * (H * K) + hoff + ck, mask=ck < K, other=0.0)
    b_kl = tl.load(k + offl, mask=ml, other=0.0).to(tl.float32)
    b_Gl = tl.load(G + offl, mask=ml, other=0.0)
    F = tl.where(m, _exp(tl.where(m, b_G - G_r[None, :], 0.0), FAST_EXP), 0.0)
    R = tl.where(ml, b_kl * _exp(tl.where(ml, G_r[None, :] - b_Gl, 0.0), FAST_EXP), 0.0)
    return F, R


@triton.jit
def _half_pairs(b_k, b_q, b_G, G, tb, eos, hoff, ck, H: tl.constexpr, K: tl.constexpr,
                BC: tl.constexpr, S: tl.constexpr, DOT_PREC: tl.constexpr, FAST_EXP: tl.constexpr):
    """One level of chunk_intra's diagonal block: the A and P entries (i, j) of a BC-row block (first
    token tb; key columns ck) with i in the lower and j in the upper half of the same S-block:
    exp(G_i - G_j) = exp(G_i - G_r) exp(G_r - G_j) through the last row r of that upper half, both
    exponents -|G_t - G_r(t)| <= 0, so one exp tile serves both sides."""
    c16 = tl.arange(0, BC)
    rr = tb + (c16 // S) * S + S // 2 - 1  # each row's reference: last row of its upper half
    G_rr = tl.load(G + rr[:, None] * (H * K) + hoff + ck[None, :],
                   mask=(rr < eos)[:, None] & (ck[None, :] < K), other=0.0)
    E = _exp(-tl.abs(b_G - G_rr), FAST_EXP)
    lo = ((c16 % S) >= S // 2)[:, None]
    kE = b_k * E
    rhs = tl.trans(tl.where(lo, 0.0, kE))
    # pairs in different S-blocks used different references: dropped
    same = (c16[:, None] // S) == (c16[None, :] // S)
    d_a = tl.where(same, tl.dot(tl.where(lo, kE, 0.0), rhs, input_precision=DOT_PREC), 0.0)
    d_p = tl.where(same, tl.dot(tl.where(lo, b_q * E, 0.0), rhs, input_precision=DOT_PREC), 0.0)
    return d_a, d_p


@triton.jit
def chunk_intra_kernel(q, k, G, A, P, Tm, chunk_indices, cu_seqlens,
                       H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                       BKS: tl.constexpr, NK: tl.constexpr, DOT_PREC: tl.constexpr,
                       INV_PREC: tl.constexpr, FAST_EXP: tl.constexpr, LEFT: tl.constexpr = 1):
    """Rows of sub-chunk ``a`` (BC rows) of A = strict_lower(K D K^T) and P = lower(Q D K^T), and
    the inverse (I + A_aa)^-1 of the diagonal block, written into the diagonal block of ``Tm``.

    One small program per (chunk, head, sub-chunk); it reads its own rows once per key block and
    the rows left of it once (bytes per program ~ (3 BC + 2 a BC) K words in, (2 a + 3) BC^2 out).
    The diagonal block goes through reference-row dots on the halves of the block, recursively
    (_half_pairs): a quarter of the exps of per-pair ratios and no [BC, BC, BKS] tensor. On an
    H200 (Triton 3.6, 32K tokens x 16 heads, bf16) this form took 1.22 ms against 2.61 ms for the
    per-pair form and 1.47-1.6 ms for row / column loops on full-width tiles
    (benchmarks/results/delta_rule-kernels-NVIDIA_H200/sweep-intra.json). LEFT = 0 (the diagonal
    pass of chunk_fwd_intra's DIAG 1 variant): only the diagonal block, its inverse and P's.
    """
    i_t, i_h, i_a = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0, eos = _seq_bounds(chunk_indices, cu_seqlens, i_t, BT)
    c16 = tl.arange(0, BC)
    cols = tl.arange(0, BT)
    ra = i_a * BC + c16  # this block's rows, inside the chunk
    valid = (t0 + ra) < eos
    offa = (t0 + ra)[:, None] * (H * BT) + i_h * BT
    # All blocks left of the diagonal at once: exp(G_i - G_j) = exp(G_i - G_r) exp(G_r - G_j) with
    # r the row just before this block, so both exponents are <= 0 for every i in the block and
    # every j < r + 1: no factor can overflow however strong the decay (a factor that underflows
    # stands for a product that is smaller still), and the products run on tensor cores as one
    # [BT, BKS] x [BKS, BC] dot per key block (columns >= a*BC are masked to zero).
    left = (cols < i_a * BC) & ((t0 + cols) < eos)
    r_ref = tl.minimum(tl.maximum(t0 + i_a * BC - 1, t0), eos - 1)
    lower = c16[:, None] >= c16[None, :]
    b_alT = tl.zeros([BT, BC], dtype=tl.float32)
    b_plT = tl.zeros([BT, BC], dtype=tl.float32)
    b_a = tl.zeros([BC, BC], dtype=tl.float32)
    b_p = tl.zeros([BC, BC], dtype=tl.float32)
    b_pd = tl.zeros([BC], dtype=tl.float32)
    for i_k in range(0, NK):
        ck = i_k * BKS + tl.arange(0, BKS)
        m = valid[:, None] & (ck[None, :] < K)
        off = (t0 + ra)[:, None] * (H * K) + i_h * K + ck[None, :]
        b_k = tl.load(k + off, mask=m, other=0.0).to(tl.float32)
        b_q = tl.load(q + off, mask=m, other=0.0).to(tl.float32)
        b_G = tl.load(G + off, mask=m, other=0.0)
        if LEFT and i_a > 0:  # sub-chunk 0 has no blocks on its left
            F, R = _left_factors(k, G, b_G, m, left, r_ref, t0, i_h * K, ck, H, K, BT, FAST_EXP)
            # transposed, [BT, BKS] x [BKS, BC]: M = BT rows split over the warps, where the
            # [BC, BT] form's M = 16 puts a whole copy of the tile (and accumulator) on every warp
            b_alT += tl.dot(R, tl.trans(b_k * F), input_precision=DOT_PREC)
            b_plT += tl.dot(R, tl.trans(b_q * F), input_precision=DOT_PREC)
        # P's diagonal needs no exp
        b_pd += tl.sum(b_q * b_k, axis=1)
        # The left-block factorisation applied inside the diagonal block, recursively: at level
        # S = BC, BC/2, ..., 2 the pairs with i in the lower and j in the upper half of the same
        # S-block (_half_pairs). Every pair i > j lies in exactly one level: 4 tiles of BC x BKS
        # exps instead of BC x BC x BKS.
        for lv in tl.static_range(0, 4):
            if (BC >> lv) >= 2:
                d_a, d_p = _half_pairs(b_k, b_q, b_G, G, t0 + i_a * BC, eos, i_h * K, ck,
                                       H, K, BC, BC >> lv, DOT_PREC, FAST_EXP)
                b_a += d_a
                b_p += d_p
    b_p += tl.where(c16[:, None] == c16[None, :], b_pd[:, None], 0.0)
    b_al = tl.trans(b_alT)
    b_pl = tl.trans(b_plT)
    b_a = tl.where(c16[:, None] > c16[None, :], b_a, 0.0)
    b_p = tl.where(lower, b_p, 0.0)
    if LEFT:
        ml = valid[:, None] & (cols[None, :] < i_a * BC)
        tl.store(A + offa + cols[None, :], b_al, mask=ml)
        tl.store(P + offa + cols[None, :], b_pl.to(P.dtype.element_ty), mask=ml)
    tl.store(A + offa + i_a * BC + c16[None, :], b_a, mask=valid[:, None])
    tl.store(P + offa + i_a * BC + c16[None, :], b_p.to(P.dtype.element_ty), mask=valid[:, None])
    # (I + A_aa)^-1 = (I + N)(I + N^2)(I + N^4)(I + N^8) with N = -A_aa (strictly lower, so
    # N^16 = 0): six 16x16 products at INV_PREC instead of a 15-step serial substitution in
    # chunk_prep's 64x64 tiles.
    eye = tl.where(c16[:, None] == c16[None, :], 1.0, 0.0)
    b_n = -b_a
    b_n2 = tl.dot(b_n, b_n, input_precision=INV_PREC)
    b_n4 = tl.dot(b_n2, b_n2, input_precision=INV_PREC)
    b_n8 = tl.dot(b_n4, b_n4, input_precision=INV_PREC)
    b_t = eye + b_n + b_n2 + tl.dot(b_n, b_n2, input_precision=INV_PREC)
    b_t += tl.dot(b_t, b_n4, input_precision=INV_PREC)
    b_t += tl.dot(b_t, b_n8, input_precision=INV_PREC)
    tl.store(Tm + offa + i_a * BC + c16[None, :], b_t, mask=valid[:, None])


@triton.jit
def chunk_tsolve_kernel(A, Tm, chunk_indices, cu_seqlens, H: tl.constexpr, BT: tl.constexpr,
                        BC: tl.constexpr, INV_PREC: tl.constexpr):
    """Per chunk: T = (I + A)^-1 into Tm (which holds the diagonal-block inverses on entry).

    Its own kernel because the tf32x3 products (three tensor-core passes on split operands) on
    [BT, BT] tiles take ~90 more registers per thread than anything else in the forward: fused
    with the W/U products they held chunk_prep at 254 registers (one CTA per SM). Bytes per
    (chunk, head): 2 BT^2 fp32 read, BT^2 fp32 written.
    """
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    t0, eos = _seq_bounds(chunk_indices, cu_seqlens, i_t, BT)
    rows = tl.arange(0, BT)
    cols = tl.arange(0, BT)
    rb = rows // BC
    cb = cols // BC
    valid = (t0 + rows) < eos
    offc = (t0 + rows)[:, None] * (H * BT) + i_h * BT + cols[None, :]
    # The inverses D^-1 of the 16x16 diagonal blocks come from chunk_intra (in the diagonal blocks
    # of Tm); with M = D^-1 L (L = the blocks of A below the diagonal, M^NS = 0):
    # T = (I - M + M^2 - M^3) D^-1 = (I + M^2)(I - M) D^-1, exact for NS <= 4. Evaluated as
    # Y = D^-1 - M D^-1, T = Y + M^2 Y so that at most three [BT, BT] fp32 tiles are live (no
    # identity tile, no separate A tile).
    b_Td = tl.load(Tm + offc, mask=valid[:, None] & (rb[:, None] == cb[None, :]), other=0.0)
    # only the strictly lower part of A was written (NaN-poisoned or stale elsewhere)
    b_L = tl.load(A + offc, mask=valid[:, None] & (rb[:, None] > cb[None, :]), other=0.0)
    b_M = tl.dot(b_Td, b_L, input_precision=INV_PREC)
    b_T = b_Td - tl.dot(b_M, b_Td, input_precision=INV_PREC)
    b_M = tl.dot(b_M, b_M, input_precision=INV_PREC)
    b_T += tl.dot(b_M, b_T, input_precision=INV_PREC)
    tl.store(Tm + offc, b_T, mask=valid[:, None])


@triton.jit
def chunk_prep_kernel(k, v, G, Tm, W, U, QG, KD, q, chunk_indices, cu_seqlens,
                      H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                      BKS: tl.constexpr, DOT_PREC: tl.constexpr, NSB: tl.constexpr = 1,
                      PREP_BF16: tl.constexpr = 0, NATIVE: tl.constexpr = 1):
    """Per (chunk, head, group s of NSB column blocks): W = T (K e^G), QG = Q e^G, KD = K e^(G_C - G)
    on key columns [b BKS, (b+1) BKS) and U = T V on the same value columns (either part skipped
    past K or V), for the blocks b of the group. Splitting columns over programs keeps each small
    (one dot per part); every program re-reads T (BT^2 fp32, from L2). Bytes per (chunk, head):
    BT^2 fp32 per program + 3 BT K bf16 and BT K fp32 in, BT V bf16 in; 3 BT K + BT V bf16 out.
    Variants (scripts/sweep_delta_fwd_variants.py; PREP_BEST): NSB > 1 loops over NSB column
    blocks with T loaded once (default 1: max(K, V) / BKS programs per chunk and head, each loading
    and converting the same [BT, BT] T: 4 x 16 KB at BKS 32, K = V = 128); PREP_BF16 (bf16 inputs
    only) runs the two products on bf16 operands (T, K e^G and V rounded; fp32 accumulation): the
    results are stored in bf16 anyway, and bf16 MMAs issue half the instructions of tf32 ones.
    """
    i_t, i_h, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0, eos = _seq_bounds(chunk_indices, cu_seqlens, i_t, BT)
    rows = tl.arange(0, BT)
    cols = tl.arange(0, BT)
    valid = (t0 + rows) < eos
    last = tl.minimum(t0 + BT, eos) - 1
    offc = (t0 + rows)[:, None] * (H * BT) + i_h * BT + cols[None, :]
    # T is lower triangular (chunk_tsolve stores its upper part as zeros)
    b_T = tl.load(Tm + offc, mask=valid[:, None], other=0.0)
    if PREP_BF16:  # rounded once, not per column block
        b_T = b_T.to(tl.bfloat16)
    for j in range(0, NSB):
        i_b = i_s * NSB + j
        cs = i_b * BKS + tl.arange(0, BKS)
        if i_b * BKS < K:
            m = valid[:, None] & (cs[None, :] < K)
            off = (t0 + rows)[:, None] * (H * K) + i_h * K + cs[None, :]
            b_k = tl.load(k + off, mask=m, other=0.0).to(tl.float32)
            b_G = tl.load(G + off, mask=m, other=0.0)
            b_eG = tl.exp(b_G)
            b_W = _mm_rnd(b_T, b_k * b_eG, PREP_BF16, NATIVE, DOT_PREC)
            tl.store(W + off, b_W.to(W.dtype.element_ty), mask=m)
            b_q = tl.load(q + off, mask=m, other=0.0).to(tl.float32)
            tl.store(QG + off, (b_q * b_eG).to(QG.dtype.element_ty), mask=m)
            G_l = tl.load(G + last * (H * K) + i_h * K + cs, mask=cs < K, other=0.0)
            b_kd = tl.where(m, b_k * tl.exp(tl.where(m, G_l[None, :] - b_G, 0.0)), 0.0)
            tl.store(KD + off, b_kd.to(KD.dtype.element_ty), mask=m)
        if i_b * BKS < V:
            mv = valid[:, None] & (cs[None, :] < V)
            offv = (t0 + rows)[:, None] * (H * V) + i_h * V + cs[None, :]
            b_v = tl.load(v + offv, mask=mv, other=0.0)
            b_U = _mm_rnd(b_T, b_v, PREP_BF16, NATIVE, DOT_PREC)
            tl.store(U + offv, b_U.to(U.dtype.element_ty), mask=mv)


@triton.jit
def chunk_fwd_o_kernel(QG, P, vn, h, o, chunk_indices, cu_seqlens, scale,
                       H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                       BK: tl.constexpr, BV: tl.constexpr, OP_BF16: tl.constexpr,
                       DOT_PREC: tl.constexpr):
    """O = scale * ((Q e^G) S + P Vn) per (V tile, chunk, head), from the saved chunk-start
    states: off the sequential path, parallel over chunks."""
    i_v, i_t, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0, eos = _seq_bounds(chunk_indices, cu_seqlens, i_t, BT)
    rows = tl.arange(0, BT)
    cols = tl.arange(0, BT)
    ck = tl.arange(0, BK)
    cv = i_v * BV + tl.arange(0, BV)
    valid = (t0 + rows) < eos
    m = valid[:, None] & (ck[None, :] < K)
    mv = valid[:, None] & (cv[None, :] < V)
    mkv = (ck[:, None] < K) & (cv[None, :] < V)
    off = (t0 + rows)[:, None] * (H * K) + i_h * K + ck[None, :]
    offv = (t0 + rows)[:, None] * (H * V) + i_h * V + cv[None, :]
    offc = (t0 + rows)[:, None] * (H * BT) + i_h * BT + cols[None, :]
    # chunk_indices is sequence-major, so the global chunk id i_t also indexes h
    b_S = tl.load(h + (i_t * H + i_h) * K * V + ck[:, None] * V + cv[None, :], mask=mkv, other=0.0)
    b_qg = tl.load(QG + off, mask=m, other=0.0)
    b_vn = tl.load(vn + offv, mask=mv, other=0.0)
    # only the lower triangle of P is written
    b_P = tl.load(P + offc, mask=valid[:, None] & (rows[:, None] >= cols[None, :]), other=0.0)
    b_o = _mm(b_qg, b_S, OP_BF16, DOT_PREC) + _mm(b_P, b_vn, OP_BF16, DOT_PREC)
    tl.store(o + offv, (b_o * scale).to(o.dtype.element_ty), mask=mv)


_CHOSEN: dict = {}
COMPILED: dict = {}  # last compiled kernel per name (n_regs / n_spills for profiling)


def launch(kernel, grid_fn, args, consts, options):
    """Launch ``kernel`` with the first of ``options`` (tile sizes, num_warps, num_stages) that
    fits the device; remember it per kernel and constants. Falling back on ``OutOfResources``
    keeps a card with less shared memory working instead of crashing; the first option is the
    one the CPU interpreter runs. All options compute the same thing.
    """
    from triton.runtime.errors import OutOfResources

    # the first option is part of the key: a caller may order the same list differently per shape
    key = (kernel.fn.__name__, PIPELINE_STAGES, tuple(sorted(consts.items())),
           tuple(sorted(options[0].items())))
    start = _CHOSEN.get(key, 0)
    err = None
    for i in range(start, len(options)):
        opt = options[i]
        try:
            COMPILED[kernel.fn.__name__] = kernel[grid_fn(opt)](*args, **consts, **opt)
        except OutOfResources as e:
            err = e
            continue
        _CHOSEN[key] = i
        return opt
    raise err


def precisions(dtype: torch.dtype) -> dict:
    """Dot settings per input dtype: fp32 inputs ask for fp32-accurate products (ieee); bf16 runs
    the state products in bf16, fp16 in tf32; the small triangular inverse always uses tf32x3 or
    better, since every later product inherits its error."""
    fp32 = dtype == torch.float32
    # The CPU interpreter (Triton 3.9) multiplies bf16 dot operands wrongly, so under it the bf16
    # path runs its products in fp32; the GPU bf16 path is checked by the gpu test and benchmark.
    return dict(DOT_PREC="ieee" if fp32 else "tf32", INV_PREC="ieee" if fp32 else "tf32x3",
                OP_BF16=dtype == torch.bfloat16 and not interpreted())


def chunk_fwd(q, k, v, g, scale, initial_state, output_final_state, meta, save):
    """Forward on flattened tensors ``q, k: [NTOK,H,K]``, ``v: [NTOK,H,V]``, ``g: [NTOK,H(,K)]``.

    ``meta`` holds ``cu_seqlens`` (int32 [N+1]), ``chunk_indices`` (int32 [NT, 2]),
    ``chunk_offsets`` (int32 [N+1]) and ``BT``. Returns ``(o, final_state, saved)`` where ``saved``
    is the dict of intermediates the backward needs (None unless ``save``).
    """
    NTOK, H, K = q.shape
    V = v.shape[-1]
    BT = meta["BT"]
    N = meta["cu_seqlens"].numel() - 1
    NT = meta["chunk_indices"].shape[0]
    BK = max(16, triton.next_power_of_2(K))
    dev = q.device
    pr = precisions(q.dtype)
    ci, cu = meta["chunk_indices"], meta["cu_seqlens"]
    G = torch.empty(NTOK, H, K, device=dev, dtype=torch.float32)
    chunk_cumsum_kernel[(NT, H)](g, G, ci, cu, H=H, K=K, BT=BT, BK=BK, G_SCALAR=g.dim() == 2,
                                 num_warps=4, num_stages=1)
    Tm = torch.empty(NTOK, H, BT, device=dev, dtype=torch.float32)
    A = torch.empty_like(Tm)
    # P and Vn only ever enter products through _mm, which rounds them to bf16 on the bf16 path
    # (forward o, backward dVn / dP / dKd): stored in bf16 there, with the same rounding, they
    # move half the bytes (P: NTOK H BT, Vn: NTOK H V words; written once, read 2-3 times).
    opd = torch.bfloat16 if pr["OP_BF16"] else torch.float32
    P = torch.empty(NTOK, H, BT, device=dev, dtype=opd)
    from catkit.ops.delta_rule.chunk_fwd_intra import intra_solve  # (it imports this module)

    # P, and T = (I + A)^-1 into Tm: chunk_intra + chunk_tsolve, or a per-chunk FUSED variant
    intra_solve((q, k, G, A, P, Tm, ci, cu), NT, H, K, BT, pr, intra_options(BK, K), tsolve_options())
    W = torch.empty(NTOK, H, K, device=dev, dtype=q.dtype)
    QG, KD = torch.empty_like(W), torch.empty_like(W)
    U = torch.empty(NTOK, H, V, device=dev, dtype=q.dtype)
    native = not interpreted()
    launch(chunk_prep_kernel, lambda o: (NT, H, triton.cdiv(max(K, V), o["BKS"] * o.get("NSB", 1))),
           (k, v, G, Tm, W, U, QG, KD, q, ci, cu),
           dict(H=H, K=K, V=V, BT=BT, DOT_PREC=pr["DOT_PREC"], NATIVE=native),
           for_inputs(prep_options(K, V), q.dtype, BK))
    o = torch.empty(NTOK, H, V, device=dev, dtype=q.dtype)
    # Vn and the per-chunk start states are written even for inference: the output kernel reads
    # them (and an earlier variant that skipped them hit an illegal memory access on an H200 with
    # Triton 3.6).
    vn = torch.empty(NTOK, H, V, device=dev, dtype=opd)
    sopts = for_inputs(state_options(V, N * H, dev), q.dtype, BK)
    # H_BF16 (a host option of the state pass, see chunk_fwd_state.py): h in bf16 on the bf16 path
    h = torch.empty(NT, H, K, V, device=dev, dtype=torch.bfloat16 if sopts[0].get("H_BF16") else torch.float32)
    ht = torch.empty(N, H, K, V, device=dev, dtype=torch.float32) if output_final_state else o
    h0 = initial_state if initial_state is not None else o
    launch(chunk_fwd_state_kernel, lambda opt: (triton.cdiv(V, opt["BV"]), N * H),
           (U, W, KD, G, vn, h, h0, ht, cu, meta["chunk_offsets"]),
           dict(H=H, K=K, V=V, BT=BT, BK=BK, HAS_H0=initial_state is not None,
                STORE_FINAL=output_final_state, DOT_PREC=pr["DOT_PREC"], NATIVE=native), _kernel_opts(sopts))
    launch(chunk_fwd_o_kernel, lambda opt: (triton.cdiv(V, opt["BV"]), NT, H),
           (QG, P, vn, h, o, ci, cu, scale),
           dict(H=H, K=K, V=V, BT=BT, BK=BK, OP_BF16=pr["OP_BF16"], DOT_PREC=pr["DOT_PREC"]),
           _kernel_opts(o_options(V)))
    saved = dict(G=G, Tm=Tm, W=W, P=P, vn=vn, h=h, QG=QG, KD=KD) if save else None
    return o, (ht if output_final_state else None), saved


# Software-pipelining depth tried first (1 = none). Measured on an H200 with Triton 3.6: depth 2
# miscompiles the bf16 backward (dq off by 7e-2 relative RMS), depth 1 is correct, so 1 is the
# default; raise it only after the gpu test passes with it. ``launch`` falls back to smaller
# tiles on OutOfResources.
PIPELINE_STAGES = 1


def _stages():
    return sorted({PIPELINE_STAGES, 1}, reverse=True)


def vtile_options(V):
    """(BV, num_warps, num_stages) to try, largest first."""
    top = min(32, max(16, triton.next_power_of_2(V)))
    return [dict(BV=bv, num_warps=w, num_stages=st) for st in _stages()
            for bv in sorted({top, 16}, reverse=True) for w in (8, 4)]


def intra_options(BK, K):
    """(BKS, NK, FAST_EXP, num_warps, num_stages) for the small per-sub-chunk kernel, fastest
    first. Measured on an H200 (Triton 3.6, bf16, K = 128, 32K tokens x 16 heads;
    scripts/sweep_delta_intra.py): BKS 32 / 2 warps 1.22 ms (255 registers, 2 spilled), BKS 16 /
    2 warps 1.45 ms, BKS 16 / 4 warps 1.84 ms, BKS 32 / 4 warps 1.90 ms; 8 warps 3.9-5.2 ms.
    FAST_EXP (ex2.approx.ftz) is GPU-only PTX: off under the interpreter. INTRA_BEST (the sweep's
    winner, e.g. a FUSED option of intra_sweep_options) goes first."""
    opts = [dict(BKS=b, NK=triton.cdiv(K, b), FAST_EXP=not interpreted(), num_warps=w, num_stages=st)
            for st in _stages() for b, w in ((32, 2), (16, 2), (16, 4), (32, 4))]
    best = INTRA_BEST and dict(INTRA_BEST, FAST_EXP=not interpreted(), NK=triton.cdiv(K, INTRA_BEST["BKS"]))
    return best_first(best, opts, BK)


# Fastest correct options of scripts/sweep_delta_fwd_variants.py (its BEST_FWD_OPTION lines), tried
# before the GPU-verified defaults (STATE_BEST / STATE_BEST_FEW live in chunk_fwd_state.py); None
# keeps the default first.
# Measured on an H100 (Triton 3.6, bf16, H = 16, K = V = 128, 16 x 2048 and 1 x 32768 tokens;
# scripts/sweep_delta_fwd_variants.py, ms at the two shapes): chunk_prep BKS 64 / NSB 2 /
# PREP_BF16 / 8 warps 0.53 / 0.54 (default BKS 32 / 4 warps 0.85 / 0.85); chunk_fwd_o BV 64 /
# 4 warps 0.35 on an fp32 h, 0.27 on a bf16 one (default BV 32 / 8 warps 0.42, 0.36); the fused
# intra + solve below 1.13 / 1.13 (chunk_intra + chunk_tsolve 1.57 / 1.57).
PREP_BEST = dict(BKS=64, num_warps=8, num_stages=1, NSB=2, PREP_BF16=1)
O_BEST = dict(BV=64, num_warps=4, num_stages=1)
TSOLVE_BEST = None
# chunk_intra + chunk_tsolve (an option with FUSED = 1 replaces both, see chunk_fwd_intra.py)
INTRA_BEST = dict(FUSED=1, DIAG=1, BKS=32, NK=4, FAST_EXP=True, num_warps=2, num_stages=1, DBKS=16, DW=2)


def for_inputs(opts, dtype, BK):
    """The variant switches a call can honour: bf16-operand variants (STATE_BF16, PREP_BF16,
    H_BF16) only for bf16 inputs, KSPLIT 2 only where each half holds >= 16 key channels."""
    bf16 = dtype == torch.bfloat16
    out = []
    for o in opts:
        o = dict(o)
        for n in ("STATE_BF16", "PREP_BF16", "H_BF16"):
            if n in o and not bf16:
                o[n] = 0
        if o.get("KSPLIT", 1) > 1 and BK < 32:
            o["KSPLIT"] = 1
        out.append(o)
    return out


def _kernel_opts(opts):
    # H_BF16 is the host's (the dtype of h); the kernels store to / read from whatever h is
    return [{n: v for n, v in o.items() if n != "H_BF16"} for o in opts]


def tsolve_options():
    """num_warps for chunk_tsolve (one [BT, BT] program per chunk and head)."""
    return best_first(TSOLVE_BEST, [dict(num_warps=4, num_stages=1), dict(num_warps=8, num_stages=1)])


def o_options(V):
    """(BV, num_warps, num_stages) for chunk_fwd_o (52 registers at BV 32 on sm_90a)."""
    return best_first(O_BEST, vtile_options(V))


def prep_options(K, V):
    """(BKS, num_warps, num_stages[, NSB, PREP_BF16]) for chunk_prep: column block width
    (programs per chunk and head = max(K, V) / (BKS NSB)). 94 registers at BKS 32, 4 warps
    (sm_90a estimate)."""
    top = min(32, max(16, triton.next_power_of_2(max(K, V))))
    return best_first(PREP_BEST, [dict(BKS=b, num_warps=w, num_stages=st) for st in _stages()
                                  for b in sorted({top, 16}, reverse=True) for w in (4, 8)],
                      max(16, triton.next_power_of_2(max(K, V))))
