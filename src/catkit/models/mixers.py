"""The layer-letter registry: one entry per token mixer usable in ``ModelConfig.pattern``.

Each value is a class with ``from_config(cfg)``, ``new_cache(batch, max_len, device, dtype)`` and
``forward(x, *, rope, cache=None, cu_seqlens=None)``. Adding a mixer is one line here.
"""

from catkit.layers.attention import Attention, StreamingAttention

MIXERS = {
    "A": Attention,  # dense softmax attention (GQA, RoPE)
    "S": StreamingAttention,  # streaming sink+window attention (LoZA SSA); mixer_options["streaming"] = {sink_blocks: 1, recent_blocks: 8, block_size: 128}
}
