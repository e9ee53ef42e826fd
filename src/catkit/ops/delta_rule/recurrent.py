"""Fused recurrent delta rule for decode (T = 1 or a few tokens per sequence).

Forward only: one program keeps a [K, BV] slice of a sequence/head's fp32 state in registers and
steps token by token, which beats the chunked path when T is far below the chunk size. Its outputs
carry no gradient (the Function's backward raises); train with ``chunk_fg2_delta_rule``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from catkit.ops.delta_rule.chunk import validate
from catkit.ops.delta_rule.scaled import scaled_kv


@triton.jit
def fused_recurrent_kernel(q, k, v, g, o, h0, ht, cu_seqlens, scale,
                           H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                           BK: tl.constexpr, BV: tl.constexpr, G_SCALAR: tl.constexpr,
                           HAS_H0: tl.constexpr, STORE_FINAL: tl.constexpr):
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n = i_nh // H
    i_h = i_nh % H
    bos = tl.load(cu_seqlens + i_n)
    eos = tl.load(cu_seqlens + i_n + 1)
    ck = tl.arange(0, BK)
    cv = i_v * BV + tl.arange(0, BV)
    mk = ck < K
    mv = cv < V
    mkv = mk[:, None] & mv[None, :]
    off_s = i_h * K * V + ck[:, None] * V + cv[None, :]
    b_S = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        b_S = tl.load(h0 + i_n * H * K * V + off_s, mask=mkv, other=0.0).to(tl.float32)
    for t in range(bos, eos):
        b_q = tl.load(q + t * H * K + i_h * K + ck, mask=mk, other=0.0).to(tl.float32)
        b_k = tl.load(k + t * H * K + i_h * K + ck, mask=mk, other=0.0).to(tl.float32)
        b_v = tl.load(v + t * H * V + i_h * V + cv, mask=mv, other=0.0).to(tl.float32)
        if G_SCALAR:
            b_g = tl.load(g + t * H + i_h + ck * 0).to(tl.float32)
        else:
            b_g = tl.load(g + t * H * K + i_h * K + ck, mask=mk, other=0.0).to(tl.float32)
        b_S = b_S * tl.exp(b_g)[:, None]
        b_u = b_v - tl.sum(b_S * b_k[:, None], axis=0)
        b_S += b_k[:, None] * b_u[None, :]
        b_o = tl.sum(b_S * b_q[:, None], axis=0) * scale
        tl.store(o + t * H * V + i_h * V + cv, b_o.to(o.dtype.element_ty), mask=mv)
    if STORE_FINAL:
        tl.store(ht + i_n * H * K * V + off_s, b_S, mask=mkv)


def fused_recurrent_fwd(q, kt, vt, g, scale, initial_state, output_final_state, cu_seqlens):
    """Flattened launcher: ``q, kt [NTOK,H,K]``, ``vt [NTOK,H,V]``, ``g [NTOK,H(,K)]``."""
    NTOK, H, K = q.shape
    V = vt.shape[-1]
    N = cu_seqlens.numel() - 1
    BK = max(16, triton.next_power_of_2(K))
    BV = min(64, max(16, triton.next_power_of_2(V)))
    o = torch.empty(NTOK, H, V, device=q.device, dtype=q.dtype)
    ht = torch.empty(N, H, K, V, device=q.device, dtype=torch.float32) if output_final_state else o
    h0 = initial_state.float().contiguous() if initial_state is not None else o
    fused_recurrent_kernel[(triton.cdiv(V, BV), N * H)](
        q, kt, vt, g, o, h0, ht, cu_seqlens, scale, H=H, K=K, V=V, BK=BK, BV=BV,
        G_SCALAR=g.dim() == 2, HAS_H0=initial_state is not None, STORE_FINAL=output_final_state,
        num_warps=4, num_stages=1)
    return o, (ht if output_final_state else None)


class FusedRecurrentFunction(torch.autograd.Function):
    """Forward-only wrapper so that a backward through decode fails loudly, not silently."""

    @staticmethod
    def forward(ctx, q, kt, vt, g, scale, initial_state, output_final_state, cu_seqlens):
        B, T, H, K = q.shape
        V = vt.shape[-1]
        if cu_seqlens is None:
            cu = torch.arange(0, (B + 1) * T, T, device=q.device, dtype=torch.int32)
        else:
            cu = cu_seqlens.to(torch.int32).contiguous()
        flat = lambda x: x.reshape(B * T, *x.shape[2:]).contiguous()  # noqa: E731
        o, ht = fused_recurrent_fwd(flat(q), flat(kt), flat(vt), flat(g), scale, initial_state,
                                    output_final_state, cu)
        return o.reshape(B, T, H, V), ht

    @staticmethod
    def backward(ctx, do, dht):
        raise NotImplementedError("fused_recurrent_fg2_delta_rule is forward-only (decode); "
                                  "use chunk_fg2_delta_rule for training")


def fused_recurrent_fg2_delta_rule(q, k, v, g, bk, bv=None, *, scale=None, initial_state=None,
                                   output_final_state=False, cu_seqlens=None):
    """Decode-time FG2-GDN / FG2-GDN+; same arguments and returns as ``chunk_fg2_delta_rule``.

    Shapes: ``q, k [B, T, H, K]``, ``v [B, T, H, V]``, ``g [B, T, H]`` or ``[B, T, H, K]``,
    ``bk [B, T, H, K]``, ``bv [B, T, H, V]`` or None, ``initial_state [N, H, K, V]``.
    Forward only (no gradients). Example, one decode step after a chunked prefill::

        _, s = chunk_fg2_delta_rule(q[:, :-1], k[:, :-1], v[:, :-1], g[:, :-1], bk[:, :-1],
                                    output_final_state=True)
        o, s = fused_recurrent_fg2_delta_rule(q[:, -1:], k[:, -1:], v[:, -1:], g[:, -1:],
                                              bk[:, -1:], initial_state=s, output_final_state=True)
    """
    validate(q, k, v, g, bk, bv, scale, initial_state, cu_seqlens, need_square=True)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    kt, vt, check_rates = scaled_kv(k, v, bk, bv)
    out = FusedRecurrentFunction.apply(q, kt, vt, g, scale, initial_state, output_final_state,
                                       cu_seqlens)
    check_rates()  # after the kernel is queued: the GPU does not idle for the host's read
    return out


def fused_recurrent_gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None,
                                     output_final_state=False, cu_seqlens=None):
    """Decode-time GDN/KDA (``g [B,T,H]`` or ``[B,T,H,K]``, scalar ``beta [B,T,H]``); forward only."""
    validate(q, k, v, g, beta, None, scale, initial_state, cu_seqlens, need_square=False,
             rate_names=("beta", "beta"))
    if beta.dim() != 3:
        raise ValueError(f"beta: expected a scalar rate per token and head, shape {tuple(q.shape[:3])}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    kt, vt, check_rates = scaled_kv(k, v, beta, None, names=("beta", "beta"))
    out = FusedRecurrentFunction.apply(q, kt, vt, g, scale, initial_state, output_final_state,
                                       cu_seqlens)
    check_rates()
    return out
