"""Block-sparse causal attention, backward pass (dq, dk, dv) in Triton.

- ``_delta_kernel``: delta = rowsum(dO * O) in float32.
- ``_dq_kernel``: mirrors the forward (same key ranges), recomputing P from the saved logsumexp.
- ``_dkdv_kernel``: one program per (KV head, key tile, sequence) walks the query tiles that read
  its key tile and sums the query heads of its GQA group in registers (no atomics). Streaming:
  key block j is read by query blocks j .. j+R-1, and by every later block if j is a sink. That
  sink tail would make a few programs walk the whole sequence, so extra programs take it in
  chunks of query blocks and write float32 partials to a scratch buffer that the host sums.
  Index mode walks a reverse index (query blocks per key block) built on the host.
"""

from __future__ import annotations

import torch

from catkit.ops.sparse_attention.prefill_fwd import LOG2E, MODE_INDEX, Plan, TunedByLength, pick_tiles, run_tuned
from catkit.utils.triton_utils import triton_available

if triton_available():
    import triton
    import triton.language as tl
else:  # pragma: no cover
    triton = None

# ---------------------------------------------------------------------------------------------
# Level 1: Triton kernels
# ---------------------------------------------------------------------------------------------
if triton is not None:
    from catkit.ops.sparse_attention.prefill_fwd import _query_rows, _streaming_bounds

    @triton.jit
    def _delta_kernel(O, DO, DELTA, n_rows, D: tl.constexpr, BLOCK_R: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        ok = rows < n_rows
        offs = rows[:, None] * D + tl.arange(0, D)[None, :]
        o = tl.load(O + offs, mask=ok[:, None], other=0.0).to(tl.float32)
        do = tl.load(DO + offs, mask=ok[:, None], other=0.0).to(tl.float32)
        tl.store(DELTA + rows, tl.sum(o * do, 1), mask=ok)

    @triton.jit
    def _dq_range(dq, q, do, lse, delta, Kb, Vb, stride_kt, stride_vt, lo, hi, split, gap, q_pos, L, qk_scale,
                  BLOCK_N: tl.constexpr, D: tl.constexpr, MASKED: tl.constexpr):
        offs_d = tl.arange(0, D)
        for v0 in range(lo, hi, BLOCK_N):
            start = v0 + tl.where(v0 >= split, gap, 0)
            start = tl.multiple_of(start, BLOCK_N)
            offs_n = start + tl.arange(0, BLOCK_N)
            if MASKED:
                kv_ok = offs_n < L
                k = tl.load(Kb + offs_n[:, None] * stride_kt + offs_d[None, :], mask=kv_ok[:, None], other=0.0)
                v = tl.load(Vb + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kv_ok[:, None], other=0.0)
            else:
                k = tl.load(Kb + offs_n[:, None] * stride_kt + offs_d[None, :])
                v = tl.load(Vb + offs_n[:, None] * stride_vt + offs_d[None, :])
            qk = tl.dot(q, tl.trans(k))
            p = tl.exp2(qk * qk_scale - lse[:, None])
            if MASKED:
                ok = (offs_n[None, :] <= q_pos[:, None]) & kv_ok[None, :]
                p = tl.where(ok, p, 0.0)
            dp = tl.dot(do, tl.trans(v))
            ds = p * (dp - delta[:, None])
            dq = tl.dot(ds.to(k.dtype), k, dq)
        return dq

    @triton.jit
    def _dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, CU, IDX, CNT, qk_scale, sm_scale,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                   stride_ib, stride_ih, stride_iq, stride_cb, stride_ch,
                   H, SINK, RECENT,
                   G: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, MODE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HPP: tl.constexpr):
        # q, do and dq share one contiguous [total, H, D] layout (stride_qt / stride_qh). Rows stack
        # HPP heads of one GQA group x BLOCK_M tokens, as in the forward.
        pid_h = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_b = tl.program_id(2)
        bos = tl.load(CU + pid_b)
        L = tl.load(CU + pid_b + 1) - bos
        m0 = pid_m * BLOCK_M
        if m0 < L:
            hkv, qb, offs_m, head, offs_d = _query_rows(pid_h, m0, G, BS, D, BLOCK_M, HPP)
            row_ok = offs_m < L
            qo = (bos + offs_m)[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :]
            q = tl.load(Q + qo, mask=row_ok[:, None], other=0.0)
            do = tl.load(DO + qo, mask=row_ok[:, None], other=0.0)
            lse = tl.load(LSE + (bos + offs_m) * H + head, mask=row_ok, other=float("inf"))
            lse = tl.where(lse == float("-inf"), float("inf"), lse)  # empty rows: p = 0, grads 0
            delta = tl.load(DELTA + (bos + offs_m) * H + head, mask=row_ok, other=0.0)
            Kb = K + bos * stride_kt + hkv * stride_kh
            Vb = V + bos * stride_vt + hkv * stride_vh
            dq = tl.zeros([HPP * BLOCK_M, D], dtype=tl.float32)
            if MODE == 0:
                w_lo, s_hi, n_full = _streaming_bounds(qb, m0, SINK, RECENT, BS)
                dq = _dq_range(dq, q, do, lse, delta, Kb, Vb, stride_kt, stride_vt, 0, n_full, s_hi,
                               w_lo * BS - s_hi, offs_m, L, qk_scale, BLOCK_N, D, False)
                if w_lo <= qb:
                    dq = _dq_range(dq, q, do, lse, delta, Kb, Vb, stride_kt, stride_vt, m0, m0 + BLOCK_M, L, 0,
                                   offs_m, L, qk_scale, BLOCK_N, D, True)
            else:
                n_idx = tl.load(CNT + pid_b * stride_cb + hkv * stride_ch + qb)
                Ib = IDX + pid_b * stride_ib + hkv * stride_ih + qb * stride_iq
                for t in range(0, n_idx):
                    j = tl.load(Ib + t)
                    if j < qb:
                        dq = _dq_range(dq, q, do, lse, delta, Kb, Vb, stride_kt, stride_vt, j * BS, j * BS + BS,
                                       L, 0, offs_m, L, qk_scale, BLOCK_N, D, False)
                    elif j == qb:
                        dq = _dq_range(dq, q, do, lse, delta, Kb, Vb, stride_kt, stride_vt, j * BS, m0, L, 0,
                                       offs_m, L, qk_scale, BLOCK_N, D, False)
                        dq = _dq_range(dq, q, do, lse, delta, Kb, Vb, stride_kt, stride_vt, m0, m0 + BLOCK_M,
                                       L, 0, offs_m, L, qk_scale, BLOCK_N, D, True)
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
            qkT = tl.dot(k, tl.trans(q))
            pT = tl.exp2(qkT * qk_scale - lse[None, :])
            if MASKED:
                pT = tl.where(k_pos[:, None] <= offs_m[None, :], pT, 0.0)
            dv = tl.dot(pT.to(do.dtype), do, dv)
            dpT = tl.dot(v, tl.trans(do))
            dsT = pT * (dpT - delta[None, :])
            dk = tl.dot(dsT.to(q.dtype), q, dk)
        return dk, dv

    @triton.jit
    def _dkdv_group(dk, dv, k, v, Q, DO, LSE, DELTA, bos, pid_h, stride_qt, stride_qh, H, lo_m, hi_m, lo_u, hi_u,
                    k_pos, L, qk_scale, G: tl.constexpr, BLOCK_M: tl.constexpr, D: tl.constexpr):
        # Every query head of the GQA group: masked range [lo_m, hi_m), then unmasked [lo_u, hi_u).
        for g in range(0, G):
            h = pid_h * G + g
            Qb = Q + bos * stride_qt + h * stride_qh
            DOb = DO + bos * stride_qt + h * stride_qh
            LSEb = LSE + bos * H + h
            DELb = DELTA + bos * H + h
            dk, dv = _dkdv_range(dk, dv, k, v, Qb, DOb, LSEb, DELb, stride_qt, H, lo_m, hi_m, k_pos, L, qk_scale,
                                 BLOCK_M, D, True)
            dk, dv = _dkdv_range(dk, dv, k, v, Qb, DOb, LSEb, DELb, stride_qt, H, lo_u, hi_u, k_pos, L, qk_scale,
                                 BLOCK_M, D, False)
        return dk, dv

    @triton.jit
    def _dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, SCR_K, SCR_V, CU, RIDX, RCNT, qk_scale, sm_scale,
                     stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_dkt, stride_dkh, stride_dvt, stride_dvh,
                     stride_rb, stride_rh, stride_rk, stride_cb, stride_ch,
                     H, HKV, N_SEQ, SINK, RECENT, N_MAIN, N_SINK_TILES, SINK_ROWS, CHUNK,
                     G: tl.constexpr, BS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     D: tl.constexpr, MODE: tl.constexpr):
        pid_h = tl.program_id(0)  # KV head
        pid_n = tl.program_id(1)
        pid_b = tl.program_id(2)
        bos = tl.load(CU + pid_b)
        L = tl.load(CU + pid_b + 1) - bos
        r1 = tl.maximum(RECENT, 1)  # query blocks j .. j+r1-1 of a sink block stay in the main program
        slot = pid_n * 0  # tensors from the start: both branches below must agree on types
        q_lo = pid_n * 0
        q_hi = pid_n * 0
        if pid_n < N_MAIN:
            n0 = pid_n * BLOCK_N
        else:  # sink tail: (sink tile, chunk of query blocks)
            e = pid_n - N_MAIN
            n0 = (e % N_SINK_TILES) * BLOCK_N
            slot = e // N_SINK_TILES + 1
            q_lo = (n0 // BS + r1 + (slot - 1) * CHUNK) * BS
            q_hi = tl.minimum(q_lo + CHUNK * BS, L)
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
                if slot == 0:
                    q_end = tl.minimum((j + RECENT) * BS, L)
                    if j < SINK:
                        q_end = tl.minimum((j + r1) * BS, L)
                    dk, dv = _dkdv_group(dk, dv, k, v, Q, DO, LSE, DELTA, bos, pid_h, stride_qt, stride_qh, H, n0,
                                         tl.minimum(diag_hi, q_end), n0 + BLOCK_N, q_end, offs_n, L, qk_scale,
                                         G, BLOCK_M, D)
                else:
                    dk, dv = _dkdv_group(dk, dv, k, v, Q, DO, LSE, DELTA, bos, pid_h, stride_qt, stride_qh, H, 0, 0,
                                         q_lo, q_hi, offs_n, L, qk_scale, G, BLOCK_M, D)
            else:
                n_rev = tl.load(RCNT + pid_b * stride_cb + pid_h * stride_ch + j)
                Rb = RIDX + pid_b * stride_rb + pid_h * stride_rh + j * stride_rk
                for t in range(0, n_rev):
                    i = tl.load(Rb + t)
                    if i == j:
                        dk, dv = _dkdv_group(dk, dv, k, v, Q, DO, LSE, DELTA, bos, pid_h, stride_qt, stride_qh, H,
                                             n0, diag_hi, n0 + BLOCK_N, tl.minimum(j * BS + BS, L), offs_n, L,
                                             qk_scale, G, BLOCK_M, D)
                    else:
                        dk, dv = _dkdv_group(dk, dv, k, v, Q, DO, LSE, DELTA, bos, pid_h, stride_qt, stride_qh, H,
                                             0, 0, i * BS, tl.minimum(i * BS + BS, L), offs_n, L, qk_scale,
                                             G, BLOCK_M, D)
            dk = dk * sm_scale
            if j < SINK:  # SINK is 0 in index mode
                # Sink rows: float32 partials, one scratch slot per program, summed on the host.
                so = (((slot * N_SEQ + pid_b) * SINK_ROWS + offs_n) * HKV + pid_h)[:, None] * D + offs_d[None, :]
                tl.store(SCR_K + so, dk, mask=col_ok[:, None])
                tl.store(SCR_V + so, dv, mask=col_ok[:, None])
            else:
                tl.store(DK + (bos + offs_n)[:, None] * stride_dkt + pid_h * stride_dkh + offs_d[None, :],
                         dk.to(DK.dtype.element_ty), mask=col_ok[:, None])
                tl.store(DV + (bos + offs_n)[:, None] * stride_dvt + pid_h * stride_dvh + offs_d[None, :],
                         dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


    _dq_kernel_tuned = TunedByLength(_dq_kernel)


# ---------------------------------------------------------------------------------------------
# Level 2: host launcher
# ---------------------------------------------------------------------------------------------
def block_sparse_attention_bwd(do, q, k, v, o, lse, plan: Plan, scale: float, tiles=None):
    """Gradients (dq, dk, dv) of ``block_sparse_attention_fwd``; dk/dv sum over each GQA group."""
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    qf, kf, vf = q.reshape(B * T, H, D), k.reshape(B * T, Hkv, D), v.reshape(B * T, Hkv, D)
    dof = do.reshape(B * T, H, D).contiguous()
    dq, dk, dv = torch.empty_like(qf), torch.empty_like(kf), torch.empty_like(vf)
    if plan.n_seq == 0 or plan.max_len == 0:
        return dq.view_as(q), dk.view_as(k), dv.view_as(v)
    n_rows = B * T * H
    delta = torch.empty(B * T, H, dtype=torch.float32, device=q.device)
    _delta_kernel[(triton.cdiv(n_rows, 64),)](o, dof, delta, n_rows, D=D, BLOCK_R=64)

    bs = plan.block_size
    bm, bn, w, s, _ = pick_tiles("dkdv", bs, D, tiles)
    n_main = triton.cdiv(plan.max_len, bn)
    if plan.mode == MODE_INDEX:
        ridx, rcnt = plan.reverse()
        n_sink_tiles = sink_rows = n_chunks = chunk = 0
    else:
        ridx = rcnt = plan.idx
        sink_rows = min(plan.sink, plan.nb) * bs
        n_sink_tiles = sink_rows // bn
        chunk = max(plan.recent, 2)  # a tail program does about the work of a window program
        n_chunks = triton.cdiv(max(plan.nb - max(plan.recent, 1), 0), chunk) if n_sink_tiles else 0
    scr_shape = (n_chunks + 1, plan.n_seq, sink_rows, Hkv, D) if n_sink_tiles else (1,)
    scr_k = torch.zeros(scr_shape, dtype=torch.float32, device=q.device)
    scr_v = torch.zeros(scr_shape, dtype=torch.float32, device=q.device)
    _dkdv_kernel[(Hkv, n_main + n_sink_tiles * n_chunks, plan.n_seq)](
        qf, kf, vf, dof, lse, delta, dk, dv, scr_k, scr_v, plan.cu, ridx, rcnt, scale * LOG2E, scale,
        qf.stride(0), qf.stride(1), kf.stride(0), kf.stride(1), vf.stride(0), vf.stride(1),
        dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        ridx.stride(0), ridx.stride(1), ridx.stride(2), rcnt.stride(0), rcnt.stride(1),
        H, Hkv, plan.n_seq, plan.sink, plan.recent, n_main, max(n_sink_tiles, 1), max(sink_rows, 1), max(chunk, 1),
        G=H // Hkv, BS=bs, BLOCK_M=bm, BLOCK_N=bn, D=D, MODE=plan.mode,
        num_warps=w, num_stages=s)
    if n_sink_tiles:
        _write_sink_rows(dk, scr_k.sum(0), plan, T)
        _write_sink_rows(dv, scr_v.sum(0), plan, T)

    args = (qf, kf, vf, dof, lse, delta, dq, plan.cu, plan.idx, plan.cnt, scale * LOG2E, scale,
            qf.stride(0), qf.stride(1), kf.stride(0), kf.stride(1), vf.stride(0), vf.stride(1),
            plan.idx.stride(0), plan.idx.stride(1), plan.idx.stride(2), plan.cnt.stride(0), plan.cnt.stride(1),
            H, plan.sink, plan.recent)
    meta = dict(G=H // Hkv, BS=bs, D=D, MODE=plan.mode)
    grid = lambda M: (H // M["HPP"], triton.cdiv(plan.max_len, M["BLOCK_M"]), plan.n_seq)  # noqa: E731
    if not (tiles is None and q.is_cuda and run_tuned(_dq_kernel_tuned.for_tokens(qf.shape[0]), grid, args, meta)):
        bm, bn, w, s, hpp = pick_tiles("dq", bs, D, tiles, H // Hkv)
        _dq_kernel[(H // hpp, triton.cdiv(plan.max_len, bm), plan.n_seq)](
            *args, **meta, BLOCK_M=bm, BLOCK_N=bn, HPP=hpp, num_warps=w, num_stages=s)
    return dq.view_as(q), dk.view_as(k), dv.view_as(v)


def _write_sink_rows(dst, red, plan: Plan, T):
    """dst [total, H_kv, D] <- red [N, sink_rows, H_kv, D] at each sequence's first rows."""
    rows = red.shape[1]
    if not plan.packed:
        n = min(rows, T)
        dst.view(plan.n_seq, T, *dst.shape[1:])[:, :n] = red[:, :n].to(dst.dtype)
        return
    ar = torch.arange(rows, device=dst.device)
    lens = (plan.cu[1:] - plan.cu[:-1]).long()
    valid = ar[None, :] < lens[:, None]
    pos = plan.cu[:-1].long()[:, None] + ar[None, :]
    dst[pos[valid]] = red[valid].to(dst.dtype)
