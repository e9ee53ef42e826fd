import pytest
import torch

from catkit.data import PackedDataset
from catkit.models import ModelConfig
from catkit.train import TrainConfig


@pytest.fixture
def small_setup():
    """A tiny model, a tiny train config and random-token datasets (no corpus read)."""
    g = torch.Generator().manual_seed(123)
    # learnable documents: a motif of 8 letters repeated, so the loss can fall well below ln(256)
    docs = []
    for n in torch.randint(50, 400, (40,), generator=g).tolist():
        motif = torch.randint(65, 73, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g)
        docs.append(motif.repeat(n // len(motif) + 1)[:n].tolist())
    model_cfg = ModelConfig(d_model=32, n_heads=4, n_kv_heads=2, pattern="AA", max_seq_len=64, n_experts=4)
    train_cfg = TrainConfig(steps=6, batch_size=8, seq_len=32, lr=1e-3, warmup_steps=2, eval_every=3,
                            eval_batches=2, ckpt_every=3, log_every=1, precision="fp32", device="cpu")
    return model_cfg, train_cfg, PackedDataset(docs[:30], 32), PackedDataset(docs[30:], 32)
