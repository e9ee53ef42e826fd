"""Benchmark suite ``ngram``: the fused N-gram ids + gather kernel and its sparse backward against
plain PyTorch (torch hash + one ``F.embedding`` per table), with the device copy bandwidth
measured in the same run as the ceiling.

Shape (issue 7 / GPU.md anchor): N = 4, K = 4 -> 12 tables of about 1M rows x 256 dims, 64K
tokens drawn uniformly from a 128K vocabulary (random rows: no reuse in L2, the worst case the
kernel must still stream at bandwidth). ``quick``: 16K tokens, 256K-row tables.

Rows (``op``):
- ``copy``: ``dst.copy_(src)`` of 2 GiB, bytes = read + write; ``copy_GBps`` is the ceiling every
  other row's ``frac_of_copy`` refers to.
- ``ids``: hash ids of all tables, fused kernel vs the vectorized torch hash (``naive.py``).
- ``fwd``: bf16 tables; ours = one kernel (ids + gather into ``[T, 12, 256]``); anchors:
  ``plain_gather`` = the 12 ``F.embedding`` calls on precomputed ids (GPU.md's 0.90 TB/s figure),
  ``plain`` = torch hash + 12 ``F.embedding`` + stack (what a user writes without the kernel).
  Bytes = rows read + rows written + ids written.
- ``bwd_accumulate``: fp32 tables (training keeps fp32 master weights) and fp32 output gradients;
  the sparse part only: ours = atomic adds into a preallocated fp32 gradient; anchor = one
  ``index_add_`` per table into preallocated per-table gradients. Bytes = gradient read + row
  read-modify-write.
- ``bwd_autograd``: the whole backward autograd runs (dense gradient: zero-fill of every table
  plus the sparse part) for ours and for 12 ``F.embedding``; bytes add the zero-fill.
``correct``: ids equal the big-integer reference on a slice and the torch hash everywhere; fused
rows equal the plain gathers exactly; fused gradients match the plain ones to 1e-5 relative RMS.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from catkit.bench.registry import register, time_cuda
from catkit.ops.ngram import NgramSpec, naive, ngram_embedding, ngram_embedding_bwd, ngram_hash_ids
from catkit.utils.testing import rel_rms

MAX_N, N_SPLITS, D_E, VOCAB = 4, 4, 256, 131072


def _copy_gbps(device, nbytes: int) -> tuple[float, float]:
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = time_cuda(lambda: dst.copy_(src))
    return ms, 2 * nbytes / ms / 1e6


def _row(op, ms, nbytes, copy_gbps, **extra):
    gbps = nbytes / ms / 1e6
    return {"op": op, "ms": ms, "GBps": gbps, "frac_of_copy": gbps / copy_gbps, **extra}


def run(tokens: int, table_base: int, device, copy_bytes: int, vocab: int = VOCAB, d_e: int = D_E) -> list[dict]:
    """All rows at one size (``device="cpu"`` under TRITON_INTERPRET=1 is a logic smoke run)."""
    spec = NgramSpec(vocab, MAX_N, N_SPLITS, table_base)
    kw = spec.kwargs()
    nt = spec.n_tables
    gen = torch.Generator(device=device).manual_seed(0)
    tok = torch.randint(0, vocab, (tokens,), device=device, generator=gen)
    cu = torch.tensor([0, tokens // 3, tokens], device=device, dtype=torch.int64)
    eos = 2
    copy_ms, copy_gbps = _copy_gbps(device, copy_bytes)
    rows = [{"op": "copy", "ms": copy_ms, "GBps": copy_gbps, "frac_of_copy": 1.0, "correct": True}]
    shape = f"T={tokens} tables={nt}x{spec.sizes[0]}x{d_e}"

    # ---- ids
    ids = ngram_hash_ids(tok, cu_seqlens=cu, eos_id=eos, **kw)
    ids_ref = naive.ngram_hash_ids(tok, cu_seqlens=cu, eos_id=eos, **kw)
    n_check = min(tokens, 1500)
    big = naive.ngram_hash_ids_bigint(tok[:n_check].cpu(), eos_id=eos, **kw)
    small = ngram_hash_ids(tok[:n_check], eos_id=eos, **kw).cpu()
    ids_ok = bool(torch.equal(ids, ids_ref)) and bool(torch.equal(small, big))
    t_ids = time_cuda(lambda: ngram_hash_ids(tok, cu_seqlens=cu, eos_id=eos, **kw))
    t_ids_ref = time_cuda(lambda: naive.ngram_hash_ids(tok, cu_seqlens=cu, eos_id=eos, **kw))
    id_bytes = tokens * (8 + nt * 8)
    rows.append(_row("ids", t_ids, id_bytes, copy_gbps, shape=shape, plain_ms=t_ids_ref,
                     speedup_vs_plain=t_ids_ref / t_ids, correct=ids_ok))

    # ---- forward, bf16 tables
    w = torch.randn(spec.num_rows, d_e, device=device, generator=gen).to(torch.bfloat16)
    tables = [w[o:o + m] for o, m in zip(spec.offsets, spec.sizes)]
    ids_t = ids.t().contiguous()
    out = ngram_embedding(tok, w, cu_seqlens=cu, eos_id=eos, **kw)

    def plain_gather():
        return [F.embedding(ids_t[t], tables[t]) for t in range(nt)]

    def plain_full():
        i = naive.ngram_hash_ids(tok, cu_seqlens=cu, eos_id=eos, **kw)
        return torch.stack([F.embedding(i[:, t], tables[t]) for t in range(nt)], 1)

    fwd_ok = ids_ok and bool(torch.equal(out, plain_full()))
    del out
    t_f = time_cuda(lambda: ngram_embedding(tok, w, cu_seqlens=cu, eos_id=eos, spec=spec, **kw))
    t_pg = time_cuda(plain_gather)
    t_pf = time_cuda(plain_full)
    gather_bytes = 2 * tokens * nt * d_e * w.element_size()
    rows.append(_row("fwd", t_f, gather_bytes + tokens * nt * 8, copy_gbps, shape=shape, dtype="bf16",
                     plain_gather_ms=t_pg, plain_gather_GBps=gather_bytes / t_pg / 1e6, plain_ms=t_pf,
                     speedup_vs_plain_gather=t_pg / t_f, speedup_vs_plain=t_pf / t_f, correct=fwd_ok))
    del w, tables

    # ---- backward, fp32 master tables
    w32 = torch.randn(spec.num_rows, d_e, device=device, generator=gen).mul_(0.02)
    g = torch.randn(tokens, nt, d_e, device=device, generator=gen)
    gw = torch.zeros_like(w32)
    ngram_embedding_bwd(g, ids, spec, spec.num_rows, grad_weight=gw)
    ref_gw = torch.zeros_like(w32)
    offs = torch.tensor(spec.offsets, device=device)
    ref_gw.index_add_(0, (ids + offs).reshape(-1), g.reshape(-1, d_e))
    acc_ok = ids_ok and rel_rms(gw, ref_gw) < 1e-5
    del ref_gw
    per_table = [torch.zeros(m, d_e, device=device) for m in spec.sizes]

    def plain_accumulate():
        for t in range(nt):
            per_table[t].index_add_(0, ids_t[t], g[:, t])

    t_acc = time_cuda(lambda: ngram_embedding_bwd(g, ids, spec, spec.num_rows, grad_weight=gw))
    t_acc_ref = time_cuda(plain_accumulate)
    del per_table, gw
    sparse_bytes = tokens * nt * (d_e * 4 + 8) + 2 * tokens * nt * d_e * 4
    rows.append(_row("bwd_accumulate", t_acc, sparse_bytes, copy_gbps, shape=shape, dtype="fp32",
                     plain_ms=t_acc_ref, speedup_vs_plain=t_acc_ref / t_acc, correct=acc_ok))

    w32.requires_grad_(True)
    out = ngram_embedding(tok, w32, cu_seqlens=cu, eos_id=eos, spec=spec, **kw)
    leaves = [w32[o:o + m].detach().requires_grad_() for o, m in zip(spec.offsets, spec.sizes)]
    outs = [F.embedding(ids_t[t], leaves[t]) for t in range(nt)]
    gs = [g[:, t] for t in range(nt)]
    (ours,) = torch.autograd.grad(out, w32, g, retain_graph=True)
    theirs = torch.autograd.grad(outs, leaves, gs, retain_graph=True)
    dense_ok = acc_ok and rel_rms(ours, torch.cat(theirs)) < 1e-5
    del ours, theirs
    t_bw = time_cuda(lambda: torch.autograd.grad(out, w32, g, retain_graph=True))
    t_bw_ref = time_cuda(lambda: torch.autograd.grad(outs, leaves, gs, retain_graph=True))
    dense_bytes = sparse_bytes + spec.num_rows * d_e * 4
    rows.append(_row("bwd_autograd", t_bw, dense_bytes, copy_gbps, shape=shape, dtype="fp32",
                     plain_ms=t_bw_ref, speedup_vs_plain=t_bw_ref / t_bw, correct=dense_ok))
    return rows


@register("ngram", "hashed N-gram ids + gather (fused Triton) and sparse backward vs F.embedding per table",
          needs_gpu=True)
def bench_ngram(quick: bool) -> list[dict]:
    if quick:
        return run(16384, 262144, "cuda", 1 << 30)
    return run(65536, 1 << 20, "cuda", 2 << 30)
