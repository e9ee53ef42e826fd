"""``ModelConfig``: the one dataclass that describes a catkit hybrid decoder."""

from __future__ import annotations

from dataclasses import dataclass, field

from catkit.utils.config import ConfigMixin


@dataclass
class ModelConfig(ConfigMixin):
    """A decoder-only model built from a layer pattern, one letter per layer.

    ``pattern="AAAA"`` is four dense-attention layers; letters are looked up in
    ``catkit.models.mixers.MIXERS`` (later letters add linear and sparse mixers).
    ``n_experts=0`` gives a SwiGLU MLP in every layer; ``n_experts>0`` a top-k MoE FFN.
    """

    vocab_size: int = 259
    d_model: int = 128
    pattern: str = "AAAA"
    n_heads: int = 4
    n_kv_heads: int | None = None  # None = n_heads (plain multi-head attention)
    head_dim: int | None = None  # None = d_model // n_heads
    ffn_hidden: int | None = None  # None = about 8/3 * d_model rounded up to a multiple of 64
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    # mixture of experts (0 = dense SwiGLU FFN)
    n_experts: int = 0
    moe_top_k: int = 2
    moe_shared_expert: bool = False
    moe_expert_hidden: int | None = None  # None = ffn_hidden
    moe_aux_loss_coef: float = 0.01
    init_std: float = 0.02
    # mixer-specific options (e.g. a delta-rule variant); kept free-form so one dataclass serves all
    mixer_options: dict = field(default_factory=dict)
    # hashed N-gram input embedding (catkit.layers.ngram_embedding); None = plain token embedding.
    # Keys (all optional): max_n, n_splits, table_ratio | table_base, table_dim, amplify, norm,
    # eos_id, use_kernel; see NGRAM_DEFAULTS there.
    ngram: dict | None = None

    def __post_init__(self):
        self.validate()

    @property
    def n_layers(self) -> int:
        return len(self.pattern)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def dim_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def ffn_dim(self) -> int:
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        return 64 * -(-int(8 * self.d_model / 3) // 64)

    def validate(self) -> None:
        from catkit.models.mixers import MIXERS

        for name in ("vocab_size", "d_model", "n_heads", "max_seq_len"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"{name}: expected a positive integer, got {getattr(self, name)!r}")
        for name in ("n_kv_heads", "head_dim", "ffn_hidden", "moe_expert_hidden"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v <= 0):
                raise ValueError(f"{name}: expected a positive integer or None, got {v!r}")
        if not self.pattern:
            raise ValueError("pattern: expected at least one layer letter, got an empty string")
        unknown = sorted(set(self.pattern) - set(MIXERS))
        if unknown:
            raise ValueError(f"pattern: unknown layer letter(s) {unknown}; known: {sorted(MIXERS)}")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(f"d_model: {self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_kv_heads: {self.kv_heads} does not divide n_heads={self.n_heads}")
        if self.dim_head % 2:
            raise ValueError(f"head_dim: RoPE needs an even head dimension, got {self.dim_head}")
        if self.n_experts < 0:
            raise ValueError(f"n_experts: expected >= 0, got {self.n_experts}")
        if self.n_experts and not 1 <= self.moe_top_k <= self.n_experts:
            raise ValueError(f"moe_top_k: expected 1..n_experts={self.n_experts}, got {self.moe_top_k}")
        if self.ngram is not None:
            from catkit.layers.ngram_embedding import ngram_options

            ngram_options(self.ngram, self.vocab_size, self.d_model)

