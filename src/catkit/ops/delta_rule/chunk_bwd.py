"""Backward kernels of the chunked delta rule (see chunk_fwd.py for the forward algebra).

Per chunk, with S the chunk-start state, dS_C the gradient of the chunk-end state and
Kd = K * exp(G_C - G)::

    dVn  = scale * P^T dO + Kd dS_C                                  (sequential, reverse)
    dS   = scale * (Q exp G)^T dO + exp(G_C) dS_C - W^T dVn          (carried to the previous chunk)
    dW = -dVn S^T,  dT = dVn V^T + dW (K exp G)^T,  dV = T^T dVn,  dA = -T^T dT T^T
    dP = scale * dO Vn^T, then dq, dk, dG from P and A, whose entries hold exp(G_i - G_j),
    and finally dg = reverse cumsum of dG inside the chunk (G is a within-chunk cumulative sum).

``chunk_bwd_dv_local`` writes the chunk-local part of dVn (parallel over chunks);
``chunk_bwd_state`` runs the reverse recurrence per (sequence, head, V tile); ``chunk_bwd_dap``
(per chunk) writes dv~ and the gradients of A and P. dq, dk~ and dg (fp32, per channel) come from
two kernels per (block of key channels, chunk, head) instead of one fused kernel (255 registers
with spills on sm_90, one program per SM): ``chunk_bwd_dqkg_inter`` does all the tensor-core work
(the V loop with the states, T^T dW, the sub-chunk blocks of A and P below the diagonal) and writes
partial dq, dk~ (fp32 scratch) and dG; ``chunk_bwd_dqkg_intra`` adds the diagonal 16x16 blocks
(per-pair exponents, a latency-bound elementwise loop at about 80 registers, several programs per
SM) and writes dq, dk~ and dg. Both carry variants behind constexpr switches (same math, other
products; dqkg_inter: SPLIT, AP_BF16; dqkg_intra: DIAG) that scripts/sweep_delta_bwd_variants.py
times; its winners go into DQKG_INTER_BEST / DQKG_INTRA_BEST / DAP_BEST.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from catkit.ops.delta_rule.chunk_fwd import (_mm, _seq_bounds, _stages, launch, precisions,
                                             vtile_options)
# one bf16-rounding product helper and one hook-ordering helper for the forward and the backward
from catkit.ops.delta_rule.chunk_fwd_state import _mm_rnd, _seq_span, best_first


@triton.jit
def chunk_bwd_state_kernel(QG, KD, W, G, do, dvn, dh, dht, dh0, cu_seqlens, chunk_offsets, scale,
                           H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                           BK: tl.constexpr, BV: tl.constexpr, HAS_DHT: tl.constexpr,
                           STORE_DH0: tl.constexpr, OP_BF16: tl.constexpr, DOT_PREC: tl.constexpr):
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h, bos, eos, boh, NC = _seq_span(cu_seqlens, chunk_offsets, i_nh, H, BT)
    rows = tl.arange(0, BT)
    ck = tl.arange(0, BK)
    cv = i_v * BV + tl.arange(0, BV)
    mkv = (ck[:, None] < K) & (cv[None, :] < V)
    off_s = i_h * K * V + ck[:, None] * V + cv[None, :]
    b_dS = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DHT:
        b_dS = tl.load(dht + i_n * H * K * V + off_s, mask=mkv, other=0.0)
    for cc in range(0, NC):
        c = NC - 1 - cc
        t0 = bos + c * BT
        valid = (t0 + rows) < eos
        m = valid[:, None] & (ck[None, :] < K)
        mv = valid[:, None] & (cv[None, :] < V)
        tl.store(dh + (boh + c) * H * K * V + off_s, b_dS, mask=mkv)
        off = (t0 + rows)[:, None] * (H * K) + i_h * K + ck[None, :]
        offv = (t0 + rows)[:, None] * (H * V) + i_h * V + cv[None, :]
        b_W = tl.load(W + off, mask=m, other=0.0)
        b_qg = tl.load(QG + off, mask=m, other=0.0)
        b_kd = tl.load(KD + off, mask=m, other=0.0)
        b_do = tl.load(do + offv, mask=mv, other=0.0)
        last = tl.minimum(t0 + BT, eos) - 1
        G_l = tl.load(G + last * (H * K) + i_h * K + ck, mask=ck < K, other=0.0)
        # dvn holds the chunk-local part scale * P^T dO (chunk_bwd_dv_local); add the state's
        b_dvn = tl.load(dvn + offv, mask=mv, other=0.0) + _mm(b_kd, b_dS, OP_BF16, DOT_PREC)
        tl.store(dvn + offv, b_dvn, mask=mv)
        b_dS = b_dS * tl.exp(G_l)[:, None] + scale * _mm(tl.trans(b_qg), b_do, OP_BF16, DOT_PREC)
        b_dS -= _mm(tl.trans(b_W), b_dvn, OP_BF16, DOT_PREC)
    if STORE_DH0:
        tl.store(dh0 + i_n * H * K * V + off_s, b_dS, mask=mkv)


@triton.jit
def chunk_bwd_dv_local_kernel(P, do, dvn, chunk_indices, cu_seqlens, scale,
                              H: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
                              OP_BF16: tl.constexpr, DOT_PREC: tl.constexpr):
    # The state-independent part of dVn, scale * P^T dO, in parallel over chunks, so that the
    # sequential chunk_bwd_state does one product fewer per chunk.
    i_v, i_t, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0, eos = _seq_bounds(chunk_indices, cu_seqlens, i_t, BT)
    rows = tl.arange(0, BT)
    cols = tl.arange(0, BT)
    cv = i_v * BV + tl.arange(0, BV)
    valid = (t0 + rows) < eos
    mv = valid[:, None] & (cv[None, :] < V)
    offv = (t0 + rows)[:, None] * (H * V) + i_h * V + cv[None, :]
    offc = (t0 + rows)[:, None] * (H * BT) + i_h * BT + cols[None, :]
    # only the lower triangle of P is written
    b_P = tl.load(P + offc, mask=valid[:, None] & (rows[:, None] >= cols[None, :]), other=0.0)
    b_do = tl.load(do + offv, mask=mv, other=0.0)
    tl.store(dvn + offv, scale * _mm(tl.trans(b_P), b_do, OP_BF16, DOT_PREC), mask=mv)


@triton.jit
def chunk_bwd_dap_kernel(k, v, G, Tm, vn, h, do, dvn, dv, dA, dP, chunk_indices, cu_seqlens, scale,
                         H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                         BK: tl.constexpr, BV: tl.constexpr, OP_BF16: tl.constexpr,
                         DOT_PREC: tl.constexpr):
    # dT = dU V^T + dW (K e^G)^T with dU = dVn, dW = -dVn S^T, i.e. dT = dVn (V - (K e^G) S)^T:
    # a sum over V that needs no [C, K] gradient tile here.
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    t0, eos = _seq_bounds(chunk_indices, cu_seqlens, i_t, BT)
    rows = tl.arange(0, BT)
    cols = tl.arange(0, BT)
    ck = tl.arange(0, BK)
    valid = (t0 + rows) < eos
    m = valid[:, None] & (ck[None, :] < K)
    off = (t0 + rows)[:, None] * (H * K) + i_h * K + ck[None, :]
    offc = (t0 + rows)[:, None] * (H * BT) + i_h * BT + cols[None, :]
    b_k = tl.load(k + off, mask=m, other=0.0).to(tl.float32)
    b_G = tl.load(G + off, mask=m, other=0.0)
    b_kg = b_k * tl.exp(b_G)
    b_T = tl.load(Tm + offc, mask=valid[:, None], other=0.0)
    b_dT = tl.zeros([BT, BT], dtype=tl.float32)
    b_dP = tl.zeros([BT, BT], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(V, BV)):
        cv = i_v * BV + tl.arange(0, BV)
        mv = valid[:, None] & (cv[None, :] < V)
        mkv = (ck[:, None] < K) & (cv[None, :] < V)
        offv = (t0 + rows)[:, None] * (H * V) + i_h * V + cv[None, :]
        b_S = tl.load(h + (i_t * H + i_h) * K * V + ck[:, None] * V + cv[None, :], mask=mkv, other=0.0)
        b_v = tl.load(v + offv, mask=mv, other=0.0).to(tl.float32)
        b_vn = tl.load(vn + offv, mask=mv, other=0.0)
        b_dvn = tl.load(dvn + offv, mask=mv, other=0.0)
        b_do = tl.load(do + offv, mask=mv, other=0.0).to(tl.float32)
        b_r = b_v - _mm(b_kg, b_S, OP_BF16, DOT_PREC)
        b_dT += _mm(b_dvn, tl.trans(b_r), OP_BF16, DOT_PREC)
        b_dP += _mm(b_do, tl.trans(b_vn), OP_BF16, DOT_PREC)
        b_dv = _mm(tl.trans(b_T), b_dvn, OP_BF16, DOT_PREC)
        tl.store(dv + offv, b_dv.to(dv.dtype.element_ty), mask=mv)
    b_dP = tl.where((rows[:, None] >= cols[None, :]) & valid[:, None], b_dP * scale, 0.0)
    b_dA = -tl.dot(tl.trans(b_T), tl.dot(b_dT, tl.trans(b_T), input_precision=DOT_PREC),
                   input_precision=DOT_PREC)
    b_dA = tl.where((rows[:, None] > cols[None, :]) & valid[:, None], b_dA, 0.0)
    mc = valid[:, None] & (cols[None, :] < BT)
    tl.store(dA + offc, b_dA, mask=mc)
    tl.store(dP + offc, b_dP, mask=mc)


@triton.jit
def chunk_bwd_dqkg_inter_kernel(q, k, G, Tm, vn, h, dh, do, dvn, dA, dP, dq0, dk0, dg,
                                chunk_indices, cu_seqlens, scale,
                                H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                                BC: tl.constexpr, BKS: tl.constexpr, BV: tl.constexpr,
                                OP_BF16: tl.constexpr, DOT_PREC: tl.constexpr,
                                SPLIT: tl.constexpr = 0, AP_BF16: tl.constexpr = 0):
    # dq, dk~, dG of everything but the diagonal 16x16 blocks of A and P, per (block of BKS key
    # channels, chunk, head): the V loop with the states (dW = -dVn S^T, dKd = Vn dS_C^T,
    # dQ = dO S^T, dG_C), dKg = T^T dW, then the blocks of A and P below the diagonal (tensor-core
    # products). Writes the partial dq, dk~ (fp32 scratch) and dG (into dg) that
    # chunk_bwd_dqkg_intra completes. The key block is the fastest grid axis, so the programs
    # sharing a chunk's Vn, dVn, dO, T, dA, dP run together and find them in L2.
    # Variants (same math; the sweep scripts/sweep_delta_bwd_variants.py picks one):
    #   SPLIT 0: per column block b, four [BT, BT] x [BT, BKS] products on the whole dA / dP tiles
    #            (rows or columns outside the block pair masked to zero);
    #   SPLIT 1: per step b, four [BT, BC] x [BC, BKS] products on slices of dA / dP read from
    #            memory (L2): a quarter of the MMA work and no [BT, BT] tile in registers.
    #   AP_BF16 (bf16 inputs only): 1 rounds the operands of the dP products to bf16 (the forward
    #            rounds P itself to bf16 and multiplies it in bf16), 2 also those of the dA products
    #            (A and T are tf32 in the forward: below its precision, a sweep candidate only).
    i_k, i_t, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0, eos = _seq_bounds(chunk_indices, cu_seqlens, i_t, BT)
    rows = tl.arange(0, BT)
    cols = tl.arange(0, BT)
    ck = i_k * BKS + tl.arange(0, BKS)
    valid = (t0 + rows) < eos
    m = valid[:, None] & (ck[None, :] < K)
    off = (t0 + rows)[:, None] * (H * K) + i_h * K + ck[None, :]
    offc = (t0 + rows)[:, None] * (H * BT) + i_h * BT + cols[None, :]
    last = tl.minimum(t0 + BT, eos) - 1

    b_dW = tl.zeros([BT, BKS], dtype=tl.float32)
    b_dKd = tl.zeros([BT, BKS], dtype=tl.float32)
    b_dQ = tl.zeros([BT, BKS], dtype=tl.float32)
    b_dGl = tl.zeros([BKS], dtype=tl.float32)
    # chunk_indices is sequence-major, so the global chunk id i_t also indexes h and dh
    for i_v in range(0, tl.cdiv(V, BV)):
        cv = i_v * BV + tl.arange(0, BV)
        mv = valid[:, None] & (cv[None, :] < V)
        mkv = (ck[:, None] < K) & (cv[None, :] < V)
        offv = (t0 + rows)[:, None] * (H * V) + i_h * V + cv[None, :]
        off_s = (i_t * H + i_h) * K * V + ck[:, None] * V + cv[None, :]
        b_S = tl.load(h + off_s, mask=mkv, other=0.0)
        b_dSC = tl.load(dh + off_s, mask=mkv, other=0.0)
        b_vn = tl.load(vn + offv, mask=mv, other=0.0)
        b_dvn = tl.load(dvn + offv, mask=mv, other=0.0)
        b_do = tl.load(do + offv, mask=mv, other=0.0).to(tl.float32)
        b_dW -= _mm(b_dvn, tl.trans(b_S), OP_BF16, DOT_PREC)
        b_dKd += _mm(b_vn, tl.trans(b_dSC), OP_BF16, DOT_PREC)
        b_dQ += _mm(b_do, tl.trans(b_S), OP_BF16, DOT_PREC)
        b_dGl += tl.sum(b_S * b_dSC, axis=1)

    b_T = tl.load(Tm + offc, mask=valid[:, None], other=0.0)
    b_G = tl.load(G + off, mask=m, other=0.0)
    G_l = tl.load(G + last * (H * K) + i_h * K + ck, mask=ck < K, other=0.0)
    b_eG = tl.exp(b_G)
    # dk~ = (T^T dW) e^G + dKd e^(G_C - G);  dG = q dq + k (T^T dW) e^G - k dKd e^(G_C - G) + dG_C
    b_dKg = tl.dot(tl.trans(b_T), b_dW, input_precision=DOT_PREC) * b_eG
    b_dKd = b_dKd * tl.where(m, tl.exp(tl.where(m, G_l[None, :] - b_G, 0.0)), 0.0)
    b_dQ = b_dQ * scale * b_eG
    b_q = tl.load(q + off, mask=m, other=0.0).to(tl.float32)
    b_k = tl.load(k + off, mask=m, other=0.0).to(tl.float32)
    b_dGl = b_dGl * tl.exp(G_l) + tl.sum(b_k * b_dKd, axis=0)
    # Three accumulators: dq, dk~ and X with dG = q dq + k X (+ dG_C on the last row)
    acc_dk = b_dKg + b_dKd
    acc_x = b_dKg - b_dKd

    # Blocks of A and P below the diagonal (sub-chunk blocks): P_ij and A_ij hold exp(G_ic - G_jc)
    # per channel, factored through the last row r of column block b, exp(G_i - G_r) (F, rows
    # below block b) times exp(G_r - G_j) (rows up to block b), both exponents <= 0 (see
    # chunk_prep); the two sides occupy disjoint rows and share one exp. dP feeds dq and, with dA,
    # the dk~ of the rows j (gathered over the rows i below them); dA feeds dk~.
    NS: tl.constexpr = BT // BC
    RP: tl.constexpr = AP_BF16 >= 1  # chunk_bwd passes 0 unless the inputs are bf16
    RA: tl.constexpr = AP_BF16 >= 2
    rb = rows // BC
    if NS > 1:
        if SPLIT:
            # Step b pairs column block b (j) with the rows i below it for dq and the A part of
            # dk~_i (K = BC: j runs over block b only), and row block a = b + 1 (i) with the rows
            # j above it for the gather into dk~_j (K = BC: i runs over block a only). Both
            # through r = last row of block b: every pair i > j of different blocks is met once
            # on each side (j in block b, resp. i in block b + 1), every exponent is <= 0.
            c16 = tl.arange(0, BC)
            for b in range(0, NS - 1):
                r_ref = tl.minimum(t0 + b * BC + BC - 1, eos - 1)
                G_r = tl.load(G + r_ref * (H * K) + i_h * K + ck, mask=ck < K, other=0.0)
                lm = (rb > b)[:, None] & m
                um = (rb <= b)[:, None] & m
                e = tl.exp(tl.where(lm, b_G - G_r[None, :], tl.where(um, G_r[None, :] - b_G, 0.0)))
                F = tl.where(lm, e, 0.0)
                E = tl.where(um, e, 0.0)
                tb = t0 + b * BC + c16  # rows of block b; tb + BC: rows of block a
                mb = (tb < eos)[:, None] & (ck[None, :] < K)
                ma = ((tb + BC) < eos)[:, None] & (ck[None, :] < K)
                offb = tb[:, None] * (H * K) + i_h * K + ck[None, :]
                offa = offb + BC * (H * K)
                G_b = tl.load(G + offb, mask=mb, other=0.0)
                kr_b = tl.where(mb, tl.load(k + offb, mask=mb, other=0.0).to(tl.float32)
                                * tl.exp(tl.where(mb, G_r[None, :] - G_b, 0.0)), 0.0)
                G_a = tl.load(G + offa, mask=ma, other=0.0)
                e_a = tl.where(ma, tl.exp(tl.where(ma, G_a - G_r[None, :], 0.0)), 0.0)
                qF_a = tl.load(q + offa, mask=ma, other=0.0).to(tl.float32) * e_a
                kF_a = tl.load(k + offa, mask=ma, other=0.0).to(tl.float32) * e_a
                # [BT, BC] slices: columns of block b (rows below it), and the transposed rows of
                # block a (columns up to block b)
                offcb = (t0 + rows)[:, None] * (H * BT) + i_h * BT + b * BC + c16[None, :]
                mcb = ((rb > b) & valid)[:, None] & (c16 < BC)[None, :]
                offra = (tb + BC)[None, :] * (H * BT) + i_h * BT + rows[:, None]
                mra = (rb <= b)[:, None] & ((tb + BC) < eos)[None, :]
                b_dQ += F * _mm_rnd(tl.load(dP + offcb, mask=mcb, other=0.0), kr_b, RP, OP_BF16, DOT_PREC)
                u = F * _mm_rnd(tl.load(dA + offcb, mask=mcb, other=0.0), kr_b, RA, OP_BF16, DOT_PREC)
                u_j = E * (_mm_rnd(tl.load(dP + offra, mask=mra, other=0.0), qF_a, RP, OP_BF16, DOT_PREC)
                           + _mm_rnd(tl.load(dA + offra, mask=mra, other=0.0), kF_a, RA, OP_BF16, DOT_PREC))
                acc_dk += u + u_j
                acc_x += u - u_j
        else:
            b_dA = tl.load(dA + offc, mask=valid[:, None], other=0.0)
            b_dP = tl.load(dP + offc, mask=valid[:, None], other=0.0)
            for b in range(0, NS - 1):
                r_ref = tl.minimum(t0 + b * BC + BC - 1, eos - 1)
                G_r = tl.load(G + r_ref * (H * K) + i_h * K + ck, mask=ck < K, other=0.0)
                lm = (rb > b)[:, None] & m
                rm = (rb == b)[:, None] & m
                e = tl.exp(tl.where(lm, b_G - G_r[None, :], tl.where(rm, G_r[None, :] - b_G, 0.0)))
                F = tl.where(lm, e, 0.0)
                b_kr = tl.where(rm, b_k * e, 0.0)
                b_dQ += F * _mm_rnd(b_dP, b_kr, RP, OP_BF16, DOT_PREC)
                u = F * _mm_rnd(b_dA, b_kr, RA, OP_BF16, DOT_PREC)
                u_j = tl.where(rm, e, 0.0) * (_mm_rnd(tl.trans(b_dP), b_q * F, RP, OP_BF16, DOT_PREC)
                                              + _mm_rnd(tl.trans(b_dA), b_k * F, RA, OP_BF16, DOT_PREC))
                acc_dk += u + u_j
                acc_x += u - u_j
    b_dG = b_q * b_dQ + b_k * acc_x
    b_dG += tl.where(rows[:, None] == (last - t0), b_dGl[None, :], 0.0)
    tl.store(dq0 + off, b_dQ, mask=m)
    tl.store(dk0 + off, acc_dk, mask=m)
    tl.store(dg + off, b_dG, mask=m)


@triton.jit
def chunk_bwd_dqkg_intra_kernel(q, k, G, dA, dP, dq0, dk0, dq, dk, dg, chunk_indices, cu_seqlens,
                                H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr,
                                BC: tl.constexpr, BKS: tl.constexpr, DOT_PREC: tl.constexpr = "ieee",
                                DIAG: tl.constexpr = 0):
    # The diagonal 16x16 blocks of A and P, per (block of BKS key channels, chunk, head), then the
    # final dq, dk~ and dg. DIAG 0: per-pair exponents make this a latency-bound elementwise loop;
    # with no products and no [BT, BT] tiles it needs few registers (q, k, G and three
    # accumulators), so several programs share an SM to hide the latency of its gathered loads.
    # DIAG 1: chunk_intra's recursive reference rows (forward) on tensor cores instead: 4 levels of
    # four masked [BT, BT] x [BT, BKS] products, a quarter of the exps, [BT, BT] dA / dP tiles.
    i_k, i_t, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0, eos = _seq_bounds(chunk_indices, cu_seqlens, i_t, BT)
    rows = tl.arange(0, BT)
    rb = rows // BC
    rl = rows % BC
    ck = i_k * BKS + tl.arange(0, BKS)
    valid = (t0 + rows) < eos
    m = valid[:, None] & (ck[None, :] < K)
    off = (t0 + rows)[:, None] * (H * K) + i_h * K + ck[None, :]
    b_k = tl.load(k + off, mask=m, other=0.0).to(tl.float32)
    b_q = tl.load(q + off, mask=m, other=0.0).to(tl.float32)
    b_G = tl.load(G + off, mask=m, other=0.0)

    if DIAG == 2:
        # DIAG 1 per 16-row block: [BT / BC] batches of [BC, BC] x [BC, BKS] products (3-D dot),
        # a quarter of DIAG 1's MMA work and operand registers.
        NB: tl.constexpr = BT // BC
        ib = tl.arange(0, NB)[:, None, None]
        ii = tl.arange(0, BC)[None, :, None]
        jj = tl.arange(0, BC)[None, None, :]
        cc = ck[None, None, :]
        r3 = t0 + ib * BC + ii  # [NB, BC, 1] token of row ii of block ib
        v3 = r3 < eos
        m3 = v3 & (cc < K)
        off3 = r3 * (H * K) + i_h * K + cc
        k3 = tl.load(k + off3, mask=m3, other=0.0).to(tl.float32)
        q3 = tl.load(q + off3, mask=m3, other=0.0).to(tl.float32)
        G3 = tl.load(G + off3, mask=m3, other=0.0)
        pd3 = tl.load(dP + r3 * (H * BT) + i_h * BT + ib * BC + ii, mask=v3, other=0.0)
        dqP3 = pd3 * k3
        dkA3 = tl.zeros([NB, BC, BKS], dtype=tl.float32)
        dkJ3 = pd3 * q3
        offc3 = r3 * (H * BT) + i_h * BT + ib * BC + jj  # [b, i, j]: entry (i, j) of block b
        offT3 = (t0 + ib * BC + jj) * (H * BT) + i_h * BT + ib * BC + ii  # [b, j, i]: entry (i, j)
        vj3 = (t0 + ib * BC + jj) < eos
        for lv in range(0, 4):
            S = BC >> lv
            if S >= 2:
                rr3 = t0 + ib * BC + (ii // S) * S + S // 2 - 1
                G_rr3 = tl.load(G + rr3 * (H * K) + i_h * K + cc, mask=(rr3 < eos) & (cc < K), other=0.0)
                E3 = tl.where(m3, tl.exp(-tl.abs(G3 - G_rr3)), 0.0)
                lo3 = (ii % S) >= S // 2
                same3 = (ii // S) == (jj // S)
                pair3 = same3 & lo3 & ((jj % S) < S // 2) & v3
                pairT3 = same3 & ((ii % S) < S // 2) & ((jj % S) >= S // 2) & vj3
                kE_up3 = tl.where(lo3, 0.0, k3 * E3)
                dqP3 += E3 * tl.dot(tl.load(dP + offc3, mask=pair3, other=0.0), kE_up3, input_precision=DOT_PREC)
                dkA3 += E3 * tl.dot(tl.load(dA + offc3, mask=pair3, other=0.0), kE_up3, input_precision=DOT_PREC)
                dkJ3 += E3 * (tl.dot(tl.load(dP + offT3, mask=pairT3, other=0.0), tl.where(lo3, q3 * E3, 0.0),
                                     input_precision=DOT_PREC)
                              + tl.dot(tl.load(dA + offT3, mask=pairT3, other=0.0), tl.where(lo3, k3 * E3, 0.0),
                                       input_precision=DOT_PREC))
        b_dqP = tl.reshape(dqP3, (BT, BKS))
        b_dkA = tl.reshape(dkA3, (BT, BKS))
        b_dkJ = tl.reshape(dkJ3, (BT, BKS))
    elif DIAG:
        cols = tl.arange(0, BT)
        offc = (t0 + rows)[:, None] * (H * BT) + i_h * BT + cols[None, :]
        offT = (t0 + cols)[None, :] * (H * BT) + i_h * BT + rows[:, None]  # [j, i] holds entry (i, j)
        vcol = (t0 + cols) < eos
        # i == j: exp(0) = 1 (A's diagonal is zero, dA's too)
        pd = tl.load(dP + (t0 + rows) * (H * BT) + i_h * BT + rows, mask=valid, other=0.0)
        b_dqP = pd[:, None] * b_k
        b_dkA = tl.zeros([BT, BKS], dtype=tl.float32)
        b_dkJ = pd[:, None] * b_q
        # Pairs i > j of one 16-row block: at level S = BC, BC/2, ..., 2 those with i in the lower
        # and j in the upper half of the same S-block, through r = last row of that upper half:
        # exp(G_i - G_r) exp(G_r - G_j), both -|G_t - G_r| <= 0, one exp tile for both sides.
        # Each level reads its few entries of dA / dP (and their transposes) from L1/L2 rather
        # than masking [BT, BT] tiles held in registers, and the levels form a real loop: unrolled
        # (or with the tiles in registers), all levels' [BT, BT] operands are live at once and
        # spill (255 registers, sm_90a estimate).
        for lv in range(0, 4):
            S = BC >> lv
            if S >= 2:
                rr = t0 + (rows // S) * S + S // 2 - 1
                G_rr = tl.load(G + rr[:, None] * (H * K) + i_h * K + ck[None, :],
                               mask=(rr < eos)[:, None] & (ck[None, :] < K), other=0.0)
                E = tl.where(m, tl.exp(-tl.abs(b_G - G_rr)), 0.0)
                lo = (rows % S) >= S // 2
                same = (rows // S)[:, None] == (cols // S)[None, :]
                pair = same & (lo & valid)[:, None] & ((cols % S) < S // 2)[None, :]
                pairT = same & ((rows % S) < S // 2)[:, None] & (((cols % S) >= S // 2) & vcol)[None, :]
                kE_up = tl.where(lo[:, None], 0.0, b_k * E)
                b_dqP += E * tl.dot(tl.load(dP + offc, mask=pair, other=0.0), kE_up, input_precision=DOT_PREC)
                b_dkA += E * tl.dot(tl.load(dA + offc, mask=pair, other=0.0), kE_up, input_precision=DOT_PREC)
                qE_lo = tl.where(lo[:, None], b_q * E, 0.0)
                kE_lo = tl.where(lo[:, None], b_k * E, 0.0)
                b_dkJ += E * (tl.dot(tl.load(dP + offT, mask=pairT, other=0.0), qE_lo, input_precision=DOT_PREC)
                              + tl.dot(tl.load(dA + offT, mask=pairT, other=0.0), kE_lo, input_precision=DOT_PREC))
    else:
        # One row l of every 16-row block per step (row r of the tile pairs with row
        # l(r) = block(r) * BC + l). With l as the column j: dq_i, dk_i (via A) gather over j <= i;
        # with l as the row i: dk_j gathers over i >= j. Both are plain elementwise updates of
        # [BT, BKS] tiles, with per-pair exponents that are <= 0; the two triangles share one exp.
        b_dqP = tl.zeros([BT, BKS], dtype=tl.float32)
        b_dkA = tl.zeros([BT, BKS], dtype=tl.float32)
        b_dkJ = tl.zeros([BT, BKS], dtype=tl.float32)
        off0 = off - (rl * (H * K))[:, None]  # row block(r) * BC of every tile row
        for l in range(0, BC):
            lr = rb * BC + l
            lm = ((t0 + lr) < eos)[:, None] & (ck[None, :] < K)
            offl = off0 + l * (H * K)
            k_l = tl.load(k + offl, mask=lm, other=0.0).to(tl.float32)
            q_l = tl.load(q + offl, mask=lm, other=0.0).to(tl.float32)
            G_l2 = tl.load(G + offl, mask=lm, other=0.0)
            # dP[r, l(r)], dA[r, l(r)] and dP[l(r), r], dA[l(r), r] straight from memory
            offm = (t0 + rows) * (H * BT) + i_h * BT + lr
            offt = (t0 + lr) * (H * BT) + i_h * BT + rows
            vt = valid & ((t0 + lr) < eos)
            mP = tl.load(dP + offm, mask=valid, other=0.0)
            mA = tl.load(dA + offm, mask=valid, other=0.0)
            tP = tl.load(dP + offt, mask=vt, other=0.0)
            tA = tl.load(dA + offt, mask=vt, other=0.0)
            lo = (rl >= l)[:, None] & m
            up = (rl <= l)[:, None] & m & lm
            e = tl.exp(tl.where(lo, b_G - G_l2, tl.where(up, G_l2 - b_G, 0.0)))
            kE = tl.where(lo, k_l * e, 0.0)
            b_dqP += mP[:, None] * kE
            b_dkA += mA[:, None] * kE
            b_dkJ += tl.where(up, (tP[:, None] * q_l + tA[:, None] * k_l) * e, 0.0)

    b_dq = tl.load(dq0 + off, mask=m, other=0.0) + b_dqP
    b_dk = tl.load(dk0 + off, mask=m, other=0.0) + b_dkA + b_dkJ
    b_dG = tl.load(dg + off, mask=m, other=0.0) + b_q * b_dqP + b_k * (b_dkA - b_dkJ)
    b_dG = tl.where(m, b_dG, 0.0)
    # G_i = sum_{t <= i} g_t inside the chunk, so dg_t = sum_{i >= t} dG_i.
    b_dg = tl.sum(b_dG, axis=0)[None, :] - tl.cumsum(b_dG, axis=0) + b_dG
    tl.store(dq + off, b_dq.to(dq.dtype.element_ty), mask=m)
    tl.store(dk + off, b_dk.to(dk.dtype.element_ty), mask=m)
    tl.store(dg + off, b_dg, mask=m)


# bf16 tensor-core products (fp32 accumulation) for the V-sized gradient products of the bf16
# path, as the state kernels use; the products with T stay tf32, those with dA and dP too unless
# an AP_BF16 variant of chunk_bwd_dqkg_inter is chosen.
BWD_BF16 = True


# Fastest correct options of scripts/sweep_delta_bwd_variants.py (its BEST_BWD_OPTION lines), tried
# before the GPU-verified defaults below; None keeps the default first.
DQKG_INTER_BEST = {'BKS': 32, 'BV': 64, 'SPLIT': 1, 'AP_BF16': 2, 'num_warps': 8, 'num_stages': 1, 'maxnreg': 128}
DQKG_INTRA_BEST = None
DAP_BEST = {'BV': 32, 'num_warps': 4, 'num_stages': 1}


def dqkg_inter_options(BK, K, V):
    """(BKS, BV, SPLIT, AP_BF16, num_warps, num_stages[, maxnreg]) to try for
    chunk_bwd_dqkg_inter; the first that compiles runs. SPLIT 0 at 32 key channels and 8 warps:
    about 234 registers on sm_90a (K = V = 128, no spills; 64 channels spill)."""
    return best_first(DQKG_INTER_BEST, _dqkg_inter_plain(BK, V), BK)


def _dqkg_inter_plain(BK, V):
    """The SPLIT 0 options (the form first verified on the GPU), widest first."""
    top = min(32, BK)
    bvs = sorted({vtile_options(V)[0]["BV"], 16}, reverse=True)
    return [dict(BKS=b, BV=bv, SPLIT=0, AP_BF16=0, num_warps=w, num_stages=st) for st in _stages()
            for b in sorted({top, 16}, reverse=True) for bv in bvs for w in (8, 4)]


def dqkg_inter_sweep_options(BK, K, V):
    """Every (variant, launch option) scripts/sweep_delta_bwd_variants.py times, most promising
    first (it stops at its time budget); the first is today's default, the second the plain
    SPLIT 0 form when a measured best replaced it. sm_90a estimates (Triton 3.9 ptxas, K = V =
    128, bf16): SPLIT 0 32/32/8 warps 234 regs; SPLIT 1 32/32/8 166, 32/64/8
    149, and 128 with 24 bytes of stack under maxnreg 128 (two programs an SM), 16/32/4 144."""
    top = min(32, BK)
    bv2 = min(64, max(16, triton.next_power_of_2(V)))
    first = dqkg_inter_options(BK, K, V)[0]
    st = first["num_stages"]
    opts = [first] + [o for o in _dqkg_inter_plain(BK, V)[:1] if o != first]  # today's, then the plain form
    for split, ap, b, bv, w, mx in ((1, 0, top, bv2, 8, 128), (1, 0, top, 32, 8, 0), (1, 1, top, bv2, 8, 128),
                                    (1, 1, top, 32, 8, 0), (1, 2, top, bv2, 8, 128), (0, 1, top, 32, 8, 0),
                                    (1, 0, top, bv2, 8, 0), (1, 0, 16, 32, 4, 0), (1, 1, 16, 32, 4, 0),
                                    (1, 0, min(64, BK), bv2, 8, 0), (1, 0, 16, 32, 4, 168)):
        o = dict(BKS=b, BV=min(bv, max(16, triton.next_power_of_2(V))), SPLIT=split, AP_BF16=ap,
                 num_warps=w, num_stages=st, **(dict(maxnreg=mx) if mx else {}))
        if o not in opts:
            opts.append(o)
    return opts


def dqkg_intra_options(BK, K):
    """(BKS, DIAG, num_warps, num_stages) to try for chunk_bwd_dqkg_intra (DIAG 0: about 80
    registers at 32 channels and 8 warps, so three programs fit an SM); the first that compiles
    runs."""
    opts = [dict(BKS=b, DIAG=0, num_warps=w, num_stages=st) for st in _stages()
            for b in sorted({min(32, BK), 16}, reverse=True) for w in (8, 4)]
    if BK >= 64:
        opts += [dict(BKS=64, DIAG=0, num_warps=8, num_stages=st) for st in _stages()]
    return best_first(DQKG_INTRA_BEST, opts, BK)


def dqkg_intra_sweep_options(BK, K):
    """The default, then DIAG 2 / 1 (tensor-core diagonal blocks) and other widths, most promising
    first. sm_90a estimates (K = 128, bf16): DIAG 0 32/8 warps 80 regs, 16/8 58; DIAG 2 32/8 165,
    16/4 166, 32/4 255 (8 bytes of stack); DIAG 1 32/8 213, 16/4 247."""
    first = dqkg_intra_options(BK, K)[0]
    st = first["num_stages"]
    opts = [first]
    for d, b, w in ((2, min(32, BK), 8), (2, 16, 4), (2, min(32, BK), 4), (1, min(32, BK), 8), (0, 16, 8),
                    (2, 16, 8), (0, min(32, BK), 4), (1, 16, 4), (2, min(64, BK), 8), (0, min(64, BK), 8)):
        o = dict(BKS=b, DIAG=d, num_warps=w, num_stages=st)
        if o not in opts:
            opts.append(o)
    return opts


def dap_options(V):
    """(BV, num_warps, num_stages) to try for chunk_bwd_dap (its [BT, BT] dT, dP and T tiles:
    about 201 registers at BV = 32, 8 warps)."""
    return best_first(DAP_BEST, vtile_options(V))


def chunk_bwd(q, k, v, saved, do, dht, scale, meta, need_dh0):
    """Gradients for the flattened forward of ``chunk_fwd`` (``saved`` is its dict of
    intermediates): (dq, dk~, dv~, dg [NTOK,H,K] fp32, dh0 or None)."""
    NTOK, H, K = q.shape
    V = v.shape[-1]
    BT = meta["BT"]
    N = meta["cu_seqlens"].numel() - 1
    NT = meta["chunk_indices"].shape[0]
    BK = max(16, triton.next_power_of_2(K))
    dev = q.device
    pr = precisions(q.dtype)
    prec = pr["DOT_PREC"]
    ci, cu = meta["chunk_indices"], meta["cu_seqlens"]
    G, Tm, P, vn, h = saved["G"], saved["Tm"], saved["P"], saved["vn"], saved["h"]
    dvn = torch.empty(NTOK, H, V, device=dev, dtype=torch.float32)
    dh = torch.empty(NT, H, K, V, device=dev, dtype=torch.float32)
    dh0 = torch.empty(N, H, K, V, device=dev, dtype=torch.float32) if need_dh0 else dvn
    launch(chunk_bwd_dv_local_kernel, lambda opt: (triton.cdiv(V, opt["BV"]), NT, H),
           (P, do, dvn, ci, cu, scale), dict(H=H, V=V, BT=BT, OP_BF16=pr["OP_BF16"], DOT_PREC=prec),
           vtile_options(V))
    launch(chunk_bwd_state_kernel, lambda opt: (triton.cdiv(V, opt["BV"]), N * H),
           (saved["QG"], saved["KD"], saved["W"], G, do, dvn, dh, dht if dht is not None else dvn,
            dh0, cu, meta["chunk_offsets"], scale),
           dict(H=H, K=K, V=V, BT=BT, BK=BK, HAS_DHT=dht is not None, STORE_DH0=need_dh0,
                OP_BF16=pr["OP_BF16"], DOT_PREC=prec), vtile_options(V))
    dv = torch.empty_like(v)
    dA = torch.empty(NTOK, H, BT, device=dev, dtype=torch.float32)
    dP = torch.empty_like(dA)
    launch(chunk_bwd_dap_kernel, lambda opt: (NT, H),
           (k, v, G, Tm, vn, h, do, dvn, dv, dA, dP, ci, cu, scale),
           dict(H=H, K=K, V=V, BT=BT, BK=BK, OP_BF16=pr["OP_BF16"] and BWD_BF16, DOT_PREC=prec),
           dap_options(V))
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dg = torch.empty(NTOK, H, K, device=dev, dtype=torch.float32)
    # fp32 partial dq, dk~ of the inter-chunk kernel; fp32 outputs serve as their own scratch
    # (each intra program reads its block before it overwrites it), and dg holds the partial dG.
    dq0 = dq if dq.dtype == torch.float32 else torch.empty(NTOK, H, K, device=dev, dtype=torch.float32)
    dk0 = dk if dk.dtype == torch.float32 else torch.empty_like(dq0)
    launch(chunk_bwd_dqkg_inter_kernel, lambda opt: (triton.cdiv(K, opt["BKS"]), NT, H),
           (q, k, G, Tm, vn, h, dh, do, dvn, dA, dP, dq0, dk0, dg, ci, cu, scale),
           dict(H=H, K=K, V=V, BT=BT, BC=min(16, BT), OP_BF16=pr["OP_BF16"] and BWD_BF16, DOT_PREC=prec),
           [dict(o, AP_BF16=o["AP_BF16"] if q.dtype == torch.bfloat16 else 0)
            for o in dqkg_inter_options(BK, K, V)])
    launch(chunk_bwd_dqkg_intra_kernel, lambda opt: (triton.cdiv(K, opt["BKS"]), NT, H),
           (q, k, G, dA, dP, dq0, dk0, dq, dk, dg, ci, cu),
           dict(H=H, K=K, BT=BT, BC=min(16, BT), DOT_PREC=prec), dqkg_intra_options(BK, K))
    return dq, dk, dv, dg, (dh0 if need_dh0 else None)
