"""Tensor-parallel copy of a ``CatModel`` (dense attention letters + SwiGLU FFN), Megatron split.

``tensor_parallel_model(model, group, comm=...)`` returns a new ``CatModel`` for this rank:

* attention: rank r keeps query heads ``[r * Hq/W, (r+1) * Hq/W)`` and KV heads
  ``[r * Hk/W, (r+1) * Hk/W)``; with GQA (``Hq = m * Hk``) query head h reads KV head ``h // m``,
  so those are exactly the KV heads its query heads need. The fused ``qkv`` projection becomes
  column parallel (this rank's q, k and v rows), the ``out`` projection a
  :class:`RowParallelLinear` whose partial sums go through ``comm`` (exact or Flash Communication).
  The shard is an ordinary :class:`~catkit.layers.attention.Attention` with ``Hq/W`` and ``Hk/W``
  heads, so prefill, decode caches and variable-length batches work unchanged.
* SwiGLU: ``gate_up`` column parallel (this rank's gate rows and the matching up rows), ``down``
  row parallel with ``comm``. One block costs two all-reduces of ``[B, T, d_model]``.
* embedding, norms and the LM head are replicated (every rank computes the full logits).

``Hk`` (``n_kv_heads``) must be divisible by W (``ValueError`` otherwise; ``Hq`` then is too) and so
must the FFN width. MoE FFNs and the linear-attention mixers are not sharded (``ValueError``).

Launch (every rank builds the same full model from one seed, then keeps its shard)::

    torchrun --nproc-per-node 2 -m catkit.dist.tp_model          # TP logits vs the full model
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn

from catkit.dist.flash_all_reduce import CommConfig
from catkit.dist.tensor_parallel import RowParallelLinear, _rank_world
from catkit.layers.attention import Attention
from catkit.layers.mlp import SwiGLU


def shard_attention(attn: Attention, group=None, comm: CommConfig | None = None) -> Attention:
    """This rank's heads of ``attn`` (an ``Attention`` with ``Hq/W``, ``Hk/W`` heads, row-parallel out)."""
    rank, world = _rank_world(group)
    hq, hk, d = attn.n_heads, attn.n_kv_heads, attn.head_dim
    if hk % world:
        raise ValueError(f"n_kv_heads: {hk} KV heads cannot be split over a tensor-parallel size of {world}")
    hq_r, hk_r = hq // world, hk // world
    w = attn.qkv.weight  # rows: [Hq*d queries | Hk*d keys | Hk*d values]
    q = w[rank * hq_r * d:(rank + 1) * hq_r * d]
    k = w[(hq + rank * hk_r) * d:(hq + (rank + 1) * hk_r) * d]
    v = w[(hq + hk + rank * hk_r) * d:(hq + hk + (rank + 1) * hk_r) * d]
    d_model = w.shape[1]
    with torch.device("meta"):  # no random init of weights that are overwritten next
        shard = Attention(d_model, hq_r, hk_r, d, mode=attn.mode, streaming=attn.streaming)
    shard = shard.to_empty(device=w.device).to(w.dtype)
    shard.use_kernels = attn.use_kernels
    with torch.no_grad():
        shard.qkv.weight.copy_(torch.cat([q, k, v], 0))
    if attn.loza_gate is not None:
        shard.loza_gate = nn.Parameter(attn.loza_gate.detach().clone())
    shard.out = RowParallelLinear.from_linear(attn.out, group, comm=comm)
    return shard


def shard_swiglu(ffn: SwiGLU, group=None, comm: CommConfig | None = None) -> SwiGLU:
    """This rank's slice of the hidden units of ``ffn`` (column-parallel gate_up, row-parallel down)."""
    rank, world = _rank_world(group)
    w = ffn.gate_up.weight  # rows: [hidden gate | hidden up]
    hidden = w.shape[0] // 2
    if hidden % world:
        raise ValueError(f"ffn_hidden: {hidden} hidden units cannot be split over a tensor-parallel size of {world}")
    h_r = hidden // world
    with torch.device("meta"):
        shard = SwiGLU(w.shape[1], h_r)
    shard = shard.to_empty(device=w.device).to(w.dtype)
    with torch.no_grad():
        shard.gate_up.weight.copy_(torch.cat([w[rank * h_r:(rank + 1) * h_r],
                                              w[hidden + rank * h_r:hidden + (rank + 1) * h_r]], 0))
    shard.down = RowParallelLinear.from_linear(ffn.down, group, comm=comm)
    return shard


def set_comm(model: nn.Module, comm: CommConfig) -> None:
    """Switch every row-parallel layer of a TP model to ``comm`` (no weights move)."""
    if not isinstance(comm, CommConfig):
        raise ValueError(f"comm: expected a CommConfig, got {type(comm).__name__}")
    for m in model.modules():
        if isinstance(m, RowParallelLinear):
            m.comm = comm


def tensor_parallel_model(model: nn.Module, group=None, *, comm: CommConfig | None = None) -> nn.Module:
    """A TP copy of ``model`` (a ``CatModel``) holding this rank's shard; ``model`` is not changed.

    Args:
        model: a ``catkit.models.CatModel`` whose layers are ``Attention`` mixers (letters ``A``,
            ``S``) with ``SwiGLU`` FFNs; the same weights on every rank (build it from one seed).
        group: the tensor-parallel process group (default: the world).
        comm: how row-parallel outputs are reduced: ``CommConfig("exact")`` (default) or e.g.
            ``CommConfig("flash", bits=4, gather_bits=8)`` (INT6 Flash Communication).

    Returns a ``CatModel`` (same class and config; ``forward``/``generate``/caches work as before)
    whose logits ``[B, T, vocab]`` are the full model's on every rank (up to fp32 summation
    order with ``exact``, within the quantization bound with ``flash``).

    Example (2 ranks)::

        tp = tensor_parallel_model(CatModel(cfg).cuda(), comm=CommConfig("flash", bits=8))
        logits = tp(ids).logits
    """
    from catkit.models.model import CatModel

    if not isinstance(model, CatModel):
        raise ValueError(f"model: expected a catkit CatModel, got {type(model).__name__}")
    if model.cfg.n_experts:
        raise ValueError("model: MoE FFNs (n_experts > 0) are not tensor-parallel here; use a dense SwiGLU config")
    if dist.is_initialized() and dist.get_world_size(group) < 1:
        raise ValueError("group: this rank is not a member of the tensor-parallel group")
    memo = {}
    for i, block in enumerate(model.blocks):
        if not isinstance(block.mixer, Attention):
            raise ValueError(f"model: layer {i} mixer {type(block.mixer).__name__} is not sharded; "
                             "only attention layers (letters A, S) are tensor parallel")
        memo[id(block.mixer)] = shard_attention(block.mixer, group, comm)
        memo[id(block.ffn)] = shard_swiglu(block.ffn, group, comm)
    # deepcopy with the shards pre-placed in the memo: the rest (embedding, norms, head) is copied
    # once and the full mixer / FFN weights are never duplicated
    return copy.deepcopy(model, memo)


def main() -> None:
    """torchrun entry point: TP logits vs the full model's, exact and INT8/INT6 compressed."""
    from catkit import env
    from catkit.models.config import ModelConfig
    from catkit.models.model import CatModel
    from catkit.utils.testing import rel_rms

    rank, local_rank, world = env.distributed_rank()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    dev = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    try:
        torch.manual_seed(0)
        cfg = ModelConfig(d_model=256, n_heads=8, n_kv_heads=max(world, 2), pattern="AAAA", max_seq_len=512)
        full = CatModel(cfg).to(dev)
        ids = torch.randint(0, cfg.vocab_size, (2, 256), device=dev)
        with torch.no_grad():
            ref = full(ids).logits.float()
            for name, comm in (("exact", CommConfig()), ("int8", CommConfig("flash", bits=8, min_bytes=0)),
                               ("int6", CommConfig("flash", bits=4, gather_bits=8, min_bytes=0))):
                out = tensor_parallel_model(full, comm=comm)(ids).logits.float()
                if rank == 0:
                    top1 = (out.argmax(-1) == ref.argmax(-1)).float().mean()
                    print(f"tp={world} {name}: rel rms {rel_rms(out, ref):.2e}, top-1 agreement {top1:.4f}",
                          flush=True)
        dist.barrier()  # no rank tears its connections down while a peer still uses them
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
