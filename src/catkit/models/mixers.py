"""The layer-letter registry: one entry per token mixer usable in ``ModelConfig.pattern``.

Each value is a class with ``from_config(cfg)``, ``new_cache(batch, max_len, device, dtype)`` and
``forward(x, *, rope, cache=None, cu_seqlens=None)``. Adding a mixer is one line here.
"""

from catkit.layers.attention import Attention

MIXERS = {
    "A": Attention,  # dense softmax attention (GQA, RoPE)
}
