"""Delta-rule linear attention: GDN, KDA, FG2-GDN and FG2-GDN+ (chunked training, recurrent decode).

``chunk_*`` (Triton forward + backward, chunk size 64) is for training and prefill;
``fused_recurrent_*`` (forward only) for decoding a few tokens per step. ``naive`` holds the
token-loop ground truth, including the one-sided channel-rate ablation.
"""

from catkit.ops.delta_rule.chunk import chunk_fg2_delta_rule, chunk_gated_delta_rule, chunk_kda
from catkit.ops.delta_rule.recurrent import (fused_recurrent_fg2_delta_rule,
                                             fused_recurrent_gated_delta_rule)

__all__ = ["chunk_fg2_delta_rule", "chunk_gated_delta_rule", "chunk_kda",
           "fused_recurrent_fg2_delta_rule", "fused_recurrent_gated_delta_rule"]
