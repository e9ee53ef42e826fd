"""Delta-rule linear attention: GDN, KDA, FG2-GDN and FG2-GDN+ (chunked training, recurrent decode)."""

from catkit.ops.delta_rule.chunk import chunk_fg2_delta_rule, chunk_gated_delta_rule, chunk_kda

__all__ = ["chunk_fg2_delta_rule", "chunk_gated_delta_rule", "chunk_kda"]
