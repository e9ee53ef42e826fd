"""Suite ``attention``: dense causal attention, catkit's Triton kernel vs PyTorch SDPA.

catkit's dense path is the block-sparse kernel with a window that covers every block, so this
suite exercises the harness and tells how far the shared attention kernel is from FlashAttention
(SDPA's flash backend) when nothing is skipped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from catkit.bench.registry import register, time_cuda
from catkit.utils.testing import rel_rms

H, HKV, D, BLOCK = 32, 8, 128, 128


def _sdpa(q, k, v):
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                       enable_gqa=True)
    return o.transpose(1, 2)


def _catkit(q, k, v):
    from catkit.ops.sparse_attention import streaming_attention

    blocks = -(-q.shape[1] // BLOCK)
    return streaming_attention(q, k, v, sink_blocks=0, recent_blocks=blocks, block_size=BLOCK)


def _grads(fn, q, k, v, do):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    o = fn(q, k, v)
    o.backward(do)
    return o.detach(), q.grad, k.grad, v.grad


@register("attention", "dense causal attention: catkit Triton kernel vs SDPA (flash), fwd and fwd+bwd", needs_gpu=True)
def bench_attention(quick: bool) -> list[dict]:
    rows = []
    for t in [4096] if quick else [4096, 16384, 32768]:
        q = torch.randn(1, t, H, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, t, HKV, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(1, t, HKV, D, device="cuda", dtype=torch.bfloat16)
        do = torch.randn_like(q)
        # correctness in the same run: every output and gradient vs SDPA
        ours, ref = _grads(_catkit, q, k, v, do), _grads(_sdpa, q, k, v, do)
        err = max(rel_rms(a.float(), b.float()) for a, b in zip(ours, ref))
        flops_fwd = 4 * t * t / 2 * H * D  # causal: half of QK^T and PV
        for mode, mult in (("fwd", 1.0), ("fwd+bwd", 3.5)):
            def run(fn):
                if mode == "fwd":
                    return lambda: fn(q, k, v)
                qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
                return lambda: fn(qq, kk, vv).backward(do)

            ms_ours, ms_sdpa = time_cuda(run(_catkit)), time_cuda(run(_sdpa))
            rows.append({
                "case": mode, "T": t, "ms_catkit": ms_ours, "ms_sdpa": ms_sdpa, "ratio_sdpa_over_catkit": ms_sdpa / ms_ours,
                "tflops_catkit": flops_fwd * mult / ms_ours / 1e9, "tflops_sdpa": flops_fwd * mult / ms_sdpa / 1e9,
                "max_rel_rms_vs_sdpa": err, "correct": err < 2e-2,
            })
    return rows
