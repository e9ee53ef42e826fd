"""Grouped-query softmax attention with RoPE: dense (SDPA) or streaming (LoZA SSA) in one layer.

Mixer letters ``A`` (dense) and ``S`` (streaming). ``Attention.mode`` picks the computation and
can be flipped on a trained layer (that is what LoZA's ``convert`` does):

* ``"dense"``: causal attention through ``scaled_dot_product_attention``, contiguous ``KVCache``.
* ``"streaming"``: each query block of ``block_size`` tokens reads the first ``sink_blocks``
  blocks and its ``recent_blocks`` most recent blocks (its own included), causal inside
  (``catkit.ops.sparse_attention``: the Triton kernels where ``kernel_device_ok``, ``naive.py``
  otherwise). The window is block aligned, so a query sees between ``(R-1)*block+1`` and
  ``R*block`` recent tokens. Its decode cache is a ``StreamingKVCache`` ring buffer that holds
  only sink + window tokens.
* ``"gated"``: LoZA calibration, ``alpha * dense + (1 - alpha) * streaming`` on the same q, k, v
  with ``alpha = sigmoid(loza_gate)``; training only (no cache).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from catkit.layers.kv_cache import KVCache, StreamingKVCache
from catkit.layers.rope import apply_rope
from catkit.utils.triton_utils import kernel_device_ok

MODES = ("dense", "streaming", "gated")
_KERNEL_HEAD_DIMS = (16, 32, 64, 128)
_KERNEL_BLOCKS = (16, 32, 64, 128)
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def varlen_causal_mask(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Boolean [total, total] mask: causal within each packed sequence, nothing across them."""
    seq_id = torch.searchsorted(cu_seqlens[1:].long(), torch.arange(total, device=cu_seqlens.device), right=True)
    idx = torch.arange(total, device=cu_seqlens.device)
    return (seq_id[:, None] == seq_id[None, :]) & (idx[:, None] >= idx[None, :])


@dataclass
class StreamingSpec:
    """The streaming pattern: ``sink_blocks`` + ``recent_blocks`` blocks of ``block_size`` tokens.

    LoZA defaults: 1 sink block and 8 recent blocks of 128 (a 128-token sink and a window of
    897..1024 tokens). ``recent_blocks >= 1`` so every query sees at least itself.
    """

    sink_blocks: int = 1
    recent_blocks: int = 8
    block_size: int = 128

    def __post_init__(self):
        for name, low in (("sink_blocks", 0), ("recent_blocks", 1), ("block_size", 1)):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, int) or val < low:
                raise ValueError(f"{name}: expected an int >= {low}, got {val!r}")

    @classmethod
    def from_options(cls, options: dict | None) -> "StreamingSpec":
        """From ``ModelConfig.mixer_options["streaming"]`` (missing keys take the LoZA defaults)."""
        options = dict(options or {})
        unknown = sorted(set(options) - {"sink_blocks", "recent_blocks", "block_size"})
        if unknown:
            raise ValueError(f"mixer_options['streaming']: unknown key(s) {unknown}; "
                             "expected sink_blocks, recent_blocks, block_size")
        return cls(**options)

    @property
    def kv_tokens(self) -> int:
        """Tokens a streaming layer keeps per sequence: sink + window."""
        return (self.sink_blocks + self.recent_blocks) * self.block_size


def streaming_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, spec: StreamingSpec) -> torch.Tensor:
    """Boolean ``[Tq, Tk]``: query at ``q_pos[i]`` may read key at ``k_pos[j]`` (``k_pos`` -1 = empty slot).

    Exactly the prefill kernels' rule, on absolute positions: key block ``< sink_blocks`` or within
    ``recent_blocks`` blocks of the query's block, and causal.
    """
    bs = spec.block_size
    qb, kb = (q_pos // bs)[:, None], (k_pos // bs)[None, :]
    visible = (kb < spec.sink_blocks) | (kb >= qb - spec.recent_blocks + 1)
    return visible & (k_pos[None, :] >= 0) & (k_pos[None, :] <= q_pos[:, None])


def _kernel_ok(spec: StreamingSpec, use_kernels: bool, *tensors) -> bool:
    q = tensors[0]
    return (use_kernels and q.shape[-1] in _KERNEL_HEAD_DIMS and spec.block_size in _KERNEL_BLOCKS
            and q.dtype in _KERNEL_DTYPES and kernel_device_ok(*tensors))


def streaming_prefill(q, k, v, spec: StreamingSpec, *, cu_seqlens=None, scale=None, use_kernels=True):
    """Streaming attention of a whole sequence (positions from 0); ``[B, T, H, D]`` layout.

    The Triton kernel (forward and backward) where it can run, ``naive.py`` otherwise (other head
    dims or block sizes, or plain CPU). Returns ``[B, T, H, D]`` in q's dtype.
    """
    from catkit.ops.sparse_attention import naive, streaming_attention

    kw = dict(sink_blocks=spec.sink_blocks, recent_blocks=spec.recent_blocks, block_size=spec.block_size,
              cu_seqlens=cu_seqlens, scale=scale)
    if _kernel_ok(spec, use_kernels, q, k, v):
        return streaming_attention(q, k, v, **kw, _any_block_size=spec.block_size not in (64, 128))
    return naive.naive_streaming_attention(q, k, v, **kw).to(q.dtype)


def streaming_masked(q, k, v, q_pos, k_pos, spec: StreamingSpec, *, scale=None, extra_mask=None):
    """Streaming attention of queries at ``q_pos`` over keys at ``k_pos`` by an explicit mask (SDPA).

    q: [B, Tq, H, D]; k, v: [B, Tk, H_kv, D]; q_pos [Tq], k_pos [Tk] (-1 = empty slot).
    ``extra_mask`` (bool, broadcastable to [B, 1, Tq, Tk]) is ANDed in (padding). For chunked
    prefill and decode from a cache, where the keys are a gathered subset. Every query must see at
    least one key (itself): true for caches that hold the query's own token.
    """
    allowed = streaming_mask(q_pos, k_pos, spec)[None, None]
    if extra_mask is not None:
        allowed = allowed & extra_mask
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=allowed,
                                       scale=scale, enable_gqa=q.shape[2] != k.shape[2])
    return o.transpose(1, 2)


def streaming_over_prefix(q, k, v, spec: StreamingSpec, *, scale=None, extra_mask=None):
    """Queries = the last Tq of Tk contiguous positions 0..Tk-1 (a full, non-ring cache).

    Only the sink and the keys the earliest query's window can reach are gathered, so a decode
    step costs O(sink + window), not O(Tk). ``extra_mask`` [B, 1, Tq, Tk] is sliced alike.
    """
    tq, tk = q.shape[1], k.shape[1]
    bs = spec.block_size
    lo = max(0, ((tk - tq) // bs - spec.recent_blocks + 1) * bs)
    sink_end = min(spec.sink_blocks * bs, lo)
    dev = q.device
    k_pos = torch.cat([torch.arange(sink_end, device=dev), torch.arange(lo, tk, device=dev)])
    if sink_end or lo:
        k, v = k[:, k_pos], v[:, k_pos]
        if extra_mask is not None:
            extra_mask = extra_mask[..., k_pos]
    q_pos = torch.arange(tk - tq, tk, device=dev)
    return streaming_masked(q, k, v, q_pos, k_pos, spec, scale=scale, extra_mask=extra_mask)


class Attention(nn.Module):
    """GQA attention with RoPE; ``mode`` is ``"dense"``, ``"streaming"`` or ``"gated"`` (see module doc).

    Args:
        d_model, n_heads, n_kv_heads, head_dim: shapes (n_kv_heads divides n_heads).
        mode: initial mode (default dense).
        streaming: the ``StreamingSpec`` used in streaming/gated mode (default LoZA's 1 + 8 blocks of 128).
    Attributes:
        loza_gate: ``None`` or a scalar ``nn.Parameter`` logit (gated mode; set by ``catkit.loza.calibrate``).
        use_kernels: use the Triton kernels when the device allows (default True).
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, *, mode: str = "dense",
                 streaming: StreamingSpec | None = None):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.qkv = nn.Linear(d_model, (n_heads + 2 * n_kv_heads) * head_dim, bias=False)
        self.out = nn.Linear(n_heads * head_dim, d_model, bias=False)
        self.streaming = streaming if streaming is not None else StreamingSpec()
        self.loza_gate: nn.Parameter | None = None
        self.use_kernels = True
        self.mode = mode

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {value!r}")
        self._mode = value

    @classmethod
    def from_config(cls, cfg, mode: str = "dense") -> "Attention":
        spec = StreamingSpec.from_options(cfg.mixer_options.get("streaming"))
        return cls(cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.dim_head, mode=mode, streaming=spec)

    def new_cache(self, batch_size: int, max_len: int, device, dtype) -> KVCache | StreamingKVCache:
        if self.mode == "streaming":
            s = self.streaming
            return StreamingKVCache(batch_size, max_len, self.n_kv_heads, self.head_dim, device, dtype,
                                    sink_blocks=s.sink_blocks, recent_blocks=s.recent_blocks, block_size=s.block_size)
        return KVCache(batch_size, max_len, self.n_kv_heads, self.head_dim, device, dtype)

    def forward(self, x, *, rope, cache: KVCache | StreamingKVCache | None = None,
                cu_seqlens: torch.Tensor | None = None):
        """x: [B, T, d_model]; rope: (cos, sin) each [B, T, head_dim]; returns [B, T, d_model]."""
        b, t, _ = x.shape
        hq, hk, d = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.qkv(x).view(b, t, hq + 2 * hk, d).split([hq, hk, hk], dim=2)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None and cu_seqlens is not None:
            raise ValueError("cu_seqlens: variable-length batches are for training/prefill, not with a cache")
        if self.mode == "dense":
            o = self._dense(q, k, v, cache, cu_seqlens)
        elif self.mode == "streaming":
            o = self._streaming(q, k, v, cache, cu_seqlens)
        else:
            if cache is not None:
                raise ValueError("cache: the gated (LoZA calibration) mode is for training, not decoding")
            alpha = torch.sigmoid(self.loza_gate.float()) if self.loza_gate is not None else 0.5
            dense = self._dense(q, k, v, None, cu_seqlens)
            sparse = streaming_prefill(q, k, v, self.streaming, cu_seqlens=cu_seqlens, use_kernels=self.use_kernels)
            o = (alpha * dense.float() + (1 - alpha) * sparse.float()).to(dense.dtype)
        return self.out(o.reshape(b, t, hq * d))

    def _dense(self, q, k, v, cache, cu_seqlens):
        """The dense path: SDPA over all keys so far; returns [B, T, H, D]."""
        if isinstance(cache, StreamingKVCache):
            raise ValueError("cache: a StreamingKVCache was made for streaming mode; make caches after setting mode")
        hq, hk = self.n_heads, self.n_kv_heads
        t = q.shape[1]
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.append(k, v)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # [B, H, T, D]
        mask, causal = None, False
        if cu_seqlens is not None:
            mask = varlen_causal_mask(cu_seqlens, t)
        elif past == 0:
            causal = t > 1
        elif t > 1:  # chunked prefill after a cached prefix: causal with an offset
            qpos = torch.arange(past, past + t, device=q.device)
            mask = qpos[:, None] >= torch.arange(past + t, device=q.device)[None, :]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=hq != hk)
        return o.transpose(1, 2)

    def _streaming(self, q, k, v, cache, cu_seqlens):
        spec = self.streaming
        if cache is None:
            return streaming_prefill(q, k, v, spec, cu_seqlens=cu_seqlens, use_kernels=self.use_kernels)
        if isinstance(cache, KVCache):  # a full cache made before the mode flipped: mask over it
            k, v = cache.append(k, v)
            return streaming_over_prefix(q, k, v, spec)
        _check_cache(cache, spec, self.n_kv_heads, self.head_dim)
        past, t = cache.length, q.shape[1]
        if past == 0 and t > 1:  # prefill: the kernel over the prompt, then keep sink + window
            o = streaming_prefill(q, k, v, spec, use_kernels=self.use_kernels)
            cache.append(k, v)
            return o
        if t == 1 and _kernel_ok(spec, self.use_kernels, q, cache.k):
            return self._paged_decode(q, k, v, cache)
        # Masked attention over the ring (before it is overwritten) plus the new tokens.
        q_pos = torch.arange(past, past + t, device=q.device)
        k_all = torch.cat([cache.k, k.to(cache.k.dtype)], 1)
        v_all = torch.cat([cache.v, v.to(cache.v.dtype)], 1)
        o = streaming_masked(q.to(cache.k.dtype), k_all, v_all, q_pos, torch.cat([cache.slot_pos, q_pos]), spec)
        cache.append(k, v)
        return o.to(q.dtype)

    def _paged_decode(self, q, k, v, cache: StreamingKVCache):
        """One new token through ``paged_decode_attention`` on the ring buffer's paged view."""
        from catkit.ops.sparse_attention import paged_decode_attention

        spec = self.streaming
        cache.append(k, v)  # the kernel expects the query's own K/V in the cache
        n = cache.length
        k_pages, v_pages = cache.pages()
        table = cache.block_table(-(-n // spec.block_size))
        seq_lens = torch.full((q.shape[0],), n, device=q.device, dtype=torch.int32)
        o = paged_decode_attention(q[:, 0].to(cache.k.dtype), k_pages, v_pages, table, seq_lens,
                                   sink_blocks=spec.sink_blocks, recent_blocks=spec.recent_blocks,
                                   block_size=spec.block_size, validate=False,
                                   _any_block_size=spec.block_size not in (64, 128))
        return o[:, None].to(q.dtype)


def _check_cache(cache: StreamingKVCache, spec: StreamingSpec, n_kv_heads: int, head_dim: int) -> None:
    if (cache.sink_blocks, cache.recent_blocks, cache.block_size) != (spec.sink_blocks, spec.recent_blocks,
                                                                      spec.block_size):
        raise ValueError(f"cache: made for sink/recent/block {cache.sink_blocks}/{cache.recent_blocks}/"
                         f"{cache.block_size}, the layer streams with {spec}")
    if cache.k.shape[2:] != (n_kv_heads, head_dim):
        raise ValueError(f"cache: expected [.., H_kv={n_kv_heads}, D={head_dim}], got {tuple(cache.k.shape)}")


class StreamingAttention(Attention):
    """Mixer letter ``S``: an ``Attention`` that starts in streaming mode (LoZA's SSA layer).

    The pattern comes from ``cfg.mixer_options["streaming"]`` = ``{"sink_blocks": 1,
    "recent_blocks": 8, "block_size": 128}`` (those are the defaults).
    """

    @classmethod
    def from_config(cls, cfg, mode: str = "streaming") -> "StreamingAttention":
        return super().from_config(cfg, mode=mode)


__all__ = ["Attention", "StreamingAttention", "StreamingSpec", "streaming_mask", "streaming_prefill",
           "streaming_masked", "streaming_over_prefix", "varlen_causal_mask", "MODES"]
