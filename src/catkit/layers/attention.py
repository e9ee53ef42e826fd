"""Grouped-query softmax attention with RoPE, through ``scaled_dot_product_attention``.

This is mixer letter ``A``. Sparse modes (streaming, two-level) join this file as the sparse
attention kernels land.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from catkit.layers.kv_cache import KVCache
from catkit.layers.rope import apply_rope


def varlen_causal_mask(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Boolean [total, total] mask: causal within each packed sequence, nothing across them."""
    seq_id = torch.searchsorted(cu_seqlens[1:].long(), torch.arange(total, device=cu_seqlens.device), right=True)
    idx = torch.arange(total, device=cu_seqlens.device)
    return (seq_id[:, None] == seq_id[None, :]) & (idx[:, None] >= idx[None, :])


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.qkv = nn.Linear(d_model, (n_heads + 2 * n_kv_heads) * head_dim, bias=False)
        self.out = nn.Linear(n_heads * head_dim, d_model, bias=False)

    @classmethod
    def from_config(cls, cfg) -> "Attention":
        return cls(cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.dim_head)

    def new_cache(self, batch_size: int, max_len: int, device, dtype) -> KVCache:
        return KVCache(batch_size, max_len, self.n_kv_heads, self.head_dim, device, dtype)

    def forward(self, x, *, rope, cache: KVCache | None = None, cu_seqlens: torch.Tensor | None = None):
        """x: [B, T, d_model]; rope: (cos, sin) each [B, T, head_dim]; returns [B, T, d_model]."""
        b, t, _ = x.shape
        hq, hk, d = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.qkv(x).view(b, t, hq + 2 * hk, d).split([hq, hk, hk], dim=2)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.append(k, v)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # [B, H, T, D]
        mask, causal = None, False
        if cu_seqlens is not None:
            if cache is not None:
                raise ValueError("cu_seqlens: variable-length batches are for training/prefill, not with a cache")
            mask = varlen_causal_mask(cu_seqlens, t)
        elif past == 0:
            causal = t > 1
        elif t > 1:  # chunked prefill after a cached prefix: causal with an offset
            qpos = torch.arange(past, past + t, device=x.device)
            mask = qpos[:, None] >= torch.arange(past + t, device=x.device)[None, :]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=hq != hk)
        return self.out(o.transpose(1, 2).reshape(b, t, hq * d))
