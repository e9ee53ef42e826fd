"""Ground truth for block-sparse attention: dense attention under an explicit block mask.

Plain PyTorch in float32 (float64 if the inputs are float64), differentiable, same argument names
and ``[B, T, H, D]`` layout as the Triton kernels in ``prefill.py`` and ``decode.py``.

Block semantics shared by every implementation: tokens are grouped in blocks of ``block_size``
counted from the start of each sequence (with ``cu_seqlens``, from each packed sequence's start).
A query at position ``p`` (block ``p // block_size``) may read key position ``s`` iff the block
pair is allowed by the mask AND ``s <= p`` (causal).

Streaming pattern (LoZA): query block ``i`` reads key block ``j`` iff ``j < sink_blocks`` or
``i - recent_blocks + 1 <= j <= i``.

A query row with no allowed key (e.g. an empty index list) gets output 0 and logsumexp ``-inf``;
it never produces NaN and its gradients are 0.
"""

from __future__ import annotations

import math

import torch


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _seq_bounds(batch: int, seqlen: int, cu_seqlens: torch.Tensor | None) -> list[tuple[int, int, int]]:
    """(batch row, start, end) of every sequence; packed sequences live in batch row 0."""
    if cu_seqlens is None:
        return [(b, 0, seqlen) for b in range(batch)]
    cu = [int(c) for c in cu_seqlens.tolist()]
    return [(0, cu[i], cu[i + 1]) for i in range(len(cu) - 1)]


def streaming_block_mask(num_q_blocks: int, num_k_blocks: int, sink_blocks: int, recent_blocks: int,
                         device=None) -> torch.Tensor:
    """Boolean ``[num_q_blocks, num_k_blocks]``: query block i reads key block j (before the causal rule)."""
    i = torch.arange(num_q_blocks, device=device)[:, None]
    j = torch.arange(num_k_blocks, device=device)[None, :]
    return ((j < sink_blocks) | ((j >= i - recent_blocks + 1) & (j <= i))) & (j <= i)


def indices_block_mask(block_indices: torch.Tensor, num_k_blocks: int) -> torch.Tensor:
    """Boolean ``[N, H_kv, NQ, num_k_blocks]`` from index lists ``[N, H_kv, NQ, K]`` padded with -1."""
    idx = block_indices.long()
    valid = idx >= 0
    mask = torch.zeros(*idx.shape[:-1], num_k_blocks + 1, dtype=torch.bool, device=idx.device)
    mask.scatter_(-1, torch.where(valid, idx, num_k_blocks), True)  # padding lands in a spare column
    return mask[..., :num_k_blocks]


def naive_block_mask_attention(q, k, v, block_mask, *, block_size, cu_seqlens=None, scale=None):
    """Dense attention where only allowed (query block, key block) pairs and causal positions count.

    q: [B, T, H, D]; k, v: [B, T, H_kv, D] with H_kv dividing H (query head h uses KV head
    h // (H // H_kv)). block_mask: bool, either [NQ, NK] (shared) or [N, H_kv, NQ, NK] with N the
    number of sequences (B, or len(cu_seqlens) - 1 when packed with B = 1); blocks are counted from
    each sequence's start. Returns (o [B, T, H, D] float32/float64, lse [B, T, H] natural log;
    rows with no allowed key get o = 0 and lse = -inf).
    """
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    G = H // Hkv
    dt = _compute_dtype(q)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    qf, kf, vf = q.to(dt), k.to(dt), v.to(dt)
    o = torch.zeros(B, T, H, D, dtype=dt, device=q.device)
    lse = torch.full((B, T, H), float("-inf"), dtype=dt, device=q.device)
    outs, lses = [], []
    for n, (b, s, e) in enumerate(_seq_bounds(B, T, cu_seqlens)):
        L = e - s
        if L == 0:
            continue
        pos = torch.arange(L, device=q.device)
        blk = pos // block_size
        bm = block_mask if block_mask.ndim == 2 else block_mask[n]  # [NQ, NK] or [H_kv, NQ, NK]
        allowed_blocks = bm[..., blk[:, None], blk[None, :]]  # [L, L] or [H_kv, L, L]
        allowed = allowed_blocks & (pos[None, :] <= pos[:, None])
        if allowed.ndim == 3:
            allowed = allowed.repeat_interleave(G, dim=0)  # [H, L, L]
        qs = qf[b, s:e].transpose(0, 1)  # [H, L, D]
        ks = kf[b, s:e].transpose(0, 1).repeat_interleave(G, dim=0)
        vs = vf[b, s:e].transpose(0, 1).repeat_interleave(G, dim=0)
        scores = (qs @ ks.transpose(1, 2)) * scale
        scores = scores.masked_fill(~allowed, float("-inf"))
        # Softmax written out so a fully masked row gives 0 (not NaN) in value and gradient.
        m = scores.amax(-1, keepdim=True).detach()
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        ex = torch.exp(scores - m)
        den = ex.sum(-1, keepdim=True)
        p = ex / torch.where(den > 0, den, torch.ones_like(den))
        outs.append((b, s, e, (p @ vs).transpose(0, 1)))
        lses.append((b, s, e, (m + torch.log(den)).squeeze(-1).transpose(0, 1).detach()))
    # Assemble without in-place writes into a leaf so autograd sees one clean graph.
    if outs:
        o = o.clone()
        for b, s, e, val in outs:
            o[b, s:e] = val
        for b, s, e, val in lses:
            lse[b, s:e] = val
    return o, lse


def _num_blocks(B, T, cu_seqlens, block_size):
    lens = [e - s for _, s, e in _seq_bounds(B, T, cu_seqlens)]
    return max([(L + block_size - 1) // block_size for L in lens] + [0])


def naive_streaming_attention(q, k, v, *, sink_blocks, recent_blocks, block_size=128, cu_seqlens=None, scale=None,
                              return_lse=False):
    """Reference for ``prefill.streaming_attention`` (same arguments)."""
    nb = _num_blocks(q.shape[0], q.shape[1], cu_seqlens, block_size)
    mask = streaming_block_mask(nb, nb, sink_blocks, recent_blocks, device=q.device)
    o, lse = naive_block_mask_attention(q, k, v, mask, block_size=block_size, cu_seqlens=cu_seqlens, scale=scale)
    return (o, lse) if return_lse else o


def naive_block_sparse_attention(q, k, v, block_indices, *, block_size, cu_seqlens=None, scale=None,
                                 return_lse=False):
    """Reference for ``prefill.block_sparse_attention``: block_indices [N, H_kv, NQ, K], -1 padded."""
    nb = max(_num_blocks(q.shape[0], q.shape[1], cu_seqlens, block_size), block_indices.shape[2])
    mask = indices_block_mask(block_indices, nb)
    o, lse = naive_block_mask_attention(q, k, v, mask, block_size=block_size, cu_seqlens=cu_seqlens, scale=scale)
    return (o, lse) if return_lse else o


def naive_paged_decode_attention(q, k_cache, v_cache, block_table, seq_lens, *, sink_blocks=None, recent_blocks=None,
                                 block_indices=None, block_size=128, scale=None, return_lse=False):
    """Reference for ``decode.paged_decode_attention``: gathers each sequence's KV from its pages.

    q: [B, H, D] is the query at position seq_lens[b] - 1; k_cache/v_cache: [num_pages, page_size,
    H_kv, D]; block_table: [B, max_pages]; block_indices: [B, H_kv, K] (-1 padded) or None.
    """
    B, H, D = q.shape
    page = k_cache.shape[1]
    dt = _compute_dtype(q)
    o = torch.zeros(B, H, D, dtype=dt, device=q.device)
    lse = torch.full((B, H), float("-inf"), dtype=dt, device=q.device)
    for b in range(B):
        L = int(seq_lens[b])
        if L == 0:
            continue
        pos = torch.arange(L, device=q.device)
        pages = block_table[b, pos // page].long()
        kk = k_cache[pages, pos % page][None]  # [1, L, H_kv, D]
        vv = v_cache[pages, pos % page][None]
        qq = torch.zeros(1, L, H, D, dtype=q.dtype, device=q.device)
        qq[0, L - 1] = q[b]
        nb = (L + block_size - 1) // block_size
        if block_indices is not None:
            mask = indices_block_mask(block_indices[b:b + 1, :, None, :], nb)  # [1, H_kv, 1, nb]
            mask = mask.expand(1, -1, nb, -1)  # only the last query row is used
        elif sink_blocks is not None:
            mask = streaming_block_mask(nb, nb, sink_blocks, recent_blocks, device=q.device)
        else:
            mask = torch.ones(nb, nb, dtype=torch.bool, device=q.device)
        ob, lb = naive_block_mask_attention(qq, kk, vv, mask, block_size=block_size, scale=scale)
        o[b] = ob[0, L - 1]
        lse[b] = lb[0, L - 1]
    return (o, lse) if return_lse else o
