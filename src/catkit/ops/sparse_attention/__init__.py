"""Block-sparse attention: streaming (LoZA) and index-list patterns, prefill and paged decode,
plus query-aware block / token selection (AsyncTLS-style) that produces the index lists."""

from catkit.ops.sparse_attention.decode import paged_decode_attention
from catkit.ops.sparse_attention.prefill import block_sparse_attention, streaming_attention
from catkit.ops.sparse_attention.select import (block_scores, block_summaries, paged_block_summaries, select_blocks,
                                                select_tokens)

__all__ = ["streaming_attention", "block_sparse_attention", "paged_decode_attention", "block_summaries",
           "paged_block_summaries", "block_scores", "select_blocks", "select_tokens"]
