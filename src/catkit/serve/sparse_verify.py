"""Sparse verification: the target's verify pass with sparse attention, FFN and MoE (training free).

Speculative decoding verifies ``gamma + 1`` positions with one target forward; for long contexts
and MoE targets that pass dominates. :func:`sparse_verify_forward` recomputes the target's forward
layer by layer from the layers' own weights, sparsified per component (each can be switched off):

* Attention: the cached prefix (the ``P`` positions before the verified chunk) is split into
  blocks of ``block_size`` tokens per KV head; each block is scored by the query of the FIRST
  verified position (the last accepted token) against the block's mean key (averaged over the
  query heads of the KV group); the top blocks within a budget of ``L0 + rho * (P - L0)`` tokens
  are kept, always including the first (sink) and last blocks. All verified positions share this
  one selection; attention among the verified positions themselves stays dense (causal). Below
  ``P <= dense_below`` (``L0``) nothing is dropped. The selection is computed at anchor layers
  and reused by the following non-anchor layers.
* FFN (SwiGLU): hidden channels whose activation magnitude is below ``ffn_threshold`` for EVERY
  verified position are skipped (union over the positions, so one dense matmul serves them all).
  Anchors can be calibrated offline with :func:`calibrate_anchor_layers` (Jaccard overlap).
* MoE: per token, up to ``moe_max_skip`` of its top-k experts (lowest weight first, never the top
  one) are skipped when their routing-weight ratio to the top expert is below the calibrated
  threshold for that rank (:func:`calibrate_moe_thresholds`: median ratios on calibration data);
  the kept weights are renormalised and the skipped assignments are not computed.

Plain PyTorch: attention gathers the selected blocks' keys/values (``gather=True``) and runs SDPA
on them (``gather=False`` reads the whole cache under a mask: the reference); skipped FFN channels
are sliced out of the down projection; skipped (token, expert) assignments are left out of the
grouped expert matmuls. A Triton kernel reading the KV blocks in place is future work. With everything kept (``rho=1`` or a large
``dense_below``, ``ffn_threshold=0``, ``moe_max_skip=0``) it equals the dense verify pass.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from catkit.layers.mlp import SwiGLU
from catkit.layers.moe import MoE
from catkit.layers.rope import apply_rope, rope_cos_sin


@dataclass
class SparseVerifyConfig:
    """Knobs of the sparse verifier; every component can be disabled on its own.

    Attributes:
        attention: sparsify attention over the cached prefix.
        gather: read only the selected blocks (gathered); False = full cache under a mask (reference).
        cache_summaries: keep per-block key sums across calls (else recomputed from all keys).
        block_size: tokens per KV block (default 64).
        dense_below: L0; prefixes of at most this many tokens are read densely (default 4096).
        rho: fraction of the tokens beyond L0 kept (budget ``L0 + rho * (P - L0)`` tokens).
        anchor_layers: layers that compute a fresh selection; the others reuse the previous
            anchor's. ``None`` = every layer is an anchor. Layer 0 is always an anchor.
        ffn_threshold: tau; SwiGLU hidden channels with |activation| < tau at every verified
            position are skipped (``None`` or 0 = off).
        moe_max_skip: m; at most this many experts skipped per token (0 = off).
        moe_ratio_thresholds: per-rank thresholds for ranks 1..top_k-1 (weight of rank j over
            weight of rank 0); a float applies to every rank; a list of such lists gives one per
            layer (what :func:`calibrate_moe_thresholds` returns when every layer is MoE).
    """

    attention: bool = True
    gather: bool = True
    cache_summaries: bool = True
    block_size: int = 64
    dense_below: int = 4096
    rho: float = 0.1
    anchor_layers: tuple | None = None
    ffn_threshold: float | None = None
    moe_max_skip: int = 0
    moe_ratio_thresholds: tuple | float | None = None

    def check(self, model) -> None:
        """Raise ``ValueError`` naming the field if this config does not fit ``model``."""
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size: expected an int >= 1, got {self.block_size!r}")
        if not isinstance(self.dense_below, int) or self.dense_below < 0:
            raise ValueError(f"dense_below: expected an int >= 0, got {self.dense_below!r}")
        if not 0 <= self.rho <= 1:
            raise ValueError(f"rho: expected in [0, 1], got {self.rho}")
        n = len(model.blocks)
        if self.anchor_layers is not None and any(not 0 <= int(i) < n for i in self.anchor_layers):
            raise ValueError(f"anchor_layers: expected layer indices in [0, {n}), got {self.anchor_layers}")
        if self.ffn_threshold is not None and self.ffn_threshold < 0:
            raise ValueError(f"ffn_threshold: expected >= 0 or None, got {self.ffn_threshold}")
        if self.moe_max_skip < 0:
            raise ValueError(f"moe_max_skip: expected >= 0, got {self.moe_max_skip}")
        if self.moe_max_skip and self.moe_ratio_thresholds is None:
            raise ValueError("moe_ratio_thresholds: needed when moe_max_skip > 0 (see calibrate_moe_thresholds)")

    def is_anchor(self, layer: int) -> bool:
        return layer == 0 or self.anchor_layers is None or layer in self.anchor_layers


# KVCache -> [block_size, n_blocks_summed, key sums fp32 [B, max_blocks, Hk, D]]. Full blocks of a
# verify call's prefix are never rewritten afterwards (speculative rollback never goes below the
# prefix of a verify call), so their key sums are computed once; a shorter prefix than what was
# summed (a cache reused from scratch) resets the entry.
_SUMMARIES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _block_sums(k_prefix: torch.Tensor, bs: int, cache=None) -> torch.Tensor:
    """Per-block key sums ``[B, ceil(P / bs), Hk, D]`` (fp32), reusing ``cache``'s summed full blocks."""
    b, p, hk, d = k_prefix.shape
    nb, full = -(-p // bs), p // bs
    if cache is None:
        kp = F.pad(k_prefix.float(), (0, 0, 0, 0, 0, nb * bs - p)).view(b, nb, bs, hk, d)
        return kp.sum(2)
    entry = _SUMMARIES.get(cache)
    max_blocks = -(-cache.max_len // bs)
    if entry is None or entry[0] != bs or entry[1] * bs > p or entry[2].shape[0] != b:
        entry = [bs, 0, torch.zeros(b, max_blocks, hk, d, dtype=torch.float32, device=k_prefix.device)]
        _SUMMARIES[cache] = entry
    done = entry[1]
    if full > done:  # sum the newly completed blocks once
        entry[2][:, done:full] = k_prefix[:, done * bs : full * bs].float().view(b, full - done, bs, hk, d).sum(2)
        entry[1] = full
    sums = entry[2][:, :nb].clone()
    if nb > full:  # the partial last block changes every call: sum it fresh
        sums[:, full] = k_prefix[:, full * bs :].float().sum(1)
    return sums


def select_block_ids(q0: torch.Tensor, k_prefix: torch.Tensor, cfg: SparseVerifyConfig, cache=None):
    """Top prefix blocks per KV head: int64 ``[B, H_kv, n_keep]`` (sorted), or ``None`` = read all.

    q0: [B, H, D] query of the first verified position (RoPE applied); k_prefix: [B, P, H_kv, D].
    Block score = mean over the group's query heads of ``q0 . mean_key(block)``; the first and the
    last block always win. Budget: ``ceil((L0 + rho * (P - L0)) / block_size)`` blocks (>= 2).
    ``cache`` (the layer's ``KVCache``): keep per-block key sums across calls so a call reads
    only the new blocks' keys (scoring then costs O(P / block_size), not O(P)).
    """
    b, p, hk, d = k_prefix.shape
    bs = cfg.block_size
    if not cfg.attention or p <= cfg.dense_below:
        return None
    nb = -(-p // bs)
    keep_blocks = math.ceil((cfg.dense_below + cfg.rho * (p - cfg.dense_below)) / bs)
    keep_blocks = max(keep_blocks, min(2, nb))
    if keep_blocks >= nb:
        return None
    sums = _block_sums(k_prefix, bs, cache)  # [B, nb, Hk, D] fp32
    counts = torch.full((nb,), float(bs), device=k_prefix.device)
    counts[-1] = p - (nb - 1) * bs
    mean_k = sums / counts[None, :, None, None]
    g = q0.shape[1] // hk
    qg = q0.float().view(b, hk, g, d)
    score = torch.einsum("bhgd,bnhd->bhn", qg, mean_k) / g  # [B, Hk, nb]
    score[..., 0] = float("inf")  # the sink and the last (most recent) block are always kept
    score[..., -1] = float("inf")
    return score.topk(keep_blocks, dim=-1).indices.sort(-1).values


def _ids_to_mask(ids: torch.Tensor, p: int, bs: int) -> torch.Tensor:
    b, hk, _ = ids.shape
    nb = -(-p // bs)
    block_keep = torch.zeros(b, hk, nb, dtype=torch.bool, device=ids.device).scatter_(-1, ids, True)
    return block_keep.repeat_interleave(bs, dim=-1)[..., :p]


def select_prefix_blocks(q0: torch.Tensor, k_prefix: torch.Tensor, cfg: SparseVerifyConfig):
    """Which prefix keys the verified chunk reads: bool ``[B, H_kv, P]``, or ``None`` for all.

    The mask form of :func:`select_block_ids` (same arguments).
    """
    ids = select_block_ids(q0, k_prefix, cfg)
    return None if ids is None else _ids_to_mask(ids, k_prefix.shape[1], cfg.block_size)


def _attention(mixer, x, rope, cache, sel, cfg, is_anchor, stats):
    """One dense-attention layer on the verified chunk with the prefix selection; returns (out, sel).

    ``sel``: block ids from :func:`select_block_ids` (or ``None``). With ``cfg.gather`` only the
    selected blocks' keys/values are gathered (what a fast path reads); otherwise the full cache
    is read under a mask (the reference; both give the same result).
    """
    b, t, _ = x.shape
    hq, hk, d = mixer.n_heads, mixer.n_kv_heads, mixer.head_dim
    bs = cfg.block_size
    q, k, v = mixer.qkv(x).view(b, t, hq + 2 * hk, d).split([hq, hk, hk], dim=2)
    q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    past = cache.length
    k_all, v_all = cache.append(k, v)  # [B, past + t, Hk, D]
    if is_anchor:
        sel = select_block_ids(q[:, 0], k_all[:, :past], cfg, cache if cfg.cache_summaries else None)
    if "selections" in stats and is_anchor:  # calibration asks for every anchor's selection
        stats["selections"].append(None if sel is None else _ids_to_mask(sel, past, bs))
    # chunk part: causal among the verified positions; prefix part: the (shared) selection
    causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
    keys, values = k_all.transpose(1, 2), v_all.transpose(1, 2)  # [B, Hk, S, D]
    if sel is None:
        mask = torch.cat([torch.ones(t, past, dtype=torch.bool, device=x.device), causal], 1)[None, None]
        kept = past
    elif cfg.gather:
        pos = (sel[..., None] * bs + torch.arange(bs, device=x.device)).flatten(-2)  # [B, Hk, n_keep * bs]
        valid = pos < past  # the last block may be partial
        idx = pos.clamp_max(past - 1)[..., None].expand(-1, -1, -1, d)
        keys = torch.cat([keys.gather(2, idx), keys[:, :, past:]], 2)
        values = torch.cat([values.gather(2, idx), values[:, :, past:]], 2)
        mask = torch.cat([valid[:, :, None, :].expand(b, hk, t, pos.shape[-1]),
                          causal[None, None].expand(b, hk, t, t)], -1)
        mask = mask.repeat_interleave(hq // hk, dim=1)  # enable_gqa maps q head h to kv head h // group
        kept = float(valid.float().sum(-1).mean())
    else:
        prefix = _ids_to_mask(sel, past, bs)
        mask = torch.cat([prefix[:, :, None, :].expand(b, hk, t, past), causal[None, None].expand(b, hk, t, t)], -1)
        mask = mask.repeat_interleave(hq // hk, dim=1)
        kept = float(prefix.float().sum(-1).mean())
    stats["attn_prefix_tokens"] = stats.get("attn_prefix_tokens", 0) + past
    stats["attn_kept_tokens"] = stats.get("attn_kept_tokens", 0) + kept
    o = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask, enable_gqa=hq != hk)
    return mixer.out(o.transpose(1, 2).reshape(b, t, hq * d)), sel


def _swiglu(ffn: SwiGLU, x, cfg, stats):
    gate, up = ffn.gate_up(x).chunk(2, dim=-1)
    h = F.silu(gate) * up
    if not cfg.ffn_threshold:
        return ffn.down(h)
    keep = (h.abs() >= cfg.ffn_threshold).flatten(0, -2).any(0)  # union over every verified position
    stats["ffn_channels"] = stats.get("ffn_channels", 0) + keep.numel()
    stats["ffn_kept"] = stats.get("ffn_kept", 0) + int(keep.sum())
    return F.linear(h[..., keep], ffn.down.weight[:, keep])


def _thresholds(cfg, top_k, device, layer):
    th = cfg.moe_ratio_thresholds
    if isinstance(th, (list, tuple)) and th and isinstance(th[0], (list, tuple)):
        if layer >= len(th):
            raise ValueError(f"moe_ratio_thresholds: no entry for layer {layer} ({len(th)} per-layer lists)")
        th = th[layer]  # per-layer lists, as calibrate_moe_thresholds returns them
    if isinstance(th, (int, float)):
        th = [float(th)] * (top_k - 1)
    th = list(th)
    if len(th) != top_k - 1:
        raise ValueError(f"moe_ratio_thresholds: expected {top_k - 1} values (ranks 1..top_k-1), got {len(th)}")
    return torch.tensor([float("-inf")] + th, device=device)  # rank 0 is never skipped


def _experts_kept(moe: MoE, x, weights, experts, keep):
    """Grouped expert compute over the kept (token, expert) assignments only; x: [N, d], keep: [N, k].

    Same grouping as ``MoE.expert_forward`` (sort by expert, padded ``[E, capacity, d]`` buffer,
    two batched matmuls), but skipped assignments take no slot, so they cost no compute.
    """
    n, d = x.shape
    tok, rank = keep.nonzero(as_tuple=True)
    flat_expert = experts[tok, rank]
    order = flat_expert.argsort(stable=True)
    sorted_expert, tok, w = flat_expert[order], tok[order], weights[tok, rank][order]
    counts = torch.bincount(flat_expert, minlength=moe.n_experts)
    slot = torch.arange(order.numel(), device=x.device) - (counts.cumsum(0) - counts)[sorted_expert]
    buf = x.new_zeros(moe.n_experts, int(counts.max()), d)
    buf[sorted_expert, slot] = x[tok]
    gate, up = torch.bmm(buf, moe.w_gate_up.to(x.dtype)).chunk(2, dim=-1)
    out = torch.bmm(F.silu(gate) * up, moe.w_down.to(x.dtype))
    return torch.zeros_like(x).index_add_(0, tok, out[sorted_expert, slot] * w[:, None].to(x.dtype))


def _moe(moe: MoE, x, cfg, stats, layer):
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    weights, experts, _ = moe.route(x2)  # weights sorted descending (topk order)
    if cfg.moe_max_skip and moe.top_k > 1:
        ratio = weights / weights[:, :1]
        below = ratio < _thresholds(cfg, moe.top_k, x.device, layer)
        # skip at most m, lowest ranks first: rank j is skippable if below and among the last m ranks
        rank = torch.arange(moe.top_k, device=x.device)
        skip = below & (rank >= moe.top_k - cfg.moe_max_skip)
        # only a contiguous tail of ranks may go (a higher-weight expert is never dropped before a lower one)
        skip = skip.flip(-1).long().cumprod(-1).flip(-1).bool()
        weights = weights.masked_fill(skip, 0)
        weights = weights / weights.sum(-1, keepdim=True)
        stats["moe_assignments"] = stats.get("moe_assignments", 0) + skip.numel()
        stats["moe_skipped"] = stats.get("moe_skipped", 0) + int(skip.sum())
        y = _experts_kept(moe, x2, weights, experts, ~skip)
    else:
        y = moe.expert_forward(x2, weights, experts)
    if moe.shared is not None:
        y = y + moe.shared(x2)
    return y.view(shape)


@torch.no_grad()
def sparse_verify_forward(model, input_ids: torch.Tensor, caches: list, cfg: SparseVerifyConfig,
                          stats: dict | None = None) -> torch.Tensor:
    """The target's forward over the verified chunk ``input_ids`` [B, T] with sparse components.

    Continues the cached prefix in ``caches`` (contiguous ``KVCache`` per layer; appended to like
    the model's own forward). Returns logits [B, T, vocab]. ``stats`` (a dict) accumulates
    ``attn_prefix_tokens`` / ``attn_kept_tokens`` (summed over layers and calls), ``ffn_channels``
    / ``ffn_kept`` and ``moe_assignments`` / ``moe_skipped``.
    """
    stats = stats if stats is not None else {}
    b, t = input_ids.shape
    x = model.embed(input_ids)
    start = caches[0].length
    positions = torch.arange(start, start + t, device=input_ids.device).expand(b, t)
    rope = rope_cos_sin(positions, model.cfg.dim_head, model.cfg.rope_theta, dtype=x.dtype)
    sel = None
    for i, block in enumerate(model.blocks):
        a, sel = _attention(block.mixer, block.mixer_norm(x), rope, caches[i], sel, cfg, cfg.is_anchor(i), stats)
        x = x + a
        h = block.ffn_norm(x)
        x = x + (_moe(block.ffn, h, cfg, stats, i) if isinstance(block.ffn, MoE) else _swiglu(block.ffn, h, cfg, stats))
    x = model.norm(x)
    weight = model.embed.weight if model.lm_head is None else model.lm_head.weight
    return F.linear(x, weight)


@torch.no_grad()
def calibrate_moe_thresholds(model, input_ids: torch.Tensor) -> list[list[float]]:
    """Median routing-weight ratio (rank j over rank 0, j = 1..top_k-1) per MoE layer on calibration ids.

    Returns one list per MoE layer (in layer order); pass a layer's list (or their element-wise
    mean, as one config serves all layers) as ``SparseVerifyConfig.moe_ratio_thresholds``.
    """
    ratios: list[list[float]] = []
    hooks = []

    def hook(mod, inp, out):
        moe = hook.owner[mod]
        probs = torch.softmax(out.float(), -1)
        top = probs.topk(moe.top_k, -1).values
        ratios.append((top[:, 1:] / top[:, :1]).median(0).values.tolist())

    hook.owner = {}
    for block in model.blocks:
        if isinstance(block.ffn, MoE):
            hook.owner[block.ffn.router] = block.ffn
            hooks.append(block.ffn.router.register_forward_hook(hook))
    try:
        model(input_ids)
    finally:
        for h in hooks:
            h.remove()
    return ratios


@torch.no_grad()
def calibrate_anchor_layers(model, input_ids: torch.Tensor, cfg: SparseVerifyConfig, *, n_verify: int = 5,
                            min_jaccard: float = 0.5) -> tuple[int, ...]:
    """Choose anchor layers offline: a layer becomes an anchor where selections stop overlapping.

    ``input_ids`` [B, T]: the first ``T - n_verify`` tokens are prefilled, the last ``n_verify``
    are verified with a selection computed at EVERY layer. Walking up the layers, layer ``i``
    becomes an anchor when the Jaccard overlap (kept positions, over rows and KV heads) between its
    own selection and the one it would reuse (the latest anchor's) is below ``min_jaccard``.
    Returns sorted layer indices starting with 0 (just ``(0,)`` when the prefix is read densely).
    """
    if not 0 < n_verify < input_ids.shape[1]:
        raise ValueError(f"n_verify: expected in [1, {input_ids.shape[1]}), got {n_verify}")
    b, t = input_ids.shape
    caches = model.new_caches(b, t)
    model(input_ids[:, :-n_verify], caches=caches)
    stats = {"selections": []}
    sparse_verify_forward(model, input_ids[:, -n_verify:], caches, replace(cfg, anchor_layers=None), stats=stats)
    sels = stats["selections"]
    if any(sel is None for sel in sels):
        return (0,)
    anchors, ref = [0], sels[0]
    for i in range(1, len(sels)):
        inter = (sels[i] & ref).sum().item()
        union = (sels[i] | ref).sum().item()
        if union and inter / union < min_jaccard:
            anchors.append(i)
            ref = sels[i]
    return tuple(anchors)
