"""Distributed pieces: Flash Communication's quantized all-reduce and tensor-parallel linears."""

from catkit.dist.flash_all_reduce import (
    FALLBACK_BYTES,
    CommConfig,
    all_reduce,
    clear_plan_cache,
    exact_all_reduce,
    flash_all_reduce,
)
from catkit.dist.launch import free_port, run_local
from catkit.dist.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from catkit.dist.tp_model import shard_attention, shard_swiglu, tensor_parallel_model

__all__ = [
    "FALLBACK_BYTES", "ColumnParallelLinear", "CommConfig", "RowParallelLinear", "all_reduce", "clear_plan_cache",
    "exact_all_reduce", "flash_all_reduce", "free_port", "run_local",
    "shard_attention", "shard_swiglu", "tensor_parallel_model",
]
