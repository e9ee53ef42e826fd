"""Hugging Face Llama / Qwen3 models with catkit's attention modes (LoZA streaming, gated).

``patch(model)`` registers a ``"catkit"`` attention implementation with ``transformers``'
``AttentionInterface`` and points the model's config at it; every attention module then gets the
attributes of ``catkit.layers.attention.Attention`` that LoZA drives:

* ``mode``: ``"dense"`` runs transformers' own SDPA attention, unchanged (same mask as
  ``attn_implementation="sdpa"``); ``"streaming"`` the sink + block-aligned window pattern
  (Triton kernel, or plain PyTorch); ``"gated"`` the calibration blend.
* ``streaming`` (``StreamingSpec``), ``loza_gate``, ``use_kernels``.

Blocks count from cache slot 0 (with left padding the pad slots count too). Attention dropout is
ignored in streaming mode. Streaming layers here still store every token in transformers' own KV
cache (only the read is sparse); the ring buffer that frees memory is in catkit's own models.

``transformers`` is an optional extra (``pip install catkit[hf]``, >= 4.48 for the attention
interface); it is imported only in this module.
"""

from __future__ import annotations

import torch
from torch import nn

from catkit.layers.attention import (StreamingSpec, streaming_over_prefix, streaming_prefill)

IMPLEMENTATION = "catkit"


def _transformers():
    try:
        import transformers
        from transformers import AttentionInterface  # noqa: F401  (>= 4.48)
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("catkit.models.hf needs transformers >= 4.48 (pip install 'catkit[hf]')") from e
    return transformers


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(IMPLEMENTATION, catkit_attention)
    try:  # transformers >= 4.53 builds masks per implementation: reuse SDPA's (None when causal suffices)
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

        AttentionMaskInterface.register(IMPLEMENTATION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    except ImportError:  # pragma: no cover - older transformers build a generic 4D mask
        pass


def _sdpa():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS["sdpa"]


def _allowed(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """transformers' 4D mask as bool (True = may attend); additive float masks use a large negative."""
    if attention_mask is None or attention_mask.dtype == torch.bool:
        return attention_mask
    return attention_mask > torch.finfo(attention_mask.dtype).min / 2


def catkit_attention(module: nn.Module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                     **kwargs):
    """transformers attention function: query [B, H, T, D], key/value [B, H_kv, S, D] -> ([B, T, H, D], None).

    The queries are the last T of the S cached positions (prefill: T = S).
    """
    mode = getattr(module, "mode", "dense")
    if mode == "dense":
        return _sdpa()(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    spec: StreamingSpec = module.streaming
    q, k, v = (z.transpose(1, 2) for z in (query, key, value))  # [B, T, H, D]
    mask = _allowed(attention_mask)
    if mask is not None and mask.shape[-1] != k.shape[1]:
        mask = mask[..., : k.shape[1]]
    if mask is None and q.shape[1] == k.shape[1]:
        o = streaming_prefill(q, k, v, spec, scale=scaling, use_kernels=getattr(module, "use_kernels", True))
    else:  # decode / chunked prefill / padding: explicit mask over the sink and window keys only
        o = streaming_over_prefix(q, k.to(q.dtype), v.to(q.dtype), spec, scale=scaling, extra_mask=mask)
    if mode == "gated":
        dense, _ = _sdpa()(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        gate = getattr(module, "loza_gate", None)
        alpha = torch.sigmoid(gate.float()) if gate is not None else 0.5
        o = (alpha * dense.float() + (1 - alpha) * o.float()).to(dense.dtype)
    return o.contiguous(), None


def _is_attention(m: nn.Module) -> bool:
    return all(hasattr(m, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "layer_idx", "head_dim"))


def patched_modules(model: nn.Module) -> list[nn.Module]:
    """The attention modules ``patch`` prepared, in depth order (empty if not patched)."""
    return [m for m in model.modules() if getattr(m, "_catkit_patched", False)]


def patch(model: nn.Module, *, sink_blocks: int = 1, recent_blocks: int = 8, block_size: int = 128) -> list[nn.Module]:
    """Give a Hugging Face Llama / Qwen3 (or any model using ``AttentionInterface``) catkit's attention modes.

    Args:
        model: e.g. ``LlamaForCausalLM`` / ``Qwen3ForCausalLM`` (any size; tests use tiny random configs).
        sink_blocks, recent_blocks, block_size: the streaming pattern (LoZA: 1, 8, 128).
    Returns:
        The attention modules in depth order, all in ``"dense"`` mode: outputs are unchanged until
        a module's ``mode`` changes (``catkit.loza.convert`` does that).

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4))
        >>> layers = patch(model); layers[1].mode = "streaming"
    """
    _transformers()
    spec = StreamingSpec(sink_blocks=sink_blocks, recent_blocks=recent_blocks, block_size=block_size)
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError("model: expected a transformers PreTrainedModel (no .config)")
    mods = [m for m in model.modules() if _is_attention(m)]
    if not mods:
        raise ValueError(f"model: no attention modules with q/k/v/o projections found in {type(model).__name__}")
    _register()
    for m in mods:
        if not getattr(m, "_catkit_patched", False):
            m.mode = "dense"
            m.loza_gate = None
            m.use_kernels = True
            m._catkit_patched = True
        m.streaming = spec
    config._attn_implementation = IMPLEMENTATION
    for m in mods:  # modules normally share the model's config; make sure each one dispatches to us
        cfg = getattr(m, "config", None)
        if cfg is not None and cfg is not config:
            cfg._attn_implementation = IMPLEMENTATION
    return mods


__all__ = ["patch", "patched_modules", "catkit_attention", "IMPLEMENTATION"]
