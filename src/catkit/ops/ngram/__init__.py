"""Hashed N-gram embeddings (LongCat-Flash-Lite): ids of every table and the fused ids + gather.

``ngram_hash_ids`` / ``ngram_embedding`` are the Triton path (falling back to ``naive`` where Triton
cannot run); ``naive`` holds the definition, including a big-integer reference of the hash, and
``next_context`` (the decode state update).
"""

from catkit.ops.ngram import naive
from catkit.ops.ngram.fused import (NgramSpec, ngram_embedding, ngram_embedding_bwd, ngram_embedding_fwd,
                                    ngram_hash_ids, ngram_ids_fwd, validate)
from catkit.ops.ngram.naive import next_context

__all__ = ["NgramSpec", "naive", "next_context", "ngram_embedding", "ngram_embedding_bwd", "ngram_embedding_fwd",
           "ngram_hash_ids", "ngram_ids_fwd", "validate"]
