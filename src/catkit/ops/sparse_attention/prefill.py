"""Block-sparse causal attention for prefill and training: Triton forward and backward.

Layout ``[B, T, H, D]`` (packed varlen: B = 1 plus ``cu_seqlens``), GQA (H_kv divides H), causal.
Which key blocks a query block reads is given either by the streaming pattern (``sink_blocks``,
``recent_blocks``: the loop bounds are computed from the block number, no mask tensor) or by
explicit per-(sequence, KV head, query block) lists of key block indices. See ``naive.py`` for the
exact semantics; this file must match it.

Kernel plan (FlashAttention-2 style, online softmax in base 2):
- forward: one program per (query head, query tile, sequence) walks key tiles in at most three
  ranges: fully visible ones (no mask arithmetic) and the causal diagonal (masked).
- backward: ``_dkdv_kernel`` has one program per (KV head, key tile, sequence) and walks the query
  tiles that read that key tile (analytic for streaming, a reverse index list otherwise), summing
  the query heads of its GQA group in registers, so no atomics; ``_dq_kernel`` mirrors the forward.
"""

from __future__ import annotations

import math

import torch

from catkit.utils.device import check_tensor
from catkit.utils.triton_utils import kernel_device_ok, triton_available

if triton_available():
    import triton
    import triton.language as tl
else:  # pragma: no cover - keeps the module importable without Triton; CPU falls back to naive
    triton = None

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
MODE_STREAM, MODE_INDEX = 0, 1

# ---------------------------------------------------------------------------------------------
# Level 1: Triton kernels
# ---------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _fwd_range(acc, m_i, l_i, q, Kb, Vb, stride_kt, stride_vt, lo, hi, q_pos, L, qk_scale,
                   BLOCK_N: tl.constexpr, D: tl.constexpr, MASKED: tl.constexpr):
        offs_d = tl.arange(0, D)
        for start in range(lo, hi, BLOCK_N):
            start = tl.multiple_of(start, BLOCK_N)
            offs_n = start + tl.arange(0, BLOCK_N)
            if MASKED:
                kv_ok = offs_n < L
                k = tl.load(Kb + offs_n[:, None] * stride_kt + offs_d[None, :], mask=kv_ok[:, None], other=0.0)
                v = tl.load(Vb + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kv_ok[:, None], other=0.0)
            else:  # fully visible range: always inside the sequence, no bounds or causal checks
                k = tl.load(Kb + offs_n[:, None] * stride_kt + offs_d[None, :])
                v = tl.load(Vb + offs_n[:, None] * stride_vt + offs_d[None, :])
            qk = tl.dot(q, tl.trans(k)) * qk_scale
            if MASKED:
                ok = (offs_n[None, :] <= q_pos[:, None]) & kv_ok[None, :]
                qk = tl.where(ok, qk, float("-inf"))
            # m_i starts at a finite floor, so a row masked so far gives exp2(-inf) = 0, never NaN.
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            p = tl.exp2(qk - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        return acc, m_i, l_i

    @triton.jit
    def _fwd_kernel(Q, K, V, O, LSE, CU, IDX, CNT, qk_scale,
                    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                    stride_ib, stride_ih, stride_iq, stride_cb, stride_ch,
                    H, SINK, RECENT, NUM_IDX,
                    G: tl.constexpr, BS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    D: tl.constexpr, MODE: tl.constexpr):
        pid_h = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_b = tl.program_id(2)
        bos = tl.load(CU + pid_b)
        L = tl.load(CU + pid_b + 1) - bos
        m0 = pid_m * BLOCK_M
        if m0 < L:
            hkv = pid_h // G
            qb = m0 // BS
            offs_m = m0 + tl.arange(0, BLOCK_M)
            offs_d = tl.arange(0, D)
            row_ok = offs_m < L
            q = tl.load(Q + (bos + offs_m)[:, None] * stride_qt + pid_h * stride_qh + offs_d[None, :],
                        mask=row_ok[:, None], other=0.0)
            Kb = K + bos * stride_kt + hkv * stride_kh
            Vb = V + bos * stride_vt + hkv * stride_vh
            acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
            m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - 1.0e30
            l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
            if MODE == 0:
                # Streaming: window [w_lo, qb] (own block included when recent >= 1 or qb is a sink),
                # sinks [0, min(SINK, w_lo)); both are contiguous key ranges.
                w_lo = tl.maximum(qb - RECENT + 1, 0)
                if qb < SINK:
                    w_lo = tl.minimum(w_lo, qb)
                s_hi = tl.minimum(SINK, w_lo) * BS
                acc, m_i, l_i = _fwd_range(acc, m_i, l_i, q, Kb, Vb, stride_kt, stride_vt, 0, s_hi, offs_m, L,
                                           qk_scale, BLOCK_N, D, False)
                if w_lo <= qb:
                    acc, m_i, l_i = _fwd_range(acc, m_i, l_i, q, Kb, Vb, stride_kt, stride_vt, w_lo * BS, m0,
                                               offs_m, L, qk_scale, BLOCK_N, D, False)
                    acc, m_i, l_i = _fwd_range(acc, m_i, l_i, q, Kb, Vb, stride_kt, stride_vt, m0, m0 + BLOCK_M,
                                               offs_m, L, qk_scale, BLOCK_N, D, True)
            else:
                n_idx = tl.load(CNT + pid_b * stride_cb + hkv * stride_ch + qb)
                Ib = IDX + pid_b * stride_ib + hkv * stride_ih + qb * stride_iq
                for t in range(0, n_idx):
                    j = tl.load(Ib + t)
                    if j < qb:
                        acc, m_i, l_i = _fwd_range(acc, m_i, l_i, q, Kb, Vb, stride_kt, stride_vt, j * BS,
                                                   j * BS + BS, offs_m, L, qk_scale, BLOCK_N, D, False)
                    elif j == qb:
                        acc, m_i, l_i = _fwd_range(acc, m_i, l_i, q, Kb, Vb, stride_kt, stride_vt, j * BS, m0,
                                                   offs_m, L, qk_scale, BLOCK_N, D, False)
                        acc, m_i, l_i = _fwd_range(acc, m_i, l_i, q, Kb, Vb, stride_kt, stride_vt, m0,
                                                   m0 + BLOCK_M, offs_m, L, qk_scale, BLOCK_N, D, True)
            empty = l_i == 0.0  # no allowed key: output 0, lse -inf (documented behaviour)
            l_safe = tl.where(empty, 1.0, l_i)
            o = acc / l_safe[:, None]
            lse = tl.where(empty, float("-inf"), m_i + tl.log2(l_safe))
            tl.store(O + (bos + offs_m)[:, None] * stride_ot + pid_h * stride_oh + offs_d[None, :],
                     o.to(O.dtype.element_ty), mask=row_ok[:, None])
            tl.store(LSE + (bos + offs_m) * H + pid_h, lse, mask=row_ok)

    @triton.jit
    def _dq_range(dq, q, do, lse, delta, Kb, Vb, stride_kt, stride_vt, lo, hi, q_pos, L, qk_scale,
                  BLOCK_N: tl.constexpr, D: tl.constexpr, MASKED: tl.constexpr):
        offs_d = tl.arange(0, D)
        for start in range(lo, hi, BLOCK_N):
            start = tl.multiple_of(start, BLOCK_N)
            offs_n = start + tl.arange(0, BLOCK_N)
            if MASKED:
                kv_ok = offs_n < L
                k = tl.load(Kb + offs_n[:, None] * stride_kt + offs_d[None, :], mask=kv_ok[:, None], other=0.0)
                v = tl.load(Vb + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kv_ok[:, None], other=0.0)
            else:
                k = tl.load(Kb + offs_n[:, None] * stride_kt + offs_d[None, :])
                v = tl.load(Vb + offs_n[:, None] * stride_vt + offs_d[None, :])
            qk = tl.dot(q, tl.trans(k)) * qk_scale
            p = tl.exp2(qk - lse[:, None])
            if MASKED:
                ok = (offs_n[None, :] <= q_pos[:, None]) & kv_ok[None, :]
                p = tl.where(ok, p, 0.0)
            dp = tl.dot(do, tl.trans(v))
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k)
        return dq

    @triton.jit
    def _dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, CU, IDX, CNT, qk_scale, sm_scale,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                   stride_ib, stride_ih, stride_iq, stride_cb, stride_ch,
                   H, SINK, RECENT, NUM_IDX,
                   G: tl.constexpr, BS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   D: tl.constexpr, MODE: tl.constexpr):
        # q, do and dq share one layout (contiguous [total, H, D]): stride_qt / stride_qh.
        pid_h = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_b = tl.program_id(2)
        bos = tl.load(CU + pid_b)
        L = tl.load(CU + pid_b + 1) - bos
        m0 = pid_m * BLOCK_M
        if m0 < L:
            hkv = pid_h // G
            qb = m0 // BS
            offs_m = m0 + tl.arange(0, BLOCK_M)
            offs_d = tl.arange(0, D)
            row_ok = offs_m < L
            qo = (bos + offs_m)[:, None] * stride_qt + pid_h * stride_qh + offs_d[None, :]
            q = tl.load(Q + qo, mask=row_ok[:, None], other=0.0)
            do = tl.load(DO + qo, mask=row_ok[:, None], other=0.0)
            lse = tl.load(LSE + (bos + offs_m) * H + pid_h, mask=row_ok, other=float("inf"))
            lse = tl.where(lse == float("-inf"), float("inf"), lse)  # empty rows: p = 0, grads 0
            delta = tl.load(DELTA + (bos + offs_m) * H + pid_h, mask=row_ok, other=0.0)
            Kb = K + bos * stride_kt + hkv * stride_kh
            Vb = V + bos * stride_vt + hkv * stride_vh
            dq = tl.zeros([BLOCK_M, D], dtype=tl.float32)
            if MODE == 0:
                w_lo = tl.maximum(qb - RECENT + 1, 0)
                if qb < SINK:
                    w_lo = tl.minimum(w_lo, qb)
                s_hi = tl.minimum(SINK, w_lo) * BS
                dq = _dq_range(dq, q, do, lse, delta, Kb, Vb, stride_kt, stride_vt, 0, s_hi, offs_m, L, qk_scale,
                               BLOCK_N, D, False)
                if w_lo <= qb:
                    dq = _dq_range(dq, q, do, lse, delta, Kb, Vb, stride_kt, stride_vt, w_lo * BS, m0, offs_m, L,
                                   qk_scale, BLOCK_N, D, False)
                    dq = _dq_range(dq, q, do, lse, delta, Kb, Vb, stride_kt, stride_vt, m0, m0 + BLOCK_M, offs_m,
                                   L, qk_scale, BLOCK_N, D, True)
            else:
                n_idx = tl.load(CNT + pid_b * stride_cb + hkv * stride_ch + qb)
                Ib = IDX + pid_b * stride_ib + hkv * stride_ih + qb * stride_iq
                for t in range(0, n_idx):
                    j = tl.load(Ib + t)
                    if j < qb:
                        dq = _dq_range(dq, q, do, lse, delta, Kb, Vb, stride_kt, stride_vt, j * BS, j * BS + BS,
                                       offs_m, L, qk_scale, BLOCK_N, D, False)
                    elif j == qb:
                        dq = _dq_range(dq, q, do, lse, delta, Kb, Vb, stride_kt, stride_vt, j * BS, m0, offs_m, L,
                                       qk_scale, BLOCK_N, D, False)
                        dq = _dq_range(dq, q, do, lse, delta, Kb, Vb, stride_kt, stride_vt, m0, m0 + BLOCK_M,
                                       offs_m, L, qk_scale, BLOCK_N, D, True)
            tl.store(DQ + qo, (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])

    @triton.jit
    def _dkdv_range(dk, dv, k, v, Qb, DOb, LSEb, DELb, stride_qt, H, lo, hi, k_pos, L, qk_scale,
                    BLOCK_M: tl.constexpr, D: tl.constexpr, MASKED: tl.constexpr):
        # Rows past the sequence end load q = do = 0 and lse = +inf, so they add exactly nothing.
        offs_d = tl.arange(0, D)
        for start in range(lo, hi, BLOCK_M):
            start = tl.multiple_of(start, BLOCK_M)
            offs_m = start + tl.arange(0, BLOCK_M)
            row_ok = offs_m < L
            q = tl.load(Qb + offs_m[:, None] * stride_qt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
            do = tl.load(DOb + offs_m[:, None] * stride_qt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
            lse = tl.load(LSEb + offs_m * H, mask=row_ok, other=float("inf"))
            lse = tl.where(lse == float("-inf"), float("inf"), lse)
            delta = tl.load(DELb + offs_m * H, mask=row_ok, other=0.0)
            qkT = tl.dot(k, tl.trans(q)) * qk_scale
            pT = tl.exp2(qkT - lse[None, :])
            if MASKED:
                pT = tl.where(k_pos[:, None] <= offs_m[None, :], pT, 0.0)
            dv += tl.dot(pT.to(do.dtype), do)
            dpT = tl.dot(v, tl.trans(do))
            dsT = pT * (dpT - delta[None, :])
            dk += tl.dot(dsT.to(q.dtype), q)
        return dk, dv

    @triton.jit
    def _dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, CU, RIDX, RCNT, qk_scale, sm_scale,
                     stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_dkt, stride_dkh, stride_dvt, stride_dvh,
                     stride_rb, stride_rh, stride_rk, stride_cb, stride_ch,
                     H, SINK, RECENT,
                     G: tl.constexpr, BS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     D: tl.constexpr, MODE: tl.constexpr):
        pid_h = tl.program_id(0)  # KV head
        pid_n = tl.program_id(1)
        pid_b = tl.program_id(2)
        bos = tl.load(CU + pid_b)
        L = tl.load(CU + pid_b + 1) - bos
        n0 = pid_n * BLOCK_N
        if n0 < L:
            j = n0 // BS
            offs_n = n0 + tl.arange(0, BLOCK_N)
            offs_d = tl.arange(0, D)
            col_ok = offs_n < L
            k = tl.load(K + (bos + offs_n)[:, None] * stride_kt + pid_h * stride_kh + offs_d[None, :],
                        mask=col_ok[:, None], other=0.0)
            v = tl.load(V + (bos + offs_n)[:, None] * stride_vt + pid_h * stride_vh + offs_d[None, :],
                        mask=col_ok[:, None], other=0.0)
            dk = tl.zeros([BLOCK_N, D], dtype=tl.float32)
            dv = tl.zeros([BLOCK_N, D], dtype=tl.float32)
            diag_hi = tl.minimum(n0 + BLOCK_N, L)
            if MODE == 0:
                # Query blocks reading key block j: j .. j+RECENT-1, or all from j on if j is a sink.
                q_end = tl.minimum((j + RECENT) * BS, L)
                if j < SINK:
                    q_end = L
                for g in range(0, G):
                    h = pid_h * G + g
                    Qb = Q + bos * stride_qt + h * stride_qh
                    DOb = DO + bos * stride_qt + h * stride_qh
                    LSEb = LSE + bos * H + h
                    DELb = DELTA + bos * H + h
                    dk, dv = _dkdv_range(dk, dv, k, v, Qb, DOb, LSEb, DELb, stride_qt, H, n0,
                                         tl.minimum(diag_hi, q_end), offs_n, L, qk_scale, BLOCK_M, D, True)
                    dk, dv = _dkdv_range(dk, dv, k, v, Qb, DOb, LSEb, DELb, stride_qt, H, n0 + BLOCK_N, q_end,
                                         offs_n, L, qk_scale, BLOCK_M, D, False)
            else:
                n_rev = tl.load(RCNT + pid_b * stride_cb + pid_h * stride_ch + j)
                Rb = RIDX + pid_b * stride_rb + pid_h * stride_rh + j * stride_rk
                for g in range(0, G):
                    h = pid_h * G + g
                    Qb = Q + bos * stride_qt + h * stride_qh
                    DOb = DO + bos * stride_qt + h * stride_qh
                    LSEb = LSE + bos * H + h
                    DELb = DELTA + bos * H + h
                    for t in range(0, n_rev):
                        i = tl.load(Rb + t)
                        if i == j:
                            dk, dv = _dkdv_range(dk, dv, k, v, Qb, DOb, LSEb, DELb, stride_qt, H, n0, diag_hi,
                                                 offs_n, L, qk_scale, BLOCK_M, D, True)
                            dk, dv = _dkdv_range(dk, dv, k, v, Qb, DOb, LSEb, DELb, stride_qt, H, n0 + BLOCK_N,
                                                 tl.minimum(j * BS + BS, L), offs_n, L, qk_scale, BLOCK_M, D, False)
                        else:
                            dk, dv = _dkdv_range(dk, dv, k, v, Qb, DOb, LSEb, DELb, stride_qt, H, i * BS,
                                                 tl.minimum(i * BS + BS, L), offs_n, L, qk_scale, BLOCK_M, D, False)
            tl.store(DK + (bos + offs_n)[:, None] * stride_dkt + pid_h * stride_dkh + offs_d[None, :],
                     (dk * sm_scale).to(DK.dtype.element_ty), mask=col_ok[:, None])
            tl.store(DV + (bos + offs_n)[:, None] * stride_dvt + pid_h * stride_dvh + offs_d[None, :],
                     dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


# ---------------------------------------------------------------------------------------------
# Level 2: host launchers
# ---------------------------------------------------------------------------------------------
# Tile sizes per pass: (BLOCK_M, BLOCK_N, num_warps, num_stages). Chosen on an H100 for d = 128;
# tests pass smaller ones through ``tiles`` so the interpreter stays fast.
_GPU_TILES = {
    "fwd": {128: (128, 64, 8, 3), 64: (64, 64, 4, 3)},
    "dq": {128: (64, 64, 4, 2), 64: (64, 64, 4, 2)},
    "dkdv": {128: (64, 128, 8, 2), 64: (32, 64, 4, 2)},
}


def _tiles(kind: str, block_size: int, D: int, tiles: dict | None):
    if tiles is not None and kind in tiles:
        bm, bn, w, s = tiles[kind]
    elif block_size in _GPU_TILES[kind]:
        bm, bn, w, s = _GPU_TILES[kind][block_size]
        if D <= 32:
            w = 4
    else:
        bm = bn = min(block_size, 64)
        w, s = 4, 2
    # Tiles never straddle a sparse block, and the inner tile divides the outer one, so every
    # range the kernels walk is tile aligned.
    inner_ok = (bm % bn == 0) if kind != "dkdv" else (bn % bm == 0)
    if block_size % bm or block_size % bn or not inner_ok:
        raise ValueError(f"_tiles: {kind} tiles {(bm, bn)} do not fit block_size {block_size}")
    return bm, bn, w, s


class _Plan:
    """Host-side description shared by forward and backward: packing, mode, index tensors."""

    def __init__(self, B, T, cu_seqlens, device, block_size, sink, recent, block_indices):
        if cu_seqlens is None:
            self.cu = torch.arange(0, (B + 1) * T, T, dtype=torch.int32, device=device)
            self.n_seq, self.max_len = B, T
        else:
            self.cu = cu_seqlens.to(device=device, dtype=torch.int32)
            self.n_seq = cu_seqlens.numel() - 1
            self.max_len = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if self.n_seq > 0 else 0
        self.block_size, self.sink, self.recent = block_size, sink, recent
        self.mode = MODE_STREAM if block_indices is None else MODE_INDEX
        self.nb = triton.cdiv(self.max_len, block_size) if self.max_len > 0 else 0
        if self.mode == MODE_INDEX:
            idx = block_indices.to(device=device, dtype=torch.int32).contiguous()
            self.idx = idx
            self.cnt = (idx >= 0).sum(-1, dtype=torch.int32).contiguous()  # [N, H_kv, NQ]
        else:
            self.idx = self.cnt = torch.zeros(1, 1, 1, dtype=torch.int32, device=device)
        self.ridx = self.rcnt = None

    def reverse(self):
        """Per key block, the sorted query blocks that read it (index mode, backward only)."""
        if self.ridx is None:
            N, Hk, NQ, _ = self.idx.shape
            nb = max(self.nb, NQ)
            qb = torch.arange(NQ, device=self.idx.device)[None, None, :, None]
            idx = self.idx.long()
            keep = (idx >= 0) & (idx <= qb)  # entries above the query block read nothing (causal)
            mask = torch.zeros(N, Hk, NQ, nb + 1, dtype=torch.bool, device=idx.device)
            mask.scatter_(-1, torch.where(keep, idx, nb), True)
            maskT = mask[..., :nb].transpose(-1, -2)  # [N, H_kv, NK, NQ]
            self.rcnt = maskT.sum(-1, dtype=torch.int32).contiguous()
            ar = torch.arange(NQ, device=idx.device, dtype=torch.int32).expand_as(maskT)
            order = torch.where(maskT, ar, torch.full_like(ar, NQ)).sort(-1).values
            width = max(int(self.rcnt.max()) if self.rcnt.numel() else 0, 1)
            self.ridx = order[..., :width].contiguous()
        return self.ridx, self.rcnt


def block_sparse_attention_fwd(q, k, v, plan: _Plan, scale: float, tiles=None):
    """q [B, T, H, D], k/v [B, T, H_kv, D] contiguous -> (o [B, T, H, D], lse2 [B*T, H] base-2 float32)."""
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    qf, kf, vf = q.reshape(B * T, H, D), k.reshape(B * T, Hkv, D), v.reshape(B * T, Hkv, D)
    o = torch.empty_like(qf)
    lse = torch.empty(B * T, H, dtype=torch.float32, device=q.device)
    bm, bn, w, s = _tiles("fwd", plan.block_size, D, tiles)
    if plan.n_seq > 0 and plan.max_len > 0:
        grid = (H, triton.cdiv(plan.max_len, bm), plan.n_seq)
        _fwd_kernel[grid](
            qf, kf, vf, o, lse, plan.cu, plan.idx, plan.cnt, scale * _LOG2E,
            qf.stride(0), qf.stride(1), kf.stride(0), kf.stride(1), vf.stride(0), vf.stride(1),
            o.stride(0), o.stride(1),
            plan.idx.stride(0), plan.idx.stride(1), plan.idx.stride(2), plan.cnt.stride(0), plan.cnt.stride(1),
            H, plan.sink, plan.recent, plan.idx.shape[-1],
            G=H // Hkv, BS=plan.block_size, BLOCK_M=bm, BLOCK_N=bn, D=D, MODE=plan.mode,
            num_warps=w, num_stages=s)
    return o.view(B, T, H, D), lse


def block_sparse_attention_bwd(do, q, k, v, o, lse, plan: _Plan, scale: float, tiles=None):
    """Gradients (dq, dk, dv) of ``block_sparse_attention_fwd``; dk/dv sum over each GQA group."""
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    qf, kf, vf = q.reshape(B * T, H, D), k.reshape(B * T, Hkv, D), v.reshape(B * T, Hkv, D)
    dof = do.reshape(B * T, H, D).contiguous()
    delta = (dof.float() * o.reshape(B * T, H, D).float()).sum(-1).contiguous()  # [B*T, H]
    dq = torch.empty_like(qf)
    dk = torch.empty_like(kf)
    dv = torch.empty_like(vf)
    if plan.n_seq == 0 or plan.max_len == 0:
        return dq.view_as(q), dk.view_as(k), dv.view_as(v)
    if plan.mode == MODE_INDEX:
        ridx, rcnt = plan.reverse()
    else:
        ridx = rcnt = plan.idx
    bm, bn, w, s = _tiles("dkdv", plan.block_size, D, tiles)
    _dkdv_kernel[(Hkv, triton.cdiv(plan.max_len, bn), plan.n_seq)](
        qf, kf, vf, dof, lse, delta, dk, dv, plan.cu, ridx, rcnt, scale * _LOG2E, scale,
        qf.stride(0), qf.stride(1), kf.stride(0), kf.stride(1), vf.stride(0), vf.stride(1),
        dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        ridx.stride(0), ridx.stride(1), ridx.stride(2), rcnt.stride(0), rcnt.stride(1),
        H, plan.sink, plan.recent,
        G=H // Hkv, BS=plan.block_size, BLOCK_M=bm, BLOCK_N=bn, D=D, MODE=plan.mode,
        num_warps=w, num_stages=s)
    bm, bn, w, s = _tiles("dq", plan.block_size, D, tiles)
    _dq_kernel[(H, triton.cdiv(plan.max_len, bm), plan.n_seq)](
        qf, kf, vf, dof, lse, delta, dq, plan.cu, plan.idx, plan.cnt, scale * _LOG2E, scale,
        qf.stride(0), qf.stride(1), kf.stride(0), kf.stride(1), vf.stride(0), vf.stride(1),
        plan.idx.stride(0), plan.idx.stride(1), plan.idx.stride(2), plan.cnt.stride(0), plan.cnt.stride(1),
        H, plan.sink, plan.recent, plan.idx.shape[-1],
        G=H // Hkv, BS=plan.block_size, BLOCK_M=bm, BLOCK_N=bn, D=D, MODE=plan.mode,
        num_warps=w, num_stages=s)
    return dq.view_as(q), dk.view_as(k), dv.view_as(v)


# ---------------------------------------------------------------------------------------------
# Level 3: autograd
# ---------------------------------------------------------------------------------------------
class _BlockSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan, scale, tiles):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        o, lse = block_sparse_attention_fwd(q, k, v, plan, scale, tiles)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.plan, ctx.scale, ctx.tiles = plan, scale, tiles
        lse_nat = (lse * _LN2).view(q.shape[0], q.shape[1], q.shape[2])
        ctx.mark_non_differentiable(lse_nat)
        return o, lse_nat

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = block_sparse_attention_bwd(do, q, k, v, o, lse, ctx.plan, ctx.scale, ctx.tiles)
        return dq, dk, dv, None, None, None


# ---------------------------------------------------------------------------------------------
# Level 4: public functions (and their validation)
# ---------------------------------------------------------------------------------------------
_HEAD_DIMS = (16, 32, 64, 128)


def _check_qkv(q, k, v, cu_seqlens, scale, block_size, public_block_sizes=True):
    check_tensor("q", q, ndim=4, dtypes=(torch.float16, torch.bfloat16, torch.float32))
    check_tensor("k", k, ndim=4, dtypes=(q.dtype,), device=q.device)
    check_tensor("v", v, ndim=4, dtypes=(q.dtype,), device=q.device)
    B, T, H, D = q.shape
    if k.shape[:2] != (B, T) or v.shape != k.shape:
        raise ValueError(f"k/v: expected [B={B}, T={T}, H_kv, D] each and equal, got k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if k.shape[3] != D:
        raise ValueError(f"k: head dim {k.shape[3]} does not match q's head dim {D}")
    if H % k.shape[2] != 0:
        raise ValueError(f"k: H_kv = {k.shape[2]} must divide the number of query heads H = {H}")
    if D not in _HEAD_DIMS:
        raise ValueError(f"q: head dim {D} not supported; expected one of {_HEAD_DIMS}")
    allowed = (64, 128) if public_block_sizes else (16, 32, 64, 128)
    if not isinstance(block_size, int) or block_size not in allowed:
        raise ValueError(f"block_size: expected one of {allowed}, got {block_size!r}")
    if scale is not None and not (isinstance(scale, (int, float)) and scale > 0):
        raise ValueError(f"scale: expected a positive number or None, got {scale!r}")
    if cu_seqlens is not None:
        check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32, torch.int64))
        if B != 1:
            raise ValueError(f"cu_seqlens: packed sequences need B = 1, got B = {B}")
        cu = cu_seqlens.tolist()
        if len(cu) < 2 or cu[0] != 0 or cu[-1] != T or any(b < a for a, b in zip(cu, cu[1:])):
            raise ValueError(f"cu_seqlens: expected non-decreasing offsets from 0 to T = {T}, got {cu}")


def _check_indices(block_indices, q, k, cu_seqlens, block_size):
    check_tensor("block_indices", block_indices, ndim=4, dtypes=(torch.int32, torch.int64), device=q.device)
    B, T = q.shape[:2]
    lens = [T] * B if cu_seqlens is None else (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    nq = max([(L + block_size - 1) // block_size for L in lens] + [0])
    want = (len(lens), k.shape[2])
    if tuple(block_indices.shape[:2]) != want or block_indices.shape[2] < nq:
        raise ValueError(f"block_indices: expected [N={want[0]}, H_kv={want[1]}, NQ>={nq}, K], "
                         f"got {tuple(block_indices.shape)}")
    idx = block_indices.long()
    nk = torch.tensor([(L + block_size - 1) // block_size for L in lens], device=idx.device).view(-1, 1, 1, 1)
    valid = idx >= 0
    if bool(((idx < -1) | (idx >= nk)).any()):
        raise ValueError("block_indices: entries must be -1 (padding) or a key block of that sequence "
                         "(0 <= j < ceil(len / block_size))")
    if idx.shape[-1] > 1:
        a, b = idx[..., :-1], idx[..., 1:]
        bad = (valid[..., 1:] & ~valid[..., :-1]) | (valid[..., 1:] & (b <= a))
        if bool(bad.any()):
            raise ValueError("block_indices: each list must be strictly increasing, padding (-1) only at the end")


def _check_pattern(sink_blocks, recent_blocks):
    for name, val in (("sink_blocks", sink_blocks), ("recent_blocks", recent_blocks)):
        if not isinstance(val, int) or isinstance(val, bool) or val < 0:
            raise ValueError(f"{name}: expected an int >= 0, got {val!r}")


def _run(q, k, v, cu_seqlens, scale, block_size, sink, recent, block_indices, return_lse, tiles):
    from catkit.ops.sparse_attention import naive

    D = q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if not kernel_device_ok(q, k, v):  # plain CPU without the interpreter: exact reference path
        if block_indices is None:
            o, lse = naive.naive_streaming_attention(q, k, v, sink_blocks=sink, recent_blocks=recent,
                                                     block_size=block_size, cu_seqlens=cu_seqlens, scale=scale,
                                                     return_lse=True)
        else:
            o, lse = naive.naive_block_sparse_attention(q, k, v, block_indices, block_size=block_size,
                                                        cu_seqlens=cu_seqlens, scale=scale, return_lse=True)
        o, lse = o.to(q.dtype), lse.float()
    else:
        plan = _Plan(q.shape[0], q.shape[1], cu_seqlens, q.device, block_size, sink, recent, block_indices)
        o, lse = _BlockSparseAttention.apply(q, k, v, plan, scale, tiles)
    return (o, lse) if return_lse else o


def streaming_attention(q, k, v, *, sink_blocks, recent_blocks, block_size=128, cu_seqlens=None, scale=None,
                        return_lse=False, _tiles=None, _any_block_size=False):
    """Causal streaming (sink + block-aligned window) attention, LoZA's SSA pattern.

    Query block i (blocks of ``block_size`` tokens from each sequence's start) reads key blocks
    ``j < sink_blocks`` and ``i - recent_blocks + 1 <= j <= i``, causal inside.

    Args:
        q: [B, T, H, D]; k, v: [B, T, H_kv, D] with H_kv dividing H (GQA). fp16/bf16/fp32, D in
            16/32/64/128.
        sink_blocks, recent_blocks: ints >= 0 (LoZA: 1 and 8 for a 128-token sink, 1024-token window).
        block_size: 64 or 128 (default 128).
        cu_seqlens: optional [N + 1] int offsets of packed sequences (then B = 1).
        scale: softmax scale, default 1 / sqrt(D).
        return_lse: also return the logsumexp [B, T, H] (natural log, float32, not differentiable).
    Returns:
        o [B, T, H, D] in q's dtype (and lse). Rows with no allowed key (only possible with
        sink_blocks = recent_blocks = 0) give o = 0, lse = -inf and zero gradients.

    Example:
        >>> o = streaming_attention(q, k, v, sink_blocks=1, recent_blocks=8)  # q: [1, 32768, 32, 128]
    """
    _check_qkv(q, k, v, cu_seqlens, scale, block_size, public_block_sizes=not _any_block_size)
    _check_pattern(sink_blocks, recent_blocks)
    return _run(q, k, v, cu_seqlens, scale, block_size, sink_blocks, recent_blocks, None, return_lse, _tiles)


def block_sparse_attention(q, k, v, block_indices, *, block_size, cu_seqlens=None, scale=None, return_lse=False,
                           validate=True, _tiles=None, _any_block_size=False):
    """Causal attention where each query block reads an explicit list of key blocks.

    Args:
        q: [B, T, H, D]; k, v: [B, T, H_kv, D] (see ``streaming_attention``).
        block_indices: int32/int64 [N, H_kv, NQ, K]: for sequence n (N = B, or the number of packed
            sequences), KV head h and query block i, the key blocks it reads, strictly increasing,
            padded at the end with -1. NQ >= ceil(max_len / block_size); rows for query blocks past
            a sequence's end are ignored. Entries above i are allowed and read nothing (causal);
            the own block i, when listed, is read with the causal rule inside.
        block_size: 64 or 128.
        validate: check the index lists (costs a device sync); turn off in hot loops.
    Returns:
        o [B, T, H, D] (and lse [B, T, H] if return_lse). A query block with an empty list gets
        o = 0, lse = -inf and zero gradients.

    Example:
        >>> idx = torch.tensor([[[[0, -1], [0, 1]]]])  # 1 seq, 1 KV head, 2 query blocks
        >>> o = block_sparse_attention(q, k, v, idx, block_size=64)  # q: [1, 128, 4, 64], k: [1, 128, 1, 64]
    """
    _check_qkv(q, k, v, cu_seqlens, scale, block_size, public_block_sizes=not _any_block_size)
    if validate:
        _check_indices(block_indices, q, k, cu_seqlens, block_size)
    return _run(q, k, v, cu_seqlens, scale, block_size, 0, 0, block_indices, return_lse, _tiles)
