"""Split-KV (flash-decoding style) attention for one new token over a paged KV cache.

Each program owns one (sequence, KV head, split): it loads the query rows of the whole GQA group
once, walks its share of the selected key blocks (dense, streaming pattern, or an index list),
translating token positions to cache slots through the block table, and writes its partial result
with its base-2 logsumexp; the last split of each (sequence, KV head) to finish (an atomic counter)
merges the splits by logsumexp, so a decode step is one launch. Only selected blocks are read, and
each once per group, so bytes scale with the selection, not the context.

Blocks are ``block_size`` tokens counted from position 0 (independent of ``page_size``); the query
sits at position ``seq_lens[b] - 1``, so the result equals the last row of the prefill kernels.
"""

from __future__ import annotations

import functools
import math

import torch

from catkit.utils.device import check_tensor
from catkit.utils.triton_utils import kernel_device_ok, triton_available

if triton_available():
    import triton
    import triton.language as tl
else:  # pragma: no cover
    triton = None

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
MODE_DENSE, MODE_STREAM, MODE_INDEX = 0, 1, 2

# ---------------------------------------------------------------------------------------------
# Level 1: Triton kernels
# ---------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _decode_split_kernel(Q, KC, VC, BT, SEQ, IDX, CNT, OP, LP, O, LSE, LOCK, qk_scale,
                             MAXP, NIDX, NSPLIT, SINK, RECENT,
                             H: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
                             BS: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
                             NSP: tl.constexpr, MODE: tl.constexpr, LN2: tl.constexpr):
        # Every tensor is contiguous (checked on the host), so strides follow from the shapes and the
        # launch carries few arguments: at decode sizes the launch costs more than the kernel.
        b = tl.program_id(0)
        hkv = tl.program_id(1)
        sp = tl.program_id(2)
        L = tl.load(SEQ + b)
        offs_g = tl.arange(0, GP)
        offs_d = tl.arange(0, D)
        g_ok = offs_g < G
        heads = hkv * G + offs_g
        # The group's query rows, padded to >= 16 rows so tl.dot applies; KV is read once for all.
        q = tl.load(Q + (b * H + heads)[:, None] * D + offs_d[None, :], mask=g_ok[:, None], other=0.0)
        qb = tl.maximum(L - 1, 0) // BS
        n_sink = 0
        w_lo = 0
        if MODE == 0:
            n_sel = (L + BS - 1) // BS
        elif MODE == 1:
            w_lo = tl.maximum(qb - RECENT + 1, 0)
            if qb < SINK:
                w_lo = tl.minimum(w_lo, qb)
            n_sink = tl.minimum(SINK, w_lo)
            n_sel = n_sink + tl.maximum(qb - w_lo + 1, 0)
        else:
            n_sel = tl.load(CNT + b * HKV + hkv)
        n_sel = tl.where(L > 0, n_sel, 0)
        per = (n_sel + NSPLIT - 1) // NSPLIT
        t0 = sp * per
        t1 = tl.minimum(t0 + per, n_sel)
        acc = tl.zeros([GP, D], dtype=tl.float32)
        m_i = tl.zeros([GP], dtype=tl.float32) - 1.0e30
        l_i = tl.zeros([GP], dtype=tl.float32)
        KCh = KC + hkv * D
        VCh = VC + hkv * D
        for t in range(t0, t1):
            if MODE == 0:
                blk = t
            elif MODE == 1:
                blk = tl.where(t < n_sink, t, w_lo + t - n_sink)
            else:
                blk = tl.load(IDX + (b * HKV + hkv) * NIDX + t)
            for off in range(0, BS, BLOCK_N):
                pos = blk * BS + off + tl.arange(0, BLOCK_N)
                ok = pos < L
                page = tl.load(BT + b * MAXP + pos // PAGE, mask=ok, other=0).to(tl.int64)
                row = (page * PAGE + pos % PAGE) * (HKV * D)
                k = tl.load(KCh + row[:, None] + offs_d[None, :], mask=ok[:, None], other=0.0)
                v = tl.load(VCh + row[:, None] + offs_d[None, :], mask=ok[:, None], other=0.0)
                qk = tl.dot(q, tl.trans(k))
                qk = tl.where(ok[None, :], qk, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
                p = tl.exp2(qk * qk_scale - m_new[:, None])
                alpha = tl.exp2(m_i - m_new)
                l_i = l_i * alpha + tl.sum(p, 1)
                acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
                m_i = m_new
        empty = l_i == 0.0
        l_safe = tl.where(empty, 1.0, l_i)
        lse = tl.where(empty, float("-inf"), m_i + tl.log2(l_safe))
        base = (b * H + heads) * NSPLIT
        tl.store(OP + (base + sp)[:, None] * D + offs_d[None, :], acc / l_safe[:, None], mask=g_ok[:, None])
        tl.store(LP + base + sp, lse, mask=g_ok)
        # The last split of this (sequence, KV head) to finish merges all splits by logsumexp, so one
        # launch does everything. The barrier + acq_rel atomic order every thread's partial stores
        # before the count; the merge reads through L2 (.cg), never a stale L1 line.
        tl.debug_barrier()
        done = tl.atomic_add(LOCK + b * HKV + hkv, 1)
        if done == NSPLIT - 1:
            offs_s = tl.arange(0, NSP)
            s_ok = offs_s < NSPLIT
            for g in tl.static_range(G):  # unrolled: all heads' loads can be in flight together
                hb = (b * H + hkv * G + g) * NSPLIT
                ls = tl.load(LP + hb + offs_s, mask=s_ok, other=float("-inf"), cache_modifier=".cg")
                part = tl.load(OP + (hb + offs_s)[:, None] * D + offs_d[None, :], mask=s_ok[:, None], other=0.0,
                               cache_modifier=".cg")
                m = tl.max(ls, 0)
                m = tl.where(m == float("-inf"), 0.0, m)  # every split empty: weights 0, output 0
                w = tl.exp2(ls - m)
                den = tl.sum(w, 0)
                den_safe = tl.where(den == 0.0, 1.0, den)
                out = tl.sum(part * w[:, None], 0) / den_safe
                tl.store(O + (b * H + hkv * G + g) * D + offs_d, out.to(O.dtype.element_ty))
                tl.store(LSE + b * H + hkv * G + g, tl.where(den == 0.0, float("-inf"), (m + tl.log2(den_safe)) * LN2))
            tl.atomic_xchg(LOCK + b * HKV + hkv, 0)  # ready for the next call


# ---------------------------------------------------------------------------------------------
# Level 2: host launcher
# ---------------------------------------------------------------------------------------------
_LOCKS: dict = {}


def _locks(device, n: int) -> torch.Tensor:
    """Per-(sequence, KV head) split counters; kernels leave them at 0, so they are allocated once.

    Shared per device: do not run two decodes on different streams of one device at once.
    """
    buf = _LOCKS.get(device)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
        _LOCKS[device] = buf
    return buf


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def paged_decode_fwd(q, k_cache, v_cache, block_table, seq_lens, mode, sink, recent, block_indices, block_size,
                     scale, num_splits=None, block_n=None):
    """One launch: splits plus the merge by the last split; returns (o [B, H, D] in q's dtype, lse [B, H] natural log float32)."""
    B, H, D = q.shape
    Hkv = k_cache.shape[2]
    page = k_cache.shape[1]
    q = q.contiguous()
    bt = (block_table if block_table.dtype == torch.int32 else block_table.to(torch.int32)).contiguous()
    sl = (seq_lens if seq_lens.dtype == torch.int32 else seq_lens.to(torch.int32)).contiguous()
    max_blocks = triton.cdiv(bt.shape[1] * page, block_size)
    if mode == MODE_INDEX:
        idx = block_indices if block_indices.dtype == torch.int32 else block_indices.to(torch.int32)
        idx = idx.contiguous()
        cnt = (idx >= 0).sum(-1, dtype=torch.int32)
        n_sel_max = idx.shape[-1]
    else:
        idx = cnt = sl  # unused placeholders
        n_sel_max = max_blocks if mode == MODE_DENSE else min(max_blocks, sink + recent)
    if num_splits is None:
        # Enough (sequence, KV head, split) programs to fill the card about four times over.
        sms = _num_sms(q.device.index or 0) if q.is_cuda else 8
        num_splits = max(1, min(max(n_sel_max, 1), triton.cdiv(4 * sms, B * Hkv)))
    G = H // Hkv
    # One float32 workspace for the partials, their lse and the final lse: fewer allocations.
    n_part = B * H * num_splits
    ws = torch.empty(n_part * (D + 1) + B * H, dtype=torch.float32, device=q.device)
    o = torch.empty(B, H, D, dtype=q.dtype, device=q.device)
    lse = ws[n_part * (D + 1):].view(B, H)
    bn = block_n or min(block_size, 64)
    _decode_split_kernel[(B, Hkv, num_splits)](
        q, k_cache, v_cache, bt, sl, idx, cnt, ws, ws[n_part * D:], o, lse, _locks(q.device, B * Hkv),
        scale * _LOG2E, bt.shape[1], idx.shape[-1], num_splits, sink, recent,
        H=H, HKV=Hkv, G=G, GP=max(16, triton.next_power_of_2(G)), BS=block_size, PAGE=page, BLOCK_N=bn, D=D,
        NSP=max(2, triton.next_power_of_2(num_splits)), MODE=mode, LN2=_LN2, num_warps=4, num_stages=2)
    return o, lse


# ---------------------------------------------------------------------------------------------
# Level 3: autograd. Decode is inference only: the function refuses to build a graph.
# ---------------------------------------------------------------------------------------------
class _PagedDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k_cache, v_cache, block_table, seq_lens, mode, sink, recent, block_indices, block_size,
                scale, num_splits):
        o, lse = paged_decode_fwd(q, k_cache, v_cache, block_table, seq_lens, mode, sink, recent, block_indices,
                                  block_size, scale, num_splits)
        ctx.mark_non_differentiable(o, lse)
        return o, lse

    @staticmethod
    def backward(ctx, *grads):  # pragma: no cover - marked non-differentiable
        raise RuntimeError("paged_decode_attention has no backward; use the prefill kernels for training")


# ---------------------------------------------------------------------------------------------
# Level 4: public function
# ---------------------------------------------------------------------------------------------
_HEAD_DIMS = (16, 32, 64, 128)


def _validate(q, k_cache, v_cache, block_table, seq_lens, sink_blocks, recent_blocks, block_indices, block_size,
              scale, any_block_size, deep):
    check_tensor("q", q, ndim=3, dtypes=(torch.float16, torch.bfloat16, torch.float32))
    check_tensor("k_cache", k_cache, ndim=4, dtypes=(q.dtype,), device=q.device)
    check_tensor("v_cache", v_cache, ndim=4, dtypes=(q.dtype,), device=q.device)
    check_tensor("block_table", block_table, ndim=2, dtypes=(torch.int32, torch.int64), device=q.device)
    check_tensor("seq_lens", seq_lens, ndim=1, dtypes=(torch.int32, torch.int64), device=q.device)
    B, H, D = q.shape
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache: shape {tuple(v_cache.shape)} differs from k_cache {tuple(k_cache.shape)}")
    if k_cache.shape[3] != D:
        raise ValueError(f"k_cache: head dim {k_cache.shape[3]} does not match q's head dim {D}")
    if D not in _HEAD_DIMS:
        raise ValueError(f"q: head dim {D} not supported; expected one of {_HEAD_DIMS}")
    if H % k_cache.shape[2] != 0:
        raise ValueError(f"k_cache: H_kv = {k_cache.shape[2]} must divide the number of query heads H = {H}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache/v_cache: expected contiguous [num_pages, page_size, H_kv, D] tensors")
    if block_table.shape[0] != B or seq_lens.shape[0] != B:
        raise ValueError(f"block_table/seq_lens: expected batch {B}, got {tuple(block_table.shape)}, "
                         f"{tuple(seq_lens.shape)}")
    allowed = (16, 32, 64, 128) if any_block_size else (64, 128)
    if not isinstance(block_size, int) or block_size not in allowed:
        raise ValueError(f"block_size: expected one of {allowed}, got {block_size!r}")
    if scale is not None and not (isinstance(scale, (int, float)) and scale > 0):
        raise ValueError(f"scale: expected a positive number or None, got {scale!r}")
    if (sink_blocks is None) != (recent_blocks is None):
        raise ValueError("sink_blocks/recent_blocks: give both (streaming) or neither")
    if sink_blocks is not None:
        if block_indices is not None:
            raise ValueError("block_indices: give either the streaming pattern or block_indices, not both")
        for name, val in (("sink_blocks", sink_blocks), ("recent_blocks", recent_blocks)):
            if not isinstance(val, int) or isinstance(val, bool) or val < 0:
                raise ValueError(f"{name}: expected an int >= 0, got {val!r}")
    if block_indices is not None:
        check_tensor("block_indices", block_indices, ndim=3, dtypes=(torch.int32, torch.int64), device=q.device)
        if tuple(block_indices.shape[:2]) != (B, k_cache.shape[2]):
            raise ValueError(f"block_indices: expected [B={B}, H_kv={k_cache.shape[2]}, K], "
                             f"got {tuple(block_indices.shape)}")
    if not deep:
        return
    cap = block_table.shape[1] * k_cache.shape[1]
    if bool(((seq_lens < 0) | (seq_lens > cap)).any()):
        raise ValueError(f"seq_lens: expected 0 <= len <= max_pages * page_size = {cap}")
    used = torch.arange(block_table.shape[1], device=q.device)[None, :] * k_cache.shape[1] < seq_lens[:, None]
    if bool((used & ((block_table < 0) | (block_table >= k_cache.shape[0]))).any()):
        raise ValueError(f"block_table: pages in use must lie in [0, {k_cache.shape[0]})")
    if block_indices is not None:
        idx = block_indices.long()
        nb = ((seq_lens.long() + block_size - 1) // block_size)[:, None, None]
        if bool(((idx < -1) | (idx >= nb)).any()):
            raise ValueError("block_indices: entries must be -1 (padding) or a block below ceil(seq_len / block_size)")
        if idx.shape[-1] > 1:
            valid = idx >= 0
            bad = (valid[..., 1:] & ~valid[..., :-1]) | (valid[..., 1:] & (idx[..., 1:] <= idx[..., :-1]))
            if bool(bad.any()):
                raise ValueError("block_indices: each list must be strictly increasing, -1 padding only at the end")


def _looks_fine(q, k_cache, v_cache, block_table, block_size, sink_blocks, block_indices) -> bool:
    """Cheap shape/dtype screen for the ``validate=False`` hot path; anything odd gets the full checks."""
    return (q.ndim == 3 and k_cache.ndim == 4 and k_cache.dtype == q.dtype == v_cache.dtype
            and k_cache.shape == v_cache.shape and k_cache.shape[3] == q.shape[2] and q.shape[2] in _HEAD_DIMS
            and q.shape[1] % k_cache.shape[2] == 0 and block_table.ndim == 2 and block_size in (64, 128)
            and (sink_blocks is None or block_indices is None) and k_cache.is_contiguous() and v_cache.is_contiguous())


def paged_decode_attention(q, k_cache, v_cache, block_table, seq_lens, *, sink_blocks=None, recent_blocks=None,
                           block_indices=None, block_size=128, scale=None, return_lse=False, validate=True,
                           num_splits=None, _any_block_size=False):
    """Attention of one new query token per sequence over a paged KV cache, reading selected blocks only.

    Args:
        q: [B, H, D], the query of the token at position seq_lens[b] - 1 (its K/V already in the cache).
        k_cache, v_cache: [num_pages, page_size, H_kv, D]; H_kv divides H (GQA: the group's query
            heads share every KV load). Same dtype as q (fp16/bf16/fp32), D in 16/32/64/128.
        block_table: int [B, max_pages]: physical page of each logical page of a sequence.
        seq_lens: int [B]: tokens in the cache per sequence (query included).
        sink_blocks, recent_blocks: streaming pattern (both or neither): key blocks j < sink_blocks
            and j >= last_block - recent_blocks + 1 are read.
        block_indices: int [B, H_kv, K] sorted key block indices per KV head, -1 padded (instead
            of the streaming pattern). Neither pattern: dense attention over the whole sequence.
        block_size: tokens per sparse block (64 or 128, default 128), independent of page_size.
        scale: default 1 / sqrt(D). num_splits: override the split-KV heuristic.
        validate: run every check, including those that need a device sync (ranges, sortedness);
            with False (decode loops) only a cheap shape/dtype screen runs.
    Returns:
        o [B, H, D] in q's dtype (and lse [B, H] natural log, float32, if return_lse). A sequence
        with no selected key (seq_len 0 or an empty list) gets o = 0, lse = -inf.

    Example:
        >>> o = paged_decode_attention(q, k_cache, v_cache, block_table, seq_lens, sink_blocks=1, recent_blocks=8)
    """
    if validate or not _looks_fine(q, k_cache, v_cache, block_table, block_size, sink_blocks, block_indices):
        _validate(q, k_cache, v_cache, block_table, seq_lens, sink_blocks, recent_blocks, block_indices, block_size,
                  scale, _any_block_size, validate)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if block_indices is not None:
        mode, sink, recent = MODE_INDEX, 0, 0
    elif sink_blocks is not None:
        mode, sink, recent = MODE_STREAM, sink_blocks, recent_blocks
    else:
        mode, sink, recent = MODE_DENSE, 0, 0
    if not kernel_device_ok(q, k_cache, v_cache):
        from catkit.ops.sparse_attention.naive import naive_paged_decode_attention

        o, lse = naive_paged_decode_attention(q, k_cache, v_cache, block_table, seq_lens, sink_blocks=sink_blocks,
                                              recent_blocks=recent_blocks, block_indices=block_indices,
                                              block_size=block_size, scale=scale, return_lse=True)
        o, lse = o.to(q.dtype), lse.float()
    else:
        args = (q, k_cache, v_cache, block_table, seq_lens, mode, sink, recent, block_indices, block_size, scale,
                num_splits)
        # The autograd wrapper only matters when a graph is being recorded; skipping it saves host time.
        needs_graph = torch.is_grad_enabled() and (q.requires_grad or k_cache.requires_grad or v_cache.requires_grad)
        o, lse = _PagedDecode.apply(*args) if needs_graph else paged_decode_fwd(*args)
    return (o, lse) if return_lse else o
