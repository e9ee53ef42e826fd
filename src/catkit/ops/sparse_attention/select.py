"""Query-aware block selection for sparse decode (AsyncTLS-style two-level selection).

Level 1 (coarse): every KV block of ``block_size`` tokens keeps a summary of its keys (mean, and
channel-wise min / max). A decode query scores each block, per KV head, either by ``q . mean``
("mean") or by the Quest upper bound ``sum_c max(q_c * min_c, q_c * max_c)`` ("quest"), which is
never below the best exact ``q . k`` inside the block. With GQA the scores of the query heads in a
group are combined (max by default: a block matters if any head of the group wants it). The top
blocks are kept, always together with the sink and most recent blocks; the result is the
``block_indices`` that ``paged_decode_attention`` and ``block_sparse_attention`` take.

Level 2 (fine): inside the kept blocks, tokens are scored exactly and the top ``token_budget``
kept (plus sink and local tokens), giving sorted token positions per (sequence, KV head).

Everything here is vectorised PyTorch (scores are small next to the attention itself: one vector
per block); top-k is ``torch.topk``. Layouts follow the rest of the op: keys ``[B, T, H_kv, D]``
or a paged cache ``[num_pages, page_size, H_kv, D]`` with ``block_table`` / ``seq_lens``.
"""

from __future__ import annotations

import math

import torch

from catkit.utils.device import check_tensor

_SCORERS = ("quest", "mean")
_REDUCES = ("max", "mean")


def _gather_paged(k_cache, block_table, seq_lens, length):
    """Keys [B, length, H_kv, D] of each sequence from the paged cache (rows past seq_len are junk)."""
    page = k_cache.shape[1]
    pos = torch.arange(length, device=k_cache.device)
    pages = block_table[:, (pos // page).clamp_max(block_table.shape[1] - 1)].long()  # [B, length]
    return k_cache[pages, (pos % page)[None, :].expand_as(pages)]


def block_summaries(k, *, block_size, seq_lens=None):
    """Per-block key summaries (float32): mean, min, max, each ``[B, NB, H_kv, D]``.

    k: [B, T, H_kv, D]; seq_lens: optional int [B] (default T for all). Tokens at or past a
    sequence's length are ignored; a block with no valid token gets zeros.

    Example:
        >>> kmean, kmin, kmax = block_summaries(k, block_size=64)  # k: [1, 4096, 8, 128]
    """
    check_tensor("k", k, ndim=4)
    if not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size: expected a positive int, got {block_size!r}")
    B, T, Hkv, D = k.shape
    nb = (T + block_size - 1) // block_size
    pad = nb * block_size - T
    kf = torch.nn.functional.pad(k.float(), (0, 0, 0, 0, 0, pad)).view(B, nb, block_size, Hkv, D)
    lens = torch.full((B,), T, device=k.device) if seq_lens is None else seq_lens.to(k.device).long()
    pos = torch.arange(nb * block_size, device=k.device).view(1, nb, block_size, 1, 1)
    valid = pos < lens.view(B, 1, 1, 1, 1)
    cnt = valid.sum(2).clamp_min(1)
    kmean = (kf * valid).sum(2) / cnt
    kmin = kf.masked_fill(~valid, float("inf")).amin(2)
    kmax = kf.masked_fill(~valid, float("-inf")).amax(2)
    empty = ~valid.any(2).expand_as(kmin)
    return kmean, kmin.masked_fill(empty, 0.0), kmax.masked_fill(empty, 0.0)


def paged_block_summaries(k_cache, block_table, seq_lens, *, block_size):
    """``block_summaries`` of the keys held in a paged cache (same shapes; NB from max_pages)."""
    check_tensor("k_cache", k_cache, ndim=4)
    check_tensor("block_table", block_table, ndim=2, dtypes=(torch.int32, torch.int64), device=k_cache.device)
    check_tensor("seq_lens", seq_lens, ndim=1, dtypes=(torch.int32, torch.int64), device=k_cache.device)
    length = block_table.shape[1] * k_cache.shape[1]
    return block_summaries(_gather_paged(k_cache, block_table, seq_lens, length), block_size=block_size,
                           seq_lens=seq_lens)


def block_scores(q, kmean=None, kmin=None, kmax=None, *, scorer="quest", group_reduce="max", scale=None):
    """Score every block for every KV head: float32 ``[B, H_kv, NB]``.

    q: [B, H, D] decode queries; kmean / kmin / kmax: [B, NB, H_kv, D] from ``block_summaries``
    ("mean" needs kmean, "quest" needs kmin and kmax). H_kv divides H; the G = H / H_kv query
    heads of a group are combined by ``group_reduce`` ("max" or "mean"). Scores are scaled like
    attention logits (default 1 / sqrt(D)).
    """
    check_tensor("q", q, ndim=3)
    if scorer not in _SCORERS:
        raise ValueError(f"scorer: expected one of {_SCORERS}, got {scorer!r}")
    if group_reduce not in _REDUCES:
        raise ValueError(f"group_reduce: expected one of {_REDUCES}, got {group_reduce!r}")
    need = ("kmean", kmean) if scorer == "mean" else ("kmin", kmin)
    ref = need[1]
    if ref is None or (scorer == "quest" and kmax is None):
        raise ValueError(f"{need[0]}: scorer {scorer!r} needs {'kmean' if scorer == 'mean' else 'kmin and kmax'}")
    check_tensor(need[0], ref, ndim=4, device=q.device)
    B, H, D = q.shape
    if ref.shape[0] != B or ref.shape[3] != D or H % ref.shape[2]:
        raise ValueError(f"{need[0]}: expected [B={B}, NB, H_kv dividing {H}, D={D}], got {tuple(ref.shape)}")
    Hkv = ref.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    qg = q.float().view(B, Hkv, H // Hkv, D)
    if scorer == "mean":
        s = torch.einsum("bhgd,bnhd->bhgn", qg, kmean.float())
    else:  # max(q*min, q*max) per channel = q+ * max + q- * min
        s = (torch.einsum("bhgd,bnhd->bhgn", qg.clamp_min(0), kmax.float())
             + torch.einsum("bhgd,bnhd->bhgn", qg.clamp_max(0), kmin.float()))
    s = s * scale
    return s.amax(2) if group_reduce == "max" else s.mean(2)


def _sorted_padded(values, idx, k):
    """Keep entries with finite (or +inf) value; sort indices ascending, pad with -1 at the end."""
    big = torch.iinfo(torch.int32).max
    keep = values > float("-inf")
    out = torch.where(keep, idx, torch.full_like(idx, big)).sort(-1).values
    return torch.where(out == big, torch.full_like(out, -1), out).int()[..., :k]


def select_blocks(scores, seq_lens, *, block_size, top_blocks, sink_blocks=1, recent_blocks=1):
    """Coarse level: sorted key-block indices per (sequence, KV head), ``int32 [B, H_kv, K]``.

    scores: [B, H_kv, NB] from ``block_scores``; seq_lens: int [B] (the query is the token at
    seq_len - 1). Keeps blocks j < sink_blocks and the recent_blocks last blocks of each sequence,
    plus the ``top_blocks`` best-scoring others. K = top_blocks + sink_blocks + recent_blocks
    (capped at NB); unused slots are -1. Blocks at or past a sequence's end are never chosen.
    """
    check_tensor("scores", scores, ndim=3)
    check_tensor("seq_lens", seq_lens, ndim=1, dtypes=(torch.int32, torch.int64), device=scores.device)
    for name, val in (("top_blocks", top_blocks), ("sink_blocks", sink_blocks), ("recent_blocks", recent_blocks),
                      ("block_size", block_size)):
        if not isinstance(val, int) or isinstance(val, bool) or val < (1 if name == "block_size" else 0):
            raise ValueError(f"{name}: expected an int >= {1 if name == 'block_size' else 0}, got {val!r}")
    if seq_lens.shape[0] != scores.shape[0]:
        raise ValueError(f"seq_lens: expected {scores.shape[0]} entries, got {seq_lens.shape[0]}")
    nb = scores.shape[-1]
    j = torch.arange(nb, device=scores.device)[None, None, :]
    n_blk = ((seq_lens.long() + block_size - 1) // block_size)[:, None, None]
    valid = j < n_blk
    forced = valid & ((j < sink_blocks) | (j >= n_blk - recent_blocks))
    s = scores.float().masked_fill(~valid, float("-inf")).masked_fill(forced, float("inf"))
    k = min(top_blocks + sink_blocks + recent_blocks, nb)
    vals, idx = s.topk(k, dim=-1)
    return _sorted_padded(vals, idx, k)


def select_tokens(q, k_cache, block_table, seq_lens, block_indices, *, block_size, token_budget, sink_tokens=0,
                  local_tokens=0, group_reduce="max", scale=None):
    """Fine level: the best ``token_budget`` token positions inside the kept blocks, ``int32 [B, H_kv, budget]``.

    Scores are exact (q . k, combined over the GQA group by ``group_reduce``). Tokens p <
    sink_tokens and p >= seq_len - local_tokens are always kept when inside a kept block (they
    count toward the budget). Positions are sorted ascending; unused slots are -1.
    """
    check_tensor("q", q, ndim=3)
    check_tensor("k_cache", k_cache, ndim=4, device=q.device)
    check_tensor("block_indices", block_indices, ndim=3, dtypes=(torch.int32, torch.int64), device=q.device)
    if not isinstance(token_budget, int) or token_budget < 1:
        raise ValueError(f"token_budget: expected an int >= 1, got {token_budget!r}")
    if group_reduce not in _REDUCES:
        raise ValueError(f"group_reduce: expected one of {_REDUCES}, got {group_reduce!r}")
    B, H, D = q.shape
    Hkv = k_cache.shape[2]
    if H % Hkv or k_cache.shape[3] != D:
        raise ValueError(f"k_cache: expected H_kv dividing {H} and head dim {D}, got {tuple(k_cache.shape)}")
    if tuple(block_indices.shape[:2]) != (B, Hkv):
        raise ValueError(f"block_indices: expected [B={B}, H_kv={Hkv}, K], got {tuple(block_indices.shape)}")
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    page = k_cache.shape[1]
    blk = block_indices.long()
    pos = blk[..., None] * block_size + torch.arange(block_size, device=q.device)  # [B, Hkv, K, bs]
    L = seq_lens.to(q.device).long().view(B, 1, 1, 1)
    ok = (blk[..., None] >= 0) & (pos < L)
    pos = torch.where(ok, pos, torch.zeros_like(pos)).flatten(2)  # [B, Hkv, K*bs]
    ok = ok.flatten(2)
    pages = torch.gather(block_table.long()[:, None, :].expand(B, Hkv, -1), 2,
                         (pos // page).clamp_max(block_table.shape[1] - 1))
    heads = torch.arange(Hkv, device=q.device).view(1, Hkv, 1).expand_as(pos)
    keys = k_cache[pages, pos % page, heads].float()  # [B, Hkv, N, D]
    s = torch.einsum("bhgd,bhnd->bhgn", q.float().view(B, Hkv, H // Hkv, D), keys) * scale
    s = s.amax(2) if group_reduce == "max" else s.mean(2)
    forced = ok & ((pos < sink_tokens) | (pos >= L.view(B, 1, 1) - local_tokens))
    s = s.masked_fill(~ok, float("-inf")).masked_fill(forced, float("inf"))
    k = min(token_budget, s.shape[-1])
    vals, arg = s.topk(k, dim=-1)
    return _sorted_padded(vals, torch.gather(pos, 2, arg), k)
