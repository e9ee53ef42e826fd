"""Benchmark suite ``sparse_attention``: LoZA streaming attention vs SDPA (dense) and FlexAttention.

Prefill: sink 128 tokens (1 block) + window 1024 tokens (8 blocks of 128), 32 query / 8 KV heads,
d = 128, bf16, batch 1, at 32K/64K/128K, forward and forward+backward, against SDPA dense causal
and torch.compile'd FlexAttention with the same block-aligned mask (built from block lists, the
way a user would for long sequences). Decode: batch 8 over a paged cache (64-token pages,
shuffled) vs SDPA dense decode over a contiguous cache. Each row carries ``correct`` from checks in
the same process, and the ratio's limit: the FLOP ratio for prefill, the byte ratio for decode.
"""

from __future__ import annotations

import math
import time

import torch

from catkit.bench.registry import register, time_cuda
from catkit.ops.sparse_attention import paged_decode_attention, streaming_attention
from catkit.utils.testing import rel_rms

H, HKV, D, BS, SINK, RECENT = 32, 8, 128, 128, 1, 8
TOL = 2e-2  # bf16 vs bf16 (or vs fp32) relative RMS


def _window_lo(qb: torch.Tensor) -> torch.Tensor:
    w_lo = (qb - RECENT + 1).clamp_min(0)
    return torch.where(qb < SINK, torch.minimum(w_lo, qb), w_lo)


def _pairs_streaming(T: int) -> int:
    """Exact number of (query, key) pairs the streaming pattern allows (FLOPs = 4 * D * H * pairs)."""
    p = torch.arange(T, dtype=torch.int64)
    w_lo = _window_lo(p // BS)
    return int((torch.minimum(torch.full_like(w_lo, SINK), w_lo) * BS + p - w_lo * BS + 1).sum())


def _flex_block_mask(T: int, device):
    """FlexAttention BlockMask: diagonal block partial (causal mask_mod), sinks + window full."""
    from torch.nn.attention.flex_attention import BlockMask

    nb = (T + BS - 1) // BS
    qb = torch.arange(nb, device=device)
    w_lo = _window_lo(qb)
    n_sink = torch.minimum(torch.full_like(w_lo, SINK), w_lo)
    width = nb  # BlockMask reads the number of KV blocks from the index width
    slot = torch.arange(width, device=device)[None, :]
    n_full = n_sink + (qb - w_lo)
    full = torch.where(slot < n_sink[:, None], slot, w_lo[:, None] + slot - n_sink[:, None])
    full = torch.where(slot < n_full[:, None], full, 0).int()

    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx

    diag = torch.zeros(nb, width, dtype=torch.int32, device=device)
    diag[:, 0] = qb.int()
    return BlockMask.from_kv_blocks(
        torch.ones(1, 1, nb, dtype=torch.int32, device=device), diag.view(1, 1, nb, width),
        n_full.int().view(1, 1, nb), full.view(1, 1, nb, width), BLOCK_SIZE=BS, mask_mod=causal,
        seq_lengths=(T, T))


def _dense_mask(T: int, device) -> torch.Tensor:
    pos = torch.arange(T, device=device)
    qb, kb = pos[:, None] // BS, pos[None, :] // BS
    return (pos[None, :] <= pos[:, None]) & ((kb < SINK) | ((kb >= _window_lo(qb)) & (kb <= qb)))


def _check_flex_mask(device) -> float:
    """Our streaming kernel and flex with our BlockMask both vs fp32 SDPA with the dense mask (4K)."""
    from torch.nn.attention.flex_attention import flex_attention

    T = 4096
    q, k, v = (torch.randn(1, T, h, D, device=device, dtype=torch.bfloat16) for h in (H, HKV, HKV))
    qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(
        qt.float(), kt.float().repeat_interleave(H // HKV, 1), vt.float().repeat_interleave(H // HKV, 1),
        attn_mask=_dense_mask(T, device))
    flex = torch.compile(flex_attention)(qt, kt, vt, block_mask=_flex_block_mask(T, device), enable_gqa=True)
    ours = streaming_attention(q, k, v, sink_blocks=SINK, recent_blocks=RECENT, block_size=BS).transpose(1, 2)
    return max(rel_rms(flex, ref), rel_rms(ours, ref))


def _prefill_rows(T: int, flex_fn, device, mask_err: float) -> list[dict]:
    q, k, v = (torch.randn(1, T, h, D, device=device, dtype=torch.bfloat16).requires_grad_() for h in (H, HKV, HKV))
    do = torch.randn_like(q)
    qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
    dot = do.transpose(1, 2).contiguous()
    bm = _flex_block_mask(T, device)

    ours = lambda: streaming_attention(q, k, v, sink_blocks=SINK, recent_blocks=RECENT, block_size=BS)  # noqa
    flex = lambda: flex_fn(qt, kt, vt, block_mask=bm, enable_gqa=True)  # noqa: E731
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)  # noqa

    # Correctness first (forward and all gradients, ours vs flex on the same inputs).
    t0 = time.time()
    o1 = ours()
    g1 = torch.autograd.grad(o1, (q, k, v), do)
    o2 = flex()
    g2 = torch.autograd.grad(o2, (qt, kt, vt), dot)
    errs = [rel_rms(o1.transpose(1, 2), o2)] + [rel_rms(a.transpose(1, 2), b) for a, b in zip(g1, g2)]
    from catkit.ops.sparse_attention import prefill_bwd, prefill_fwd

    tiles = {n: str(getattr(k, "best_config", None)) for n, k in
             (("fwd", prefill_fwd._fwd_kernel_tuned), ("dq", prefill_bwd._dq_kernel_tuned))}
    print(f"[prefill T={T}] autotuned tiles: {tiles}; dkdv fixed {prefill_fwd.GPU_TILES['dkdv'][BS]}")
    correct = max(errs) < TOL and mask_err < TOL
    print(f"[prefill T={T}] ours vs flex rel RMS o/dq/dk/dv = {[f'{e:.2e}' for e in errs]} "
          f"(first calls {time.time() - t0:.1f}s)")
    del o1, g1, o2, g2

    fb = lambda fn, xs, g: (lambda: torch.autograd.grad(fn(), xs, g))  # noqa: E731
    ms = {
        "fwd": (time_cuda(ours), time_cuda(flex), time_cuda(sdpa)),
        "fwd+bwd": (time_cuda(fb(ours, (q, k, v), do)), time_cuda(fb(flex, (qt, kt, vt), dot)),
                    time_cuda(fb(sdpa, (qt, kt, vt), dot))),
    }
    pairs, dense_pairs = _pairs_streaming(T), T * (T + 1) // 2
    rows = []
    for case, (m_ours, m_flex, m_sdpa) in ms.items():
        flops = 4 * D * H * pairs * (1.0 if case == "fwd" else 3.5)  # bwd: 5 matmuls vs fwd's 2
        rows.append({
            "case": f"prefill {case}", "T": T, "ms_catkit": m_ours, "ms_flex": m_flex, "ms_sdpa": m_sdpa,
            "speedup_vs_flex": m_flex / m_ours, "speedup_vs_sdpa": m_sdpa / m_ours,
            "limit_vs_sdpa_flops": dense_pairs / pairs, "tflops_catkit": flops / m_ours / 1e9,
            "max_rel_rms_vs_flex": max(errs), "correct": correct,
        })
    return rows


def _graphed(fn):
    """A CUDA graph of ``fn`` (warmed up on a side stream first); returns its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _decode_rows(L: int, device, B: int = 8, page: int = 64) -> list[dict]:
    k = torch.randn(B, HKV, L, D, device=device, dtype=torch.bfloat16)
    v = torch.randn(B, HKV, L, D, device=device, dtype=torch.bfloat16)
    q = torch.randn(B, H, D, device=device, dtype=torch.bfloat16)
    n_pages = B * L // page
    perm = torch.randperm(n_pages, device=device)
    kc = torch.empty(n_pages, page, HKV, D, device=device, dtype=torch.bfloat16)
    vc = torch.empty_like(kc)
    kc[perm] = k.transpose(1, 2).reshape(n_pages, page, HKV, D)
    vc[perm] = v.transpose(1, 2).reshape(n_pages, page, HKV, D)
    bt = perm.view(B, L // page).int()
    sl = torch.full((B,), L, dtype=torch.int32, device=device)

    stream = lambda: paged_decode_attention(q, kc, vc, bt, sl, sink_blocks=SINK, recent_blocks=RECENT,  # noqa
                                            block_size=BS, validate=False)
    dense = lambda: paged_decode_attention(q, kc, vc, bt, sl, block_size=BS, validate=False)  # noqa: E731
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)  # noqa

    # Streaming reference: fp32 attention over exactly the selected tokens (sinks + window).
    w_lo = int(_window_lo(torch.tensor((L - 1) // BS)))
    sel = torch.cat([torch.arange(min(SINK, w_lo) * BS), torch.arange(w_lo * BS, L)]).to(device)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, None].float(), k[:, :, sel].float().repeat_interleave(H // HKV, 1),
        v[:, :, sel].float().repeat_interleave(H // HKV, 1))[:, :, 0]
    err_stream = rel_rms(stream(), ref)
    err_dense = rel_rms(dense(), sdpa()[:, :, 0])
    print(f"[decode L={L}] streaming vs fp32 {err_stream:.2e}, dense paged vs SDPA {err_dense:.2e}")

    m_stream, m_dense, m_sdpa = time_cuda(stream), time_cuda(dense), time_cuda(sdpa)
    # Serving engines replay decode steps from CUDA graphs; timing both sides graphed shows the
    # kernels without Python launch overhead (which dominates a ~10 us kernel when run eagerly).
    g_stream, g_sdpa = time_cuda(_graphed(stream)), time_cuda(_graphed(sdpa))
    kv_bytes = lambda n: 2 * B * n * HKV * D * 2  # noqa: E731
    return [{
        "case": "decode", "T": L, "batch": B, "ms_catkit": m_stream, "ms_catkit_dense": m_dense, "ms_sdpa": m_sdpa,
        "speedup_vs_sdpa": m_sdpa / m_stream, "ms_catkit_graph": g_stream, "ms_sdpa_graph": g_sdpa,
        "speedup_vs_sdpa_graph": g_sdpa / g_stream, "limit_vs_sdpa_bytes": L / len(sel),
        "dense_vs_sdpa": m_sdpa / m_dense, "tbps_catkit_dense": kv_bytes(L) / m_dense / 1e9,
        "tbps_catkit": kv_bytes(len(sel)) / m_stream / 1e9, "max_rel_rms": max(err_stream, err_dense),
        "correct": err_stream < TOL and err_dense < TOL,
    }]


@register("sparse_attention", "LoZA streaming attention: prefill vs SDPA/FlexAttention, paged decode vs SDPA",
          needs_gpu=True)
def bench_sparse_attention(quick: bool) -> list[dict]:
    from torch.nn.attention.flex_attention import flex_attention

    device = torch.device("cuda")
    torch.manual_seed(0)
    lengths = [32768] if quick else [32768, 65536, 131072]
    mask_err = _check_flex_mask(device)
    print(f"[flex mask check, 4K] max rel RMS vs fp32 SDPA with the dense mask: {mask_err:.2e}")
    flex_fn = torch.compile(flex_attention)
    rows = []
    for T in lengths:
        rows += _prefill_rows(T, flex_fn, device, mask_err)
        torch.cuda.empty_cache()
    for L in lengths:
        rows += _decode_rows(L, device)
        torch.cuda.empty_cache()
    return rows


def sweep(T: int = 32768, configs: dict | None = None) -> None:
    """Tile sweep for the prefill kernels (prints ms per config; checks each against the default)."""
    device = torch.device("cuda")
    q, k, v = (torch.randn(1, T, h, D, device=device, dtype=torch.bfloat16).requires_grad_() for h in (H, HKV, HKV))
    do = torch.randn_like(q)
    kw = dict(sink_blocks=SINK, recent_blocks=RECENT, block_size=BS)
    o0 = streaming_attention(q, k, v, **kw)
    g0 = torch.autograd.grad(o0, (q, k, v), do)
    configs = configs or {
        "dkdv": [(32, 64, 4, 2), (32, 64, 4, 3), (16, 64, 4, 2), (32, 64, 8, 2), (64, 64, 8, 2), (32, 128, 8, 2)],
    }
    for kind, cfgs in configs.items():
        for cfg in cfgs:
            tiles = {kind: cfg}
            fn = lambda: streaming_attention(q, k, v, **kw, _tiles=tiles)  # noqa: E731
            try:
                o = fn()
                g = torch.autograd.grad(o, (q, k, v), do)
                err = max([rel_rms(o, o0)] + [rel_rms(a, b) for a, b in zip(g, g0)])
                if kind == "fwd":
                    ms = time_cuda(fn)
                else:
                    ms = time_cuda(lambda: torch.autograd.grad(fn(), (q, k, v), do))
                print(f"[sweep T={T}] {kind} {cfg}: {ms:.3f} ms{' (fwd+bwd)' if kind != 'fwd' else ''}, "
                      f"max rel RMS vs default {err:.1e}", flush=True)
            except Exception as e:  # a config that fails to compile is reported, not fatal
                print(f"[sweep T={T}] {kind} {cfg}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
