"""Forward kernels of the chunked (WY/UT) delta rule with per-channel decay.

Everything is phrased for the symmetric update on already-scaled keys/values (k~, v~, beta = 1)::

    S_t = (I - k_t k_t^T) Diag(exp(g_t)) S_{t-1} + k_t v_t^T,     o_t = scale * S_t^T q_t

Tokens of all sequences are flattened to ``[NTOK, H, D]`` (a plain batch is the varlen case with
equal lengths), chunks never cross a sequence boundary, and per chunk of C tokens with the
within-chunk cumulative log-decay G (fp32)::

    A = strict_lower(sum_c k_ic k_jc exp(G_ic - G_jc)),  T = (I + A)^-1,  W = T (K * exp(G))
    P = lower(sum_c q_ic k_jc exp(G_ic - G_jc))
    Vn = T V - W S,   O = scale * ((Q * exp(G)) S + P Vn),   S <- exp(G_C) S + (K exp(G_C - G))^T Vn

The decay ratio exp(G_i - G_j) is formed per (i, j) pair with exponent <= 0 (the ratio is never
split into exp(G_i) * exp(-G_j), whose second factor overflows fp32 for strong decay at C = 64).

Kernels: ``chunk_cumsum`` (G), ``chunk_prep`` (A, P, T, W; parallel over chunks), ``chunk_fwd_state``
(sequential over chunks per (sequence, head, V tile): Vn, O, per-chunk start states, final state).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl



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
def chunk_prep_kernel(q, k, G, Tm, W, P, chunk_indices, cu_seqlens,
                      H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BKS: tl.constexpr,
                      NK: tl.constexpr, DOT_PREC: tl.constexpr):
    # K is walked in blocks of BKS channels so the [C, BKS] tiles stay small in registers.
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    t0, eos = _seq_bounds(chunk_indices, cu_seqlens, i_t, BT)
    rows = tl.arange(0, BT)
    cols = tl.arange(0, BT)
    valid = (t0 + rows) < eos

    # A and P one column j at a time: the [C, BKS] decay ratio exp(G_i - G_j) stays <= 1 for i >= j.
    b_A = tl.zeros([BT, BT], dtype=tl.float32)
    b_P = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(0, NK):
        ck = i_k * BKS + tl.arange(0, BKS)
        m = valid[:, None] & (ck[None, :] < K)
        off = (t0 + rows)[:, None] * (H * K) + i_h * K + ck[None, :]
        b_k = tl.load(k + off, mask=m, other=0.0).to(tl.float32)
        b_q = tl.load(q + off, mask=m, other=0.0).to(tl.float32)
        b_G = tl.load(G + off, mask=m, other=0.0)
        for j in range(0, BT):
            jm = (ck < K) & ((t0 + j + ck * 0) < eos)
            k_j = tl.load(k + (t0 + j) * (H * K) + i_h * K + ck, mask=jm, other=0.0).to(tl.float32)
            G_j = tl.load(G + (t0 + j) * (H * K) + i_h * K + ck, mask=jm, other=0.0)
            lo = (rows[:, None] >= j) & m
            E = tl.where(lo, tl.exp(tl.where(lo, b_G - G_j[None, :], 0.0)), 0.0)
            kE = k_j[None, :] * E
            colA = tl.where(rows > j, tl.sum(b_k * kE, axis=1), 0.0)
            colP = tl.sum(b_q * kE, axis=1)
            sel = cols[None, :] == j
            b_A += tl.where(sel, colA[:, None], 0.0)
            b_P += tl.where(sel, colP[:, None], 0.0)

    # T = (I + A)^-1 by forward substitution: T_i = e_i - sum_{j<i} A_ij T_j.
    b_T = tl.where(rows[:, None] == cols[None, :], 1.0, 0.0)
    b_At = tl.trans(b_A)  # column i of A^T is row i of A, laid out along the row axis
    for i in range(1, BT):
        a_i = tl.sum(tl.where(cols[None, :] == i, b_At, 0.0), axis=1)
        new = tl.sum(a_i[:, None] * b_T, axis=0)
        b_T = tl.where(rows[:, None] == i, b_T - new[None, :], b_T)

    for i_k in range(0, NK):
        ck = i_k * BKS + tl.arange(0, BKS)
        m = valid[:, None] & (ck[None, :] < K)
        off = (t0 + rows)[:, None] * (H * K) + i_h * K + ck[None, :]
        b_k = tl.load(k + off, mask=m, other=0.0).to(tl.float32)
        b_G = tl.load(G + off, mask=m, other=0.0)
        b_W = tl.dot(b_T, b_k * tl.exp(b_G), input_precision=DOT_PREC)
        tl.store(W + off, b_W, mask=m)
    offc = (t0 + rows)[:, None] * (H * BT) + i_h * BT + cols[None, :]
    mc = valid[:, None] & (cols[None, :] < BT)
    tl.store(Tm + offc, b_T, mask=mc)
    tl.store(P + offc, b_P, mask=mc)


@triton.jit
def chunk_fwd_state_kernel(q, k, v, G, Tm, W, P, o, vn, h, h0, ht, cu_seqlens, chunk_offsets,
                           scale, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                           BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                           HAS_H0: tl.constexpr, STORE_FINAL: tl.constexpr,
                           SAVE: tl.constexpr, DOT_PREC: tl.constexpr):
    # One program carries the [K, BV] slice of one sequence/head's state through its chunks; V
    # columns of S evolve independently (Vn[:, v] depends only on S[:, v]), hence the V tiling.
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n = i_nh // H
    i_h = i_nh % H
    bos = tl.load(cu_seqlens + i_n)
    eos = tl.load(cu_seqlens + i_n + 1)
    boh = tl.load(chunk_offsets + i_n)
    NC = tl.cdiv(eos - bos, BT)
    rows = tl.arange(0, BT)
    cols = tl.arange(0, BT)
    ck = tl.arange(0, BK)
    cv = i_v * BV + tl.arange(0, BV)
    mkv = (ck[:, None] < K) & (cv[None, :] < V)
    off_s = i_h * K * V + ck[:, None] * V + cv[None, :]
    b_S = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        b_S = tl.load(h0 + i_n * H * K * V + off_s, mask=mkv, other=0.0).to(tl.float32)
    for c in range(0, NC):
        t0 = bos + c * BT
        valid = (t0 + rows) < eos
        m = valid[:, None] & (ck[None, :] < K)
        mv = valid[:, None] & (cv[None, :] < V)
        if SAVE:
            tl.store(h + (boh + c) * H * K * V + off_s, b_S, mask=mkv)
        off = (t0 + rows)[:, None] * (H * K) + i_h * K + ck[None, :]
        offv = (t0 + rows)[:, None] * (H * V) + i_h * V + cv[None, :]
        offc = (t0 + rows)[:, None] * (H * BT) + i_h * BT + cols[None, :]
        mc = valid[:, None] & (cols[None, :] < BT)
        b_T = tl.load(Tm + offc, mask=mc, other=0.0)
        b_P = tl.load(P + offc, mask=mc, other=0.0)
        b_W = tl.load(W + off, mask=m, other=0.0)
        b_G = tl.load(G + off, mask=m, other=0.0)
        b_q = tl.load(q + off, mask=m, other=0.0).to(tl.float32)
        b_k = tl.load(k + off, mask=m, other=0.0).to(tl.float32)
        b_v = tl.load(v + offv, mask=mv, other=0.0).to(tl.float32)
        b_vn = tl.dot(b_T, b_v, input_precision=DOT_PREC) - tl.dot(b_W, b_S, input_precision=DOT_PREC)
        b_o = tl.dot(b_q * tl.exp(b_G), b_S, input_precision=DOT_PREC)
        b_o += tl.dot(b_P, b_vn, input_precision=DOT_PREC)
        tl.store(o + offv, (b_o * scale).to(o.dtype.element_ty), mask=mv)
        if SAVE:
            tl.store(vn + offv, b_vn, mask=mv)
        last = tl.minimum(t0 + BT, eos) - 1
        G_l = tl.load(G + last * (H * K) + i_h * K + ck, mask=ck < K, other=0.0)
        b_kd = tl.where(m, b_k * tl.exp(tl.where(m, G_l[None, :] - b_G, 0.0)), 0.0)
        b_S = b_S * tl.exp(G_l)[:, None] + tl.dot(tl.trans(b_kd), b_vn, input_precision=DOT_PREC)
    if STORE_FINAL:
        tl.store(ht + i_n * H * K * V + off_s, b_S, mask=mkv)


def _dot_prec(dtype: torch.dtype) -> str:
    # fp32 inputs ask for an fp32-accurate answer; bf16/fp16 inputs tolerate tf32 products.
    return "ieee" if dtype == torch.float32 else "tf32"


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
    BV = min(32, max(16, triton.next_power_of_2(V)))
    BKS = min(32, BK)
    dev = q.device
    prec = _dot_prec(q.dtype)
    G = torch.empty(NTOK, H, K, device=dev, dtype=torch.float32)
    chunk_cumsum_kernel[(NT, H)](g, G, meta["chunk_indices"], meta["cu_seqlens"], H=H, K=K, BT=BT,
                                 BK=BK, G_SCALAR=g.dim() == 2)
    Tm = torch.empty(NTOK, H, BT, device=dev, dtype=torch.float32)
    P = torch.empty_like(Tm)
    W = torch.empty(NTOK, H, K, device=dev, dtype=torch.float32)
    chunk_prep_kernel[(NT, H)](q, k, G, Tm, W, P, meta["chunk_indices"], meta["cu_seqlens"],
                               H=H, K=K, BT=BT, BKS=BKS, NK=triton.cdiv(K, BKS), DOT_PREC=prec,
                               num_warps=4)
    o = torch.empty(NTOK, H, V, device=dev, dtype=q.dtype)
    vn = torch.empty(NTOK, H, V, device=dev, dtype=torch.float32) if save else o
    NC_TOT = NT
    h = torch.empty(NC_TOT, H, K, V, device=dev, dtype=torch.float32) if save else o
    ht = torch.empty(N, H, K, V, device=dev, dtype=torch.float32) if output_final_state else o
    h0 = initial_state if initial_state is not None else o
    grid = (triton.cdiv(V, BV), N * H)
    chunk_fwd_state_kernel[grid](q, k, v, G, Tm, W, P, o, vn, h, h0, ht, meta["cu_seqlens"],
                                 meta["chunk_offsets"], scale, H=H, K=K, V=V, BT=BT, BK=BK, BV=BV,
                                 HAS_H0=initial_state is not None, STORE_FINAL=output_final_state,
                                 SAVE=save, DOT_PREC=prec, num_warps=4)
    saved = dict(G=G, Tm=Tm, W=W, P=P, vn=vn, h=h) if save else None
    return o, (ht if output_final_state else None), saved
