"""A paged KV cache for serving many requests of different lengths at once.

Every dense-attention layer owns a pool of fixed-size blocks ``[num_blocks, block_size, H_kv, D]``
for keys and one for values. A request holds a block table (the physical block of each of its
logical blocks); all layers share the same table, so one allocation serves the whole model.
Blocks are taken from a free list as a request grows and go back when it finishes.

Admission control: :meth:`PagedKVCache.admit` lets a request in only if its worst case (prompt +
max new tokens) fits in the blocks not yet promised to other running requests. Blocks are still
allocated lazily, but a running request can never run out mid-decode: a full pool makes new
requests wait instead of crashing running ones. :meth:`ensure` without a prior ``admit`` raises
:class:`OutOfBlocks` when the pool is exhausted (reported, never a partial allocation).
"""

from __future__ import annotations

import torch


class OutOfBlocks(RuntimeError):
    """The block pool cannot hold the tokens asked for (the caller should queue the request)."""


def check_model_supported(model) -> None:
    """ValueError unless every layer of ``model`` is dense attention (letter "A", dense mode)."""
    pattern = model.cfg.pattern
    bad = sorted(set(pattern) - {"A"})
    if bad:
        raise ValueError(f"model: the paged cache supports dense attention layers (letter 'A') only; "
                         f"pattern {pattern!r} has {bad}")
    for i, block in enumerate(model.blocks):
        if getattr(block.mixer, "mode", "dense") != "dense":
            raise ValueError(f"model: layer {i} attention is in {block.mixer.mode!r} mode; only 'dense' is paged")
    if model.cfg.ngram:
        raise ValueError("model: the N-gram input embedding keeps its own decode state; not supported by the engine")


class PagedKVCache:
    """Block pools for ``n_layers`` layers plus per-request block tables.

    Args:
        n_layers, n_kv_heads, head_dim: model shapes.
        num_blocks: blocks per layer pool; block_size: tokens per block.
    Example::

        cache = PagedKVCache.for_model(model, num_blocks=64, block_size=16)
        assert cache.admit(rid, max_tokens=40)
        cache.ensure(rid, 10)          # room for 10 tokens (1 block)
        cache.write(layer, [rid], [0], k, v)   # k, v: [1, 10, H_kv, D] at positions 0..9
        cache.set_length(rid, 10)
        cache.free(rid)
    """

    def __init__(self, n_layers: int, num_blocks: int, block_size: int, n_kv_heads: int, head_dim: int, *,
                 device=None, dtype=torch.float32):
        for name, val in (("n_layers", n_layers), ("num_blocks", num_blocks), ("block_size", block_size)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name}: expected a positive int, got {val!r}")
        shape = (num_blocks, block_size, n_kv_heads, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free_blocks: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out block 0 first
        self.tables: dict[int, list[int]] = {}
        self.lengths: dict[int, int] = {}
        self.quota: dict[int, int] = {}  # rid -> blocks promised at admission (worst case)

    @classmethod
    def for_model(cls, model, num_blocks: int, block_size: int = 16, device=None, dtype=None) -> "PagedKVCache":
        check_model_supported(model)
        w = model.embed.weight
        return cls(model.cfg.n_layers, num_blocks, block_size, model.cfg.kv_heads, model.cfg.dim_head,
                   device=device or w.device, dtype=dtype or w.dtype)

    # -- accounting -------------------------------------------------------------------------
    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    def _outstanding(self) -> int:
        """Blocks promised to admitted requests but not allocated yet."""
        return sum(max(0, q - len(self.tables.get(r, ()))) for r, q in self.quota.items())

    def can_admit(self, max_tokens: int) -> bool:
        return self.blocks_for(max_tokens) <= self.num_free - self._outstanding()

    def admit(self, rid: int, max_tokens: int) -> bool:
        """Promise ``rid`` room for ``max_tokens`` tokens in total; False (nothing changes) if it does not fit."""
        if rid in self.tables:
            raise ValueError(f"rid: request {rid} already holds blocks")
        if not self.can_admit(max_tokens):
            return False
        self.tables[rid], self.lengths[rid], self.quota[rid] = [], 0, self.blocks_for(max_tokens)
        return True

    def ensure(self, rid: int, n_tokens: int) -> None:
        """Allocate blocks so ``rid`` can hold ``n_tokens`` tokens; OutOfBlocks (nothing taken) if the pool can't."""
        table = self.tables.get(rid, [])
        need = self.blocks_for(n_tokens) - len(table)
        if need <= 0:
            return
        # blocks promised to *other* requests are not ours to take
        others = self._outstanding() - max(0, self.quota.get(rid, 0) - len(table))
        if need > self.num_free - others:
            raise OutOfBlocks(f"request {rid}: needs {need} more block(s), {self.num_free} free, {others} promised")
        for _ in range(need):
            table.append(self.free_blocks.pop())
        self.tables[rid] = table
        self.lengths.setdefault(rid, 0)

    def free(self, rid: int) -> None:
        """Return every block of ``rid`` to the pool (no-op for an unknown request)."""
        self.free_blocks.extend(reversed(self.tables.pop(rid, [])))
        self.lengths.pop(rid, None)
        self.quota.pop(rid, None)

    def length(self, rid: int) -> int:
        return self.lengths[rid]

    def set_length(self, rid: int, n: int) -> None:
        if n > len(self.tables[rid]) * self.block_size:
            raise ValueError(f"n: {n} tokens exceed the {len(self.tables[rid])} block(s) of request {rid}")
        self.lengths[rid] = n

    # -- data -------------------------------------------------------------------------------
    def slots(self, rid: int, positions: torch.Tensor) -> torch.Tensor:
        """Flat slot (block * block_size + offset) of each token position of ``rid``."""
        table = torch.tensor(self.tables[rid], device=positions.device, dtype=torch.long)
        return table[positions // self.block_size] * self.block_size + positions % self.block_size

    def write(self, layer: int, rids: list[int], starts: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k, v`` [B, T, H_kv, D]: row b at positions ``starts[b] .. starts[b] + T - 1`` of ``rids[b]``."""
        t = k.shape[1]
        dev = self.k[layer].device
        idx = torch.cat([self.slots(r, torch.arange(s, s + t, device=dev)) for r, s in zip(rids, starts)])
        kf, vf = self.k[layer].flatten(0, 1), self.v[layer].flatten(0, 1)  # views: [blocks * block_size, H, D]
        kf.index_copy_(0, idx, k.reshape(-1, *k.shape[2:]).to(kf.dtype))
        vf.index_copy_(0, idx, v.reshape(-1, *v.shape[2:]).to(vf.dtype))

    def gather_index(self, rids: list[int], lens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat slots ``[B, L]`` (L = max(lens), padding points at slot 0) and the key-valid mask ``[B, L]``."""
        dev = self.k[0].device
        width = max(lens)
        pos = torch.arange(width, device=dev)
        valid = pos[None, :] < torch.tensor(lens, device=dev)[:, None]
        idx = torch.zeros(len(rids), width, device=dev, dtype=torch.long)
        for b, (r, n) in enumerate(zip(rids, lens)):
            idx[b, :n] = self.slots(r, pos[:n])
        return idx, valid

    def gather(self, layer: int, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values at ``index`` [B, L] as padded ``[B, L, H_kv, D]`` tensors."""
        kf, vf = self.k[layer].flatten(0, 1), self.v[layer].flatten(0, 1)
        return kf[index], vf[index]

    def block_table(self, rids: list[int]) -> torch.Tensor:
        """int32 ``[B, max_blocks]`` block tables (padded with block 0) for paged kernels."""
        width = max(len(self.tables[r]) for r in rids)
        out = torch.zeros(len(rids), width, dtype=torch.int32)
        for b, r in enumerate(rids):
            out[b, : len(self.tables[r])] = torch.tensor(self.tables[r], dtype=torch.int32)
        return out.to(self.k[0].device)
