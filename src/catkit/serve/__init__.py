"""Serving: a continuous-batching engine over a paged KV cache, and an OpenAI-compatible server."""

from catkit.serve.engine import Engine, Request, RequestStats, SamplingParams
from catkit.serve.paged_cache import OutOfBlocks, PagedKVCache

__all__ = ["Engine", "Request", "RequestStats", "SamplingParams", "OutOfBlocks", "PagedKVCache"]
