"""Block-sparse causal attention for prefill and training: public functions and autograd.

Layout ``[B, T, H, D]`` (packed varlen: B = 1 plus ``cu_seqlens``), GQA (H_kv divides H), causal.
Which key blocks a query block reads is given either by the streaming pattern (``sink_blocks``,
``recent_blocks``: loop bounds computed from the block number, no mask tensor) or by explicit
per-(sequence, KV head, query block) lists of key block indices. ``naive.py`` defines the exact
semantics; the kernels live in ``prefill_fwd.py`` (forward, host plan) and ``prefill_bwd.py``.
"""

from __future__ import annotations

import math

import torch

from catkit.ops.sparse_attention.prefill_bwd import block_sparse_attention_bwd
from catkit.ops.sparse_attention.prefill_fwd import LN2, Plan, block_sparse_attention_fwd
from catkit.utils.device import check_tensor
from catkit.utils.triton_utils import kernel_device_ok

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
        lse_nat = (lse * LN2).view(q.shape[0], q.shape[1], q.shape[2])
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
    if q.numel() >= 2**31:
        raise ValueError(f"q: {q.numel()} elements exceed the kernels' int32 offsets (< 2**31); split the batch")
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
        plan = Plan(q.shape[0], q.shape[1], cu_seqlens, q.device, block_size, sink, recent, block_indices)
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
