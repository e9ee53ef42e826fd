"""Tensor-parallel linear layers (Megatron split) whose reduction can be Flash Communication.

``ColumnParallelLinear`` keeps rows ``[r * out/W, (r+1) * out/W)`` of the weight on rank r: the
input is replicated, the output is this rank's slice of the features (``gather_output=True``
all-gathers it back). ``RowParallelLinear`` keeps columns ``[r * in/W, (r+1) * in/W)``: the input
is this rank's slice of the features (``input_is_parallel=True``, what a column-parallel layer
produces) and each rank's partial product is summed over ranks by an exact or a compressed
all-reduce (``comm``); the bias is added once, after the sum. A column layer followed by a row
layer (an MLP) costs one all-reduce.

Both are built from a full ``nn.Linear`` with ``from_linear(linear, group, ...)`` so a test or a
model conversion shards existing weights.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from catkit.dist.flash_all_reduce import CommConfig, all_reduce


def _rank_world(group) -> tuple[int, int]:
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _shard(n: int, world: int, name: str) -> int:
    if n % world:
        raise ValueError(f"{name}: {n} is not divisible by the tensor-parallel size {world}")
    return n // world


class _GatherLastDim(torch.autograd.Function):
    """All-gather along the last dim; backward keeps this rank's slice of the gradient."""

    @staticmethod
    def forward(ctx, x, group, rank, world):
        ctx.rank, ctx.world = rank, world
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, dy):
        return dy.chunk(ctx.world, dim=-1)[ctx.rank].contiguous(), None, None, None


class ColumnParallelLinear(nn.Module):
    """``y = x @ W.T + b`` with W split by output features. x: ``[..., in]`` (replicated).

    Returns ``[..., out / W]`` (this rank's features) or ``[..., out]`` with ``gather_output``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group=None, *,
                 gather_output: bool = False, device=None, dtype=None):
        super().__init__()
        self.group = group
        self.rank, self.world = _rank_world(group)
        self.in_features, self.out_features = in_features, out_features
        self.out_per_rank = _shard(out_features, self.world, "out_features")
        self.gather_output = gather_output
        self.weight = nn.Parameter(torch.empty(self.out_per_rank, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(self.out_per_rank, device=device, dtype=dtype)) if bias else None
        nn.init.normal_(self.weight, std=in_features ** -0.5)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group=None, *, gather_output: bool = False) -> "ColumnParallelLinear":
        """This rank's shard of ``linear`` (same device and dtype; weights copied)."""
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, group,
                    gather_output=gather_output, device=w.device, dtype=w.dtype)
        sl = slice(layer.rank * layer.out_per_rank, (layer.rank + 1) * layer.out_per_rank)
        with torch.no_grad():
            layer.weight.copy_(w[sl])
            if linear.bias is not None:
                layer.bias.copy_(linear.bias[sl])
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x: expected last dim {self.in_features}, got shape {tuple(x.shape)}")
        y = F.linear(x, self.weight, self.bias)
        if self.gather_output and self.world > 1:
            y = _GatherLastDim.apply(y, self.group, self.rank, self.world)
        return y


class RowParallelLinear(nn.Module):
    """``y = x @ W.T + b`` with W split by input features; partial sums reduced by ``comm``.

    x: ``[..., in / W]`` with ``input_is_parallel`` (default) or ``[..., in]`` (this rank slices
    it). Returns ``[..., out]``, the same on every rank. ``comm=CommConfig(mode="flash", bits=4,
    gather_bits=8)`` reduces with the INT6 Flash Communication all-reduce.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group=None, *,
                 input_is_parallel: bool = True, comm: CommConfig | None = None, device=None, dtype=None):
        super().__init__()
        self.group = group
        self.rank, self.world = _rank_world(group)
        self.in_features, self.out_features = in_features, out_features
        self.in_per_rank = _shard(in_features, self.world, "in_features")
        self.input_is_parallel = input_is_parallel
        self.comm = comm or CommConfig()
        self.weight = nn.Parameter(torch.empty(out_features, self.in_per_rank, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        nn.init.normal_(self.weight, std=in_features ** -0.5)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group=None, *, input_is_parallel: bool = True,
                    comm: CommConfig | None = None) -> "RowParallelLinear":
        """This rank's shard of ``linear`` (same device and dtype; weights copied)."""
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, group,
                    input_is_parallel=input_is_parallel, comm=comm, device=w.device, dtype=w.dtype)
        sl = slice(layer.rank * layer.in_per_rank, (layer.rank + 1) * layer.in_per_rank)
        with torch.no_grad():
            layer.weight.copy_(w[:, sl])
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            if x.shape[-1] != self.in_features:
                raise ValueError(f"x: expected last dim {self.in_features}, got shape {tuple(x.shape)}")
            x = x[..., self.rank * self.in_per_rank: (self.rank + 1) * self.in_per_rank]
        elif x.shape[-1] != self.in_per_rank:
            raise ValueError(f"x: expected last dim {self.in_per_rank} (in_features / tp size), "
                             f"got shape {tuple(x.shape)}")
        y = F.linear(x, self.weight)
        if self.world > 1:
            # y is this layer's own fresh partial: without autograd reduce it in place (no copy /
            # output allocation per call; prefill all-reduces are tens of MB each)
            inplace = not (torch.is_grad_enabled() and y.requires_grad) and y.is_contiguous()
            y = all_reduce(y, self.group, self.comm, inplace=inplace)
        return y + self.bias if self.bias is not None else y
