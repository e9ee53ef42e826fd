"""Mixture-of-experts SwiGLU FFN: softmax top-k routing, optional shared expert, balance loss.

Expert compute is grouped: token-expert assignments are sorted by expert, scattered into a padded
``[E, capacity, d]`` buffer (capacity = the busiest expert's load, so nothing is dropped) and run
as two batched matmuls. No Python loop over tokens or experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from catkit.layers.mlp import SwiGLU


class MoE(nn.Module):
    def __init__(self, d_model: int, n_experts: int, top_k: int, hidden: int, shared_expert: bool = False):
        super().__init__()
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k: expected 1..{n_experts}, got {top_k}")
        self.n_experts, self.top_k, self.hidden = n_experts, top_k, hidden
        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.w_gate_up = nn.Parameter(torch.randn(n_experts, d_model, 2 * hidden) * 0.02)
        self.w_down = nn.Parameter(torch.randn(n_experts, hidden, d_model) * 0.02)
        self.shared = SwiGLU(d_model, hidden) if shared_expert else None

    def route(self, x: torch.Tensor):
        """x: [N, d] -> (weights [N, k] fp32 summing to 1, experts [N, k] int64, balance loss scalar).

        Balance loss (Switch Transformer form): E * sum_e f_e * P_e, with f_e the fraction of the
        N*k assignments that went to expert e and P_e the mean router probability of e. It is 1
        for perfectly uniform routing. It is computed over the tokens of one forward call, so
        under data parallelism or gradient accumulation it is a per-micro-batch loss (as in
        Megatron-LM), not the loss of the global batch.
        """
        probs = torch.softmax(self.router(x).float(), dim=-1)
        top_p, experts = probs.topk(self.top_k, dim=-1)
        weights = top_p / top_p.sum(-1, keepdim=True)
        load = torch.bincount(experts.flatten(), minlength=self.n_experts).float() / experts.numel()
        aux = self.n_experts * (load * probs.mean(0)).sum()
        return weights, experts, aux

    def expert_forward(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Grouped compute of sum_k weights[n, k] * Expert_{experts[n, k]}(x[n]); x: [N, d]."""
        n, d = x.shape
        flat_expert = experts.flatten()
        order = flat_expert.argsort(stable=True)
        sorted_expert = flat_expert[order]
        counts = torch.bincount(flat_expert, minlength=self.n_experts)
        group_start = counts.cumsum(0) - counts
        slot = torch.arange(order.numel(), device=x.device) - group_start[sorted_expert]
        token = order // self.top_k
        capacity = int(counts.max())
        buf = x.new_zeros(self.n_experts, capacity, d)
        buf[sorted_expert, slot] = x[token]
        gate, up = torch.bmm(buf, self.w_gate_up.to(x.dtype)).chunk(2, dim=-1)
        out = torch.bmm(F.silu(gate) * up, self.w_down.to(x.dtype))
        contrib = out[sorted_expert, slot] * weights.flatten()[order, None].to(x.dtype)
        return torch.zeros_like(x).index_add_(0, token, contrib)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, T, d] -> (y [B, T, d], balance loss)."""
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        weights, experts, aux = self.route(x2)
        y = self.expert_forward(x2, weights, experts)
        if self.shared is not None:
            y = y + self.shared(x2)
        return y.view(shape), aux
