"""Block-sparse attention: streaming (LoZA) and index-list patterns, prefill and paged decode."""

from catkit.ops.sparse_attention.decode import paged_decode_attention
from catkit.ops.sparse_attention.prefill import block_sparse_attention, streaming_attention

__all__ = ["streaming_attention", "block_sparse_attention", "paged_decode_attention"]
