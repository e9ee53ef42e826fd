"""Per-layer KV caches for incremental decoding in ``CatModel.generate``.

``KVCache``: contiguous, every token (dense attention). ``StreamingKVCache``: sink + ring-buffer
window for streaming (LoZA SSA) layers, constant size however long the sequence.

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

    @property
    def nbytes(self) -> int:
        """Bytes held by the key and value buffers (what the cache costs, filled or not)."""
        return self.k.nbytes + self.v.nbytes


class StreamingKVCache:
    """KV of a streaming (LoZA SSA) layer: sink blocks kept, recent blocks in a ring buffer.

    A query in block ``qb`` reads key blocks ``j < sink_blocks`` and ``qb - recent_blocks + 1 <=
    j <= qb``, so nothing older than ``recent_blocks`` blocks (plus the sinks) is ever read again
    and the cache holds at most ``(sink_blocks + recent_blocks) * block_size`` tokens however long
    the sequence grows. Storage is block-paged: logical block ``j`` lives in physical block
    ``j`` if ``j < sink_blocks`` else ``sink_blocks + (j - sink_blocks) % recent_blocks``, so the
    buffers viewed as ``[B * n_blocks, block_size, H_kv, D]`` pages with :meth:`block_table` are
    exactly what ``paged_decode_attention`` reads. ``slot_pos`` remembers which token position each
    slot holds (-1: empty) for the masked fallback path. All rows share one length, as in
    :class:`KVCache`; ``length`` counts every token seen (it gives the RoPE position of the next).
    """

    def __init__(self, batch_size: int, max_len: int, n_kv_heads: int, head_dim: int, device, dtype, *,
                 sink_blocks: int, recent_blocks: int, block_size: int):
        if recent_blocks < 1:
            raise ValueError(f"recent_blocks: a streaming cache needs >= 1 recent block, got {recent_blocks}")
        self.sink_blocks, self.recent_blocks, self.block_size = sink_blocks, recent_blocks, block_size
        # A sequence shorter than sink + window never wraps: allocate only what max_len can fill.
        self.n_blocks = min(sink_blocks + recent_blocks, -(-max_len // block_size))
        shape = (batch_size, self.n_blocks * block_size, n_kv_heads, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.slot_pos = torch.full((shape[1],), -1, device=device, dtype=torch.int64)
        self.max_len = max_len
        self.length = 0

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @property
    def capacity(self) -> int:
        """Token slots held (sink + window), the same at every length."""
        return self.k.shape[1]

    def physical_block(self, logical_block: torch.Tensor) -> torch.Tensor:
        s, r = self.sink_blocks, self.recent_blocks
        return torch.where(logical_block < s, logical_block, s + (logical_block - s).clamp_min(0) % r)

    def slots(self, positions: torch.Tensor) -> torch.Tensor:
        """Slot index (in ``[0, capacity)``) where the token at each position is stored."""
        bs = self.block_size
        return self.physical_block(positions // bs) * bs + positions % bs

    def block_table(self, num_logical_blocks: int) -> torch.Tensor:
        """int32 ``[B, num_logical_blocks]``: page of each logical block in the paged view."""
        j = torch.arange(num_logical_blocks, device=self.k.device)
        rows = torch.arange(self.k.shape[0], device=self.k.device)[:, None] * self.n_blocks
        return (rows + self.physical_block(j)[None, :]).to(torch.int32)

    def pages(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Key and value buffers as ``[B * n_blocks, block_size, H_kv, D]`` pages (views, no copy)."""
        b, _, h, d = self.k.shape
        return (self.k.view(b * self.n_blocks, self.block_size, h, d),
                self.v.view(b * self.n_blocks, self.block_size, h, d))

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k, v`` ([B, T, H_kv, D]) for positions ``length .. length + T - 1``.

        Only the tokens a later query can still read are written: every sink token and the last
        ``recent_blocks * block_size`` of the others (a query never reads a key more than that far
        back outside the sinks), so distinct positions never collide on a slot.
        """
        t = k.shape[1]
        if self.length + t > self.max_len:
            raise ValueError(f"cache: {self.length} + {t} tokens exceed the cache's max_len={self.max_len}")
        start, end = self.length, self.length + t
        window = self.recent_blocks * self.block_size
        if t <= window:  # the common case (decode, short chunks): every token is kept, no host sync
            pos = torch.arange(start, end, device=self.k.device)
        else:
            sink_end = min(self.sink_blocks * self.block_size, end)
            lo = max(end - window, start)
            pos = torch.cat([torch.arange(start, max(start, min(sink_end, lo)), device=self.k.device),
                             torch.arange(lo, end, device=self.k.device)])
            k, v = k[:, pos - start], v[:, pos - start]
        slots = self.slots(pos)
        self.k.index_copy_(1, slots, k.to(self.k.dtype))
        self.v.index_copy_(1, slots, v.to(self.v.dtype))
        self.slot_pos.index_copy_(0, slots, pos)
        self.length += t
