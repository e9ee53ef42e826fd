"""``TrainConfig`` and the named presets (model + training settings) used by the CLI."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from catkit.models.config import ModelConfig
from catkit.utils.config import ConfigMixin


@dataclass
class TrainConfig(ConfigMixin):
    steps: int = 300
    batch_size: int = 16  # sequences per optimizer step, over all ranks and micro-batches
    seq_len: int = 128
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 8
    ckpt_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    precision: str = "auto"  # auto = bf16 autocast on CUDA, fp32 on CPU; or "fp32" / "bf16"
    corpus_max_bytes: int | None = 4_000_000  # cap on the built-in corpus read (None = all)
    device: str = "auto"

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_every", "eval_batches",
                     "ckpt_every", "log_every", "keep_checkpoints"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name}: expected a positive integer, got {v!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps: expected >= 0, got {self.warmup_steps}")
        if self.lr <= 0:
            raise ValueError(f"lr: expected > 0, got {self.lr}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"grad_accum: {self.grad_accum} does not divide batch_size={self.batch_size}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision: expected auto, fp32 or bf16, got {self.precision!r}")



# name -> (model config, train config). "tiny" finishes in a few minutes on 2 CPU cores.
PRESETS: dict[str, tuple[ModelConfig, TrainConfig]] = {
    "tiny": (
        ModelConfig(d_model=128, pattern="AAAA", n_heads=4, n_kv_heads=2, max_seq_len=256),
        TrainConfig(steps=800, batch_size=16, seq_len=128, lr=3e-3, warmup_steps=50, eval_every=100,
                    ckpt_every=200, log_every=10, corpus_max_bytes=4_000_000),
    ),
    "small": (
        ModelConfig(d_model=512, pattern="AAAAAAAA", n_heads=8, n_kv_heads=4, max_seq_len=1024),
        TrainConfig(steps=1000, batch_size=32, seq_len=512, lr=1.5e-3, warmup_steps=100, eval_every=250,
                    ckpt_every=250, eval_batches=16, corpus_max_bytes=None),
    ),
}


def preset(name: str) -> tuple[ModelConfig, TrainConfig]:
    """Fresh copies of a preset's configs."""
    if name not in PRESETS:
        raise ValueError(f"preset: unknown preset {name!r}; choose from {sorted(PRESETS)}")
    m, t = PRESETS[name]
    return dataclasses.replace(m), dataclasses.replace(t)
