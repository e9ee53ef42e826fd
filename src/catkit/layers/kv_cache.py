"""A contiguous per-layer KV cache for incremental decoding in ``CatModel.generate``.

All rows of the batch share one length (prompts of equal length); the serving engine's paged
cache handles ragged batches.
"""

from __future__ import annotations

import torch


class KVCache:
    """Preallocated ``[B, max_len, H_kv, D]`` key and value buffers plus the filled length."""

    def __init__(self, batch_size: int, max_len: int, n_kv_heads: int, head_dim: int, device, dtype):
        shape = (batch_size, max_len, n_kv_heads, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[1]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k, v`` ([B, T, H_kv, D]) after the filled part; return all keys and values so far."""
        t = k.shape[1]
        if self.length + t > self.max_len:
            raise ValueError(f"cache: {self.length} + {t} tokens exceed the cache's max_len={self.max_len}")
        self.k[:, self.length : self.length + t] = k
        self.v[:, self.length : self.length + t] = v
        self.length += t
        return self.k[:, : self.length], self.v[:, : self.length]
