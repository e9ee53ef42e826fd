"""The layer-letter registry: one entry per token mixer usable in ``ModelConfig.pattern``.

Each value is a class with ``from_config(cfg)``, ``new_cache(batch, max_len, device, dtype)`` and
``forward(x, *, rope, cache=None, cu_seqlens=None)``. Adding a mixer is one line here.
"""

from catkit.layers.attention import Attention, StreamingAttention
from catkit.layers.delta_net import (FG2GatedDeltaNet, FG2PlusGatedDeltaNet, GatedDeltaNet,
                                     KimiDeltaAttention)

MIXERS = {
    "A": Attention,  # dense softmax attention (GQA, RoPE)
    "S": StreamingAttention,  # streaming sink+window attention (LoZA SSA); mixer_options["streaming"] = {sink_blocks: 1, recent_blocks: 8, block_size: 128}
    "G": GatedDeltaNet,  # Gated DeltaNet (scalar decay and beta)
    "K": KimiDeltaAttention,  # KDA (per-channel decay, scalar beta)
    "F": FG2GatedDeltaNet,  # FG2-GDN (per-channel decay and coupled key/value rate)
    "P": FG2PlusGatedDeltaNet,  # FG2-GDN+ (separate key and value rates)
}
