"""Backward kernels of the chunked delta rule (see chunk_fwd.py for the forward algebra).

Per chunk, with S the chunk-start state, dS_C the gradient of the chunk-end state and
Kd = K * exp(G_C - G)::

    dVn  = scale * P^T dO + Kd dS_C                                  (sequential, reverse)
    dS   = scale * (Q exp G)^T dO + exp(G_C) dS_C - W^T dVn          (carried to the previous chunk)
    dW = -dVn S^T,  dT = dVn V^T + dW (K exp G)^T,  dV = T^T dVn,  dA = -T^T dT T^T
    dP = scale * dO Vn^T, then dq, dk, dG from P and A, whose entries hold exp(G_i - G_j),
    and finally dg = reverse cumsum of dG inside the chunk (G is a within-chunk cumulative sum).

``chunk_bwd_state`` runs the reverse recurrence per (sequence, head, V tile); ``chunk_bwd_dap``
(per chunk) writes dv~ and the gradients of A and P; ``chunk_bwd_dqkg`` (per chunk and block of key
channels) writes dq, dk~ and dg (fp32, per channel).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from catkit.ops.delta_rule.chunk_fwd import _dot_prec, _seq_bounds


@triton.jit
def chunk_bwd_state_kernel(q, k, G, W, P, do, dvn, dh, dht, dh0, cu_seqlens, chunk_offsets, scale,
                           H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                           BK: tl.constexpr, BV: tl.constexpr, HAS_DHT: tl.constexpr,
                           STORE_DH0: tl.constexpr, DOT_PREC: tl.constexpr):
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
        offc = (t0 + rows)[:, None] * (H * BT) + i_h * BT + cols[None, :]
        b_P = tl.load(P + offc, mask=valid[:, None], other=0.0)
        b_W = tl.load(W + off, mask=m, other=0.0)
        b_G = tl.load(G + off, mask=m, other=0.0)
        b_q = tl.load(q + off, mask=m, other=0.0).to(tl.float32)
        b_k = tl.load(k + off, mask=m, other=0.0).to(tl.float32)
        b_do = tl.load(do + offv, mask=mv, other=0.0).to(tl.float32)
        last = tl.minimum(t0 + BT, eos) - 1
        G_l = tl.load(G + last * (H * K) + i_h * K + ck, mask=ck < K, other=0.0)
        b_kd = tl.where(m, b_k * tl.exp(tl.where(m, G_l[None, :] - b_G, 0.0)), 0.0)
        b_dvn = scale * tl.dot(tl.trans(b_P), b_do, input_precision=DOT_PREC)
        b_dvn += tl.dot(b_kd, b_dS, input_precision=DOT_PREC)
        tl.store(dvn + offv, b_dvn, mask=mv)
        b_dS = b_dS * tl.exp(G_l)[:, None] + scale * tl.dot(tl.trans(b_q * tl.exp(b_G)), b_do,
                                                             input_precision=DOT_PREC)
        b_dS -= tl.dot(tl.trans(b_W), b_dvn, input_precision=DOT_PREC)
    if STORE_DH0:
        tl.store(dh0 + i_n * H * K * V + off_s, b_dS, mask=mkv)


@triton.jit
def chunk_bwd_dap_kernel(k, v, G, Tm, vn, h, do, dvn, dv, dA, dP, chunk_indices, cu_seqlens, scale,
                         H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                         BK: tl.constexpr, BV: tl.constexpr, DOT_PREC: tl.constexpr):
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
        b_r = b_v - tl.dot(b_kg, b_S, input_precision=DOT_PREC)
        b_dT += tl.dot(b_dvn, tl.trans(b_r), input_precision=DOT_PREC)
        b_dP += tl.dot(b_do, tl.trans(b_vn), input_precision=DOT_PREC)
        b_dv = tl.dot(tl.trans(b_T), b_dvn, input_precision=DOT_PREC)
        tl.store(dv + offv, b_dv.to(dv.dtype.element_ty), mask=mv)
    b_dP = tl.where((rows[:, None] >= cols[None, :]) & valid[:, None], b_dP * scale, 0.0)
    b_dA = -tl.dot(tl.trans(b_T), tl.dot(b_dT, tl.trans(b_T), input_precision=DOT_PREC),
                   input_precision=DOT_PREC)
    b_dA = tl.where((rows[:, None] > cols[None, :]) & valid[:, None], b_dA, 0.0)
    mc = valid[:, None] & (cols[None, :] < BT)
    tl.store(dA + offc, b_dA, mask=mc)
    tl.store(dP + offc, b_dP, mask=mc)


@triton.jit
def chunk_bwd_dqkg_kernel(q, k, G, Tm, vn, h, dh, do, dvn, dA, dP, dq, dk, dg,
                          chunk_indices, cu_seqlens, scale,
                          H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                          BKS: tl.constexpr, BV: tl.constexpr, DOT_PREC: tl.constexpr):
    # One program per (chunk, head, block of BKS key channels): every term below is separable
    # over key channels once dA and dP are known.
    i_t, i_h, i_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0, eos = _seq_bounds(chunk_indices, cu_seqlens, i_t, BT)
    rows = tl.arange(0, BT)
    cols = tl.arange(0, BT)
    ck = i_k * BKS + tl.arange(0, BKS)
    valid = (t0 + rows) < eos
    m = valid[:, None] & (ck[None, :] < K)
    off = (t0 + rows)[:, None] * (H * K) + i_h * K + ck[None, :]
    offc = (t0 + rows)[:, None] * (H * BT) + i_h * BT + cols[None, :]
    b_k = tl.load(k + off, mask=m, other=0.0).to(tl.float32)
    b_q = tl.load(q + off, mask=m, other=0.0).to(tl.float32)
    b_G = tl.load(G + off, mask=m, other=0.0)
    last = tl.minimum(t0 + BT, eos) - 1
    G_l = tl.load(G + last * (H * K) + i_h * K + ck, mask=ck < K, other=0.0)
    b_eG = tl.exp(b_G)

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
        b_dW -= tl.dot(b_dvn, tl.trans(b_S), input_precision=DOT_PREC)
        b_dKd += tl.dot(b_vn, tl.trans(b_dSC), input_precision=DOT_PREC)
        b_dQ += tl.dot(b_do, tl.trans(b_S), input_precision=DOT_PREC)
        b_dGl += tl.sum(b_S * b_dSC, axis=1)

    b_T = tl.load(Tm + offc, mask=valid[:, None], other=0.0)
    b_dA = tl.load(dA + offc, mask=valid[:, None], other=0.0)
    b_dP = tl.load(dP + offc, mask=valid[:, None], other=0.0)
    b_dQ = b_dQ * scale * b_eG
    b_kg = b_k * b_eG
    b_dKg = tl.dot(tl.trans(b_T), b_dW, input_precision=DOT_PREC)
    b_ed = tl.where(m, tl.exp(tl.where(m, G_l[None, :] - b_G, 0.0)), 0.0)
    b_dGl = b_dGl * tl.exp(G_l) + tl.sum(b_k * b_ed * b_dKd, axis=0)

    # P_ij and A_ij hold exp(G_ic - G_jc) per channel: walk the columns j so the ratio is formed
    # with exponent <= 0, as in the forward.
    b_dqP = tl.zeros([BT, BKS], dtype=tl.float32)
    b_dkA = tl.zeros([BT, BKS], dtype=tl.float32)
    b_dkJ = tl.zeros([BT, BKS], dtype=tl.float32)
    for j in range(0, BT):
        jm = (ck < K) & ((t0 + j + ck * 0) < eos)
        k_j = tl.load(k + (t0 + j) * (H * K) + i_h * K + ck, mask=jm, other=0.0).to(tl.float32)
        G_j = tl.load(G + (t0 + j) * (H * K) + i_h * K + ck, mask=jm, other=0.0)
        lo = (rows[:, None] >= j) & m
        E = tl.where(lo, tl.exp(tl.where(lo, b_G - G_j[None, :], 0.0)), 0.0)
        sel = cols[None, :] == j
        mP = tl.sum(tl.where(sel, b_dP, 0.0), axis=1)
        mA = tl.sum(tl.where(sel, b_dA, 0.0), axis=1)
        kE = k_j[None, :] * E
        b_dqP += mP[:, None] * kE
        b_dkA += mA[:, None] * kE
        r = tl.sum((mP[:, None] * b_q + mA[:, None] * b_k) * E, axis=0)
        b_dkJ += tl.where(rows[:, None] == j, r[None, :], 0.0)

    b_dq = b_dQ + b_dqP
    b_dk = b_dKg * b_eG + b_dKd * b_ed + b_dkA + b_dkJ
    b_dG = b_q * b_dq + b_kg * b_dKg - b_k * b_ed * b_dKd + b_k * b_dkA - b_k * b_dkJ
    b_dG += tl.where(rows[:, None] == (last - t0), b_dGl[None, :], 0.0)
    b_dG = tl.where(m, b_dG, 0.0)
    # G_i = sum_{t <= i} g_t inside the chunk, so dg_t = sum_{i >= t} dG_i.
    b_dg = tl.sum(b_dG, axis=0)[None, :] - tl.cumsum(b_dG, axis=0) + b_dG
    tl.store(dq + off, b_dq.to(dq.dtype.element_ty), mask=m)
    tl.store(dk + off, b_dk.to(dk.dtype.element_ty), mask=m)
    tl.store(dg + off, b_dg, mask=m)


def chunk_bwd(q, k, v, G, Tm, W, P, vn, h, do, dht, scale, meta, need_dh0):
    """Gradients for the flattened forward of ``chunk_fwd``: (dq, dk~, dv~, dg [NTOK,H,K] fp32, dh0)."""
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
    ci, cu = meta["chunk_indices"], meta["cu_seqlens"]
    dvn = torch.empty(NTOK, H, V, device=dev, dtype=torch.float32)
    dh = torch.empty(NT, H, K, V, device=dev, dtype=torch.float32)
    dh0 = torch.empty(N, H, K, V, device=dev, dtype=torch.float32) if need_dh0 else dvn
    chunk_bwd_state_kernel[(triton.cdiv(V, BV), N * H)](
        q, k, G, W, P, do, dvn, dh, dht if dht is not None else dvn, dh0, cu,
        meta["chunk_offsets"], scale, H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, HAS_DHT=dht is not None,
        STORE_DH0=need_dh0, DOT_PREC=prec, num_warps=4)
    dv = torch.empty_like(v)
    dA = torch.empty(NTOK, H, BT, device=dev, dtype=torch.float32)
    dP = torch.empty_like(dA)
    chunk_bwd_dap_kernel[(NT, H)](k, v, G, Tm, vn, h, do, dvn, dv, dA, dP, ci, cu, scale, H=H, K=K,
                                  V=V, BT=BT, BK=BK, BV=BV, DOT_PREC=prec, num_warps=4)
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dg = torch.empty(NTOK, H, K, device=dev, dtype=torch.float32)
    chunk_bwd_dqkg_kernel[(NT, H, triton.cdiv(K, BKS))](
        q, k, G, Tm, vn, h, dh, do, dvn, dA, dP, dq, dk, dg, ci, cu, scale, H=H, K=K, V=V, BT=BT,
        BKS=BKS, BV=BV, DOT_PREC=prec, num_warps=4)
    return dq, dk, dv, dg, (dh0 if need_dh0 else None)
