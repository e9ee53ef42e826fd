"""``CatModel``: a decoder-only hybrid built from ``ModelConfig.pattern``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from catkit.layers.mlp import SwiGLU
from catkit.layers.moe import MoE
from catkit.layers.ngram_embedding import NgramEmbedding
from catkit.layers.rmsnorm import RMSNorm
from catkit.layers.rope import rope_cos_sin
from catkit.models.config import ModelConfig
from catkit.models.mixers import MIXERS
from catkit.models.sampling import check_sampling_args, sample_next


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [B, T, vocab]
    aux_loss: torch.Tensor  # MoE balance loss summed over layers (0 without MoE)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, letter: str):
        super().__init__()
        self.mixer_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = MIXERS[letter].from_config(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        if cfg.n_experts:
            hidden = cfg.moe_expert_hidden or cfg.ffn_dim
            self.ffn = MoE(cfg.d_model, cfg.n_experts, cfg.moe_top_k, hidden, cfg.moe_shared_expert)
        else:
            self.ffn = SwiGLU(cfg.d_model, cfg.ffn_dim)

    def forward(self, x, *, rope, cache=None, cu_seqlens=None):
        x = x + self.mixer(self.mixer_norm(x), rope=rope, cache=cache, cu_seqlens=cu_seqlens)
        h = self.ffn(self.ffn_norm(x))
        if isinstance(h, tuple):
            h, aux = h
        else:
            aux = x.new_zeros((), dtype=torch.float32)
        return x + h, aux


class CatModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        # the N-gram embedding exposes the token table as .weight too, so tying works either way
        self.embed = NgramEmbedding.from_config(cfg) if cfg.ngram else nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, letter) for letter in cfg.pattern)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init)

    def _init(self, m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=self.cfg.init_std)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def new_caches(self, batch_size: int, max_len: int | None = None, device=None, dtype=None) -> list:
        """One cache per layer for incremental decoding (kind depends on the layer's mixer).

        With ``cfg.ngram`` one more entry follows the layers' caches: the N-gram decode state.
        """
        max_len = max_len or self.cfg.max_seq_len
        device = device or self.embed.weight.device
        dtype = dtype or self.embed.weight.dtype
        caches = [b.mixer.new_cache(batch_size, max_len, device, dtype) for b in self.blocks]
        if self.cfg.ngram:
            caches.append(self.embed.new_cache(batch_size, device))
        return caches

    def _positions(self, input_ids, caches, cu_seqlens):
        b, t = input_ids.shape
        if cu_seqlens is not None:  # positions restart at every packed sequence
            idx = torch.arange(t, device=input_ids.device)
            seq = torch.searchsorted(cu_seqlens[1:].long(), idx, right=True)
            return (idx - cu_seqlens.long()[seq]).expand(b, t)
        start = caches[0].length if caches else 0
        return torch.arange(start, start + t, device=input_ids.device).expand(b, t)

    def forward(self, input_ids: torch.Tensor, *, caches: list | None = None, cu_seqlens: torch.Tensor | None = None) -> ModelOutput:
        """input_ids: [B, T] int64. With ``caches`` the tokens continue the cached prefix.

        ``cu_seqlens`` ([n+1] int32, B == 1): packed variable-length sequences that attend only
        within themselves.
        """
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids: expected [B, T], got shape {tuple(input_ids.shape)}")
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= self.cfg.vocab_size):
            raise ValueError(f"input_ids: ids must be in [0, {self.cfg.vocab_size})")
        if self.cfg.ngram:
            x = self.embed(input_ids, cache=caches[-1] if caches else None, cu_seqlens=cu_seqlens)
        else:
            x = self.embed(input_ids)
        positions = self._positions(input_ids, caches, cu_seqlens)
        rope = rope_cos_sin(positions, self.cfg.dim_head, self.cfg.rope_theta, dtype=x.dtype)
        aux = x.new_zeros((), dtype=torch.float32)
        for i, block in enumerate(self.blocks):
            x, a = block(x, rope=rope, cache=caches[i] if caches else None, cu_seqlens=cu_seqlens)
            aux = aux + a
        x = self.norm(x)
        weight = self.embed.weight if self.lm_head is None else self.lm_head.weight
        return ModelOutput(F.linear(x, weight), aux)

    def loss(self, input_ids, targets, *, cu_seqlens=None) -> tuple[torch.Tensor, dict]:
        """Cross-entropy (targets == -100 ignored) plus the weighted MoE balance loss."""
        return self.loss_from_output(self.forward(input_ids, cu_seqlens=cu_seqlens), targets)

    def loss_from_output(self, out: ModelOutput, targets: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """``loss`` on an already computed forward (e.g. one run through a DDP wrapper)."""
        lm = F.cross_entropy(out.logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
        total = lm + self.cfg.moe_aux_loss_coef * out.aux_loss
        return total, {"lm_loss": lm.detach(), "aux_loss": out.aux_loss.detach()}

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        eos_id: int | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Continue ``input_ids`` [B, T0]; returns [B, T0 + n] with n <= max_new_tokens.

        ``use_cache=False`` recomputes the full sequence every step (the reference the cached
        path is tested against). Rows that emitted ``eos_id`` keep emitting it.
        """
        check_sampling_args(temperature, top_k, top_p)
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens: expected >= 0, got {max_new_tokens}")
        if input_ids.ndim != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids: expected a non-empty [B, T] prompt, got shape {tuple(input_ids.shape)}")
        total = input_ids.shape[1] + max_new_tokens
        if total > self.cfg.max_seq_len:
            raise ValueError(f"max_new_tokens: prompt + new tokens = {total} exceeds max_seq_len={self.cfg.max_seq_len}")
        seq = input_ids
        caches = self.new_caches(input_ids.shape[0], total) if use_cache else None
        step_input = input_ids
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            logits = self.forward(step_input if use_cache else seq, caches=caches).logits[:, -1]
            nxt = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
            if eos_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                done |= nxt == eos_id
            seq = torch.cat([seq, nxt[:, None]], dim=1)
            step_input = nxt[:, None]
            if eos_id is not None and bool(done.all()):
                break
        return seq
