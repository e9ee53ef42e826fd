"""Chunked delta rule for training and prefill: FG2-GDN, FG2-GDN+, GDN and KDA on one kernel set.

Levels: the Triton kernels live in ``chunk_fwd.py`` / ``chunk_bwd.py`` (this file would pass 600
lines otherwise); here are the host helpers, one ``torch.autograd.Function`` and the public
functions. All variants are run as the symmetric update on scaled keys/values with beta = 1::

    k~ = sqrt(bk) * k,  v~ = sqrt(bv) * v     (GDN/KDA: bk = bv = beta, a scalar per token)
    S_t = (I - k~_t k~_t^T) Diag(exp(g_t)) S_{t-1} + k~_t v~_t^T,     o_t = scale * S_t^T q_t

The square roots are taken outside the Function (``scaled.py``, one fused pass, fp32 registers),
so autograd carries the rate gradients; the kernels return gradients for q, k~, v~, g and the
initial state.
"""

from __future__ import annotations

import functools

import torch

from catkit.ops.delta_rule.chunk_bwd import chunk_bwd
from catkit.ops.delta_rule.chunk_fwd import chunk_fwd
from catkit.ops.delta_rule.scaled import scaled_kv
from catkit.utils.device import check_tensor

CHUNK_SIZE = 64
MAX_HEAD_DIM = 128  # K and V above this would not fit the per-chunk register tiles
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------- host helpers
def prepare_chunks(cu_seqlens, BT: int, device=None) -> dict:
    """Chunk table for packed sequences: per chunk (sequence, chunk-in-sequence), and offsets.

    ``cu_seqlens``: the offsets as a host sequence (``device`` says where the table goes) or a
    tensor (read once on the host). The table is built on the host, cached per (offsets, BT,
    device) and uploaded in one copy from pinned memory: building it from device tensors took
    three host syncs per call, each an idle GPU while the host caught up."""
    if isinstance(cu_seqlens, torch.Tensor):
        device = cu_seqlens.device if device is None else device
        cu_seqlens = cu_seqlens.tolist()
    return dict(_chunk_table(tuple(cu_seqlens), BT, torch.device(device or "cpu")))


@functools.lru_cache(maxsize=64)
def _chunk_table(cu: tuple, BT: int, device: torch.device) -> dict:
    cu_t = torch.tensor(cu, dtype=torch.int64)
    nch = (cu_t[1:] - cu_t[:-1] + BT - 1) // BT
    offsets = torch.cat([nch.new_zeros(1), nch.cumsum(0)])
    NT = int(offsets[-1])
    seq = torch.repeat_interleave(torch.arange(len(nch)), nch)
    within = torch.arange(NT) - offsets[:-1][seq]
    parts = [cu_t, torch.stack([seq, within], 1).flatten(), offsets]
    # each part padded to 16 bytes: Triton specialises kernels on pointer alignment
    padded = [torch.cat([p, p.new_zeros(-p.numel() % 4)]).to(torch.int32) for p in parts]
    host = torch.cat(padded)
    if device.type == "cuda":
        host = host.pin_memory()
    flat = host.to(device, non_blocking=True)
    cu_d, ci, co = (x[:p.numel()] for x, p in zip(flat.split([x.numel() for x in padded]), parts))
    return dict(cu_seqlens=cu_d, chunk_indices=ci.view(NT, 2), chunk_offsets=co, BT=BT)


def validate(q, k, v, g, bk, bv, scale, initial_state, cu_seqlens, *, need_square: bool,
             rate_names=("bk", "bv")):
    """Shape/dtype/device checks shared by the chunked and recurrent entry points; returns
    ``B, T, H, K, V`` and the sequence offsets as a host tuple (fixed length: multiples of T)."""
    check_tensor("q", q, ndim=4, dtypes=_FLOATS)
    B, T, H, K = q.shape
    check_tensor("k", k, ndim=4, dtypes=_FLOATS, device=q.device)
    check_tensor("v", v, ndim=4, dtypes=_FLOATS, device=q.device)
    if tuple(k.shape) != (B, T, H, K):
        raise ValueError(f"k: expected shape {(B, T, H, K)} like q, got {tuple(k.shape)}")
    if tuple(v.shape[:3]) != (B, T, H):
        raise ValueError(f"v: expected shape [B, T, H, V] = {(B, T, H)} + [V], got {tuple(v.shape)}")
    V = v.shape[-1]
    for name, d in (("q", K), ("v", V)):
        if not 1 <= d <= MAX_HEAD_DIM:
            raise ValueError(f"{name}: head dim {d} not supported; the kernels take 1..{MAX_HEAD_DIM}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"k, v: expected dtype {q.dtype} like q, got {k.dtype} and {v.dtype}")
    check_tensor("g", g, ndim=(3, 4), dtypes=_FLOATS, device=q.device)
    if tuple(g.shape) not in ((B, T, H), (B, T, H, K)):
        raise ValueError(f"g: expected shape {(B, T, H)} or {(B, T, H, K)}, got {tuple(g.shape)}")
    nb, nv = rate_names
    check_tensor(nb, bk, dtypes=_FLOATS, device=q.device)
    if bk.dim() == 3 and tuple(bk.shape) != (B, T, H) or bk.dim() == 4 and tuple(bk.shape) != (B, T, H, K) \
            or bk.dim() not in (3, 4):
        raise ValueError(f"{nb}: expected shape {(B, T, H, K)}{' or ' + str((B, T, H)) if nb == 'beta' else ''}, "
                         f"got {tuple(bk.shape)}")
    if bv is None:
        if need_square and K != V:
            raise ValueError(f"bv: None (coupled FG2-GDN) needs K == V, got K={K}, V={V}; pass bv [B,T,H,V]")
    else:
        check_tensor(nv, bv, ndim=4, dtypes=_FLOATS, device=q.device)
        if tuple(bv.shape) != (B, T, H, V):
            raise ValueError(f"{nv}: expected shape {(B, T, H, V)}, got {tuple(bv.shape)}")
    # the rates' range, (0, 1], is checked by scaled_kv's kernel, which reads them anyway
    if scale is not None and not (isinstance(scale, (int, float)) and scale > 0):
        raise ValueError(f"scale: expected a positive number, got {scale!r}")
    offsets = tuple(range(0, (B + 1) * T, T)) if T else (0,) * (B + 1)
    if cu_seqlens is not None:
        check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32, torch.int64), device=q.device)
        if B != 1:
            raise ValueError(f"cu_seqlens: packed sequences need B == 1, got q with B={B}")
        cu = cu_seqlens.tolist()
        if len(cu) < 2 or cu[0] != 0 or cu[-1] != T or any(b <= a for a, b in zip(cu, cu[1:])):
            raise ValueError(f"cu_seqlens: expected strictly increasing offsets from 0 to T={T}, got {cu}")
        offsets = tuple(cu)
    N = len(offsets) - 1
    if initial_state is not None:
        check_tensor("initial_state", initial_state, ndim=4, dtypes=_FLOATS + (torch.float64,), device=q.device)
        if tuple(initial_state.shape) != (N, H, K, V):
            raise ValueError(f"initial_state: expected shape {(N, H, K, V)}, got {tuple(initial_state.shape)}")
    return B, T, H, K, V, offsets


def check_offsets(B, T, H, K, V, N, chunk_size):
    """Kernels index with int32: per-token and per-chunk-state offsets must stay below 2^31."""
    ntok = B * T
    nchunks = ntok // chunk_size + N
    if ntok * H * max(K, V, chunk_size) >= 2**31 or nchunks * H * K * V >= 2**31:
        raise ValueError(f"q: {ntok} tokens x {H} heads (K={K}, V={V}) overflow the kernels' int32 "
                         f"offsets; split the batch")


# ----------------------------------------------------------------------------- autograd
class ChunkDeltaRuleFunction(torch.autograd.Function):
    """Symmetric delta rule on (q, k~, v~, g) -> (o, final_state); g is [B,T,H] or [B,T,H,K]."""

    @staticmethod
    def forward(ctx, q, kt, vt, g, scale, initial_state, output_final_state, offsets, chunk_size):
        B, T, H, K = q.shape
        V = vt.shape[-1]
        meta = prepare_chunks(offsets, chunk_size, q.device)
        flat = lambda x: x.reshape(B * T, *x.shape[2:]).contiguous()  # noqa: E731
        qf, kf, vf, gf = flat(q), flat(kt), flat(vt), flat(g)
        h0 = initial_state.float().contiguous() if initial_state is not None else None
        save = any(ctx.needs_input_grad[i] for i in (0, 1, 2, 3, 5))
        o, ht, saved = chunk_fwd(qf, kf, vf, gf, scale, h0, output_final_state, meta, save=save)
        if save:  # inference keeps no per-chunk states or WY factors alive
            ctx.saved_names = sorted(saved)
            ctx.save_for_backward(qf, kf, vf, *(saved[n] for n in ctx.saved_names))
        ctx.meta, ctx.scale, ctx.shape = meta, scale, (B, T, H, K, V)
        ctx.g_scalar = g.dim() == 3
        ctx.g_dtype = g.dtype
        ctx.h0_info = None if initial_state is None else initial_state.dtype
        o = o.reshape(B, T, H, V)
        if ht is not None:
            return o, ht
        return o, None

    @staticmethod
    def backward(ctx, do, dht):
        qf, kf, vf, *rest = ctx.saved_tensors
        saved = dict(zip(ctx.saved_names, rest))
        B, T, H, K, V = ctx.shape
        dof = do.reshape(B * T, H, V).contiguous()
        dht = dht.float().contiguous() if dht is not None else None
        dq, dk, dv, dg, dh0 = chunk_bwd(qf, kf, vf, saved, dof, dht, ctx.scale, ctx.meta,
                                        need_dh0=ctx.h0_info is not None)
        dg = dg.sum(-1) if ctx.g_scalar else dg
        shp = lambda x, D: x.reshape(B, T, H, D)  # noqa: E731
        dg = dg.reshape(B, T, H, *(() if ctx.g_scalar else (K,))).to(ctx.g_dtype)
        dh0 = dh0.to(ctx.h0_info) if dh0 is not None else None
        return shp(dq, K), shp(dk, K), shp(dv, V), dg, None, dh0, None, None, None


# ----------------------------------------------------------------------------- public API
def chunk_fg2_delta_rule(q, k, v, g, bk, bv=None, *, scale=None, initial_state=None,
                         output_final_state=False, cu_seqlens=None, chunk_size=CHUNK_SIZE):
    """FG2-GDN (``bv=None``) / FG2-GDN+ chunked delta rule (Triton forward and backward).

    Args:
        q, k: ``[B, T, H, K]`` (bf16/fp16/fp32), expected L2-normalised per head by the caller
            (not checked; un-normalised keys make ``I - k~ k~^T`` expansive and may diverge).
        v: ``[B, T, H, V]``, same dtype.
        g: log-decay, ``[B, T, H]`` (scalar per head, GDN-style) or ``[B, T, H, K]``; should be
            <= 0 (decay exp(g) in (0, 1]).
        bk: key rates in (0, 1], ``[B, T, H, K]``; k~ = sqrt(bk) k.
        bv: value rates in (0, 1], ``[B, T, H, V]``; None = coupled FG2-GDN (bv = bk, needs K == V).
        scale: output scale, default ``K ** -0.5``.
        initial_state: ``[N, H, K, V]`` (N = B, or the number of packed sequences), any float
            dtype; the state is always carried in fp32.
        output_final_state: also return the fp32 final state ``[N, H, K, V]``.
        cu_seqlens: int32/int64 ``[N + 1]`` offsets of packed sequences in a ``B = 1`` batch.
        chunk_size: 64 (16 and 32 also work; the CPU tests use them to stay fast).

    Returns ``(o [B, T, H, V] in q's dtype, final_state or None)``. K and V up to 128.
    Gradients flow to q, k, v, g, bk, bv and initial_state.

    Example::

        q = F.normalize(torch.randn(2, 1024, 4, 64, device="cuda"), dim=-1).bfloat16()
        k = F.normalize(torch.randn(2, 1024, 4, 64, device="cuda"), dim=-1).bfloat16()
        v = torch.randn(2, 1024, 4, 64, device="cuda", dtype=torch.bfloat16)
        g = -F.softplus(torch.randn(2, 1024, 4, 64, device="cuda"))
        bk = torch.sigmoid(torch.randn(2, 1024, 4, 64, device="cuda"))
        o, s = chunk_fg2_delta_rule(q, k, v, g, bk, output_final_state=True)
    """
    B, T, H, K, V, offsets = validate(q, k, v, g, bk, bv, scale, initial_state, cu_seqlens,
                                      need_square=True)
    if chunk_size not in (16, 32, 64):
        raise ValueError(f"chunk_size: expected 16, 32 or 64, got {chunk_size}")
    check_offsets(B, T, H, K, V, len(offsets) - 1, chunk_size)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    kt, vt, check_rates = scaled_kv(k, v, bk, bv)
    out = ChunkDeltaRuleFunction.apply(q, kt, vt, g, scale, initial_state, output_final_state,
                                       offsets, chunk_size)
    check_rates()  # after the kernels are queued: the GPU does not idle for the host's read
    return out


def _beta_entry(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, chunk_size,
                g_ndim):
    B, T, H, K, V, offsets = validate(q, k, v, g, beta, None, scale, initial_state, cu_seqlens,
                                      need_square=False, rate_names=("beta", "beta"))
    if beta.dim() != 3:
        raise ValueError(f"beta: expected a scalar rate per token and head, shape {tuple(q.shape[:3])}")
    if chunk_size not in (16, 32, 64):
        raise ValueError(f"chunk_size: expected 16, 32 or 64, got {chunk_size}")
    check_offsets(B, T, H, K, V, len(offsets) - 1, chunk_size)
    if g_ndim is not None and g.dim() != g_ndim:
        raise ValueError(f"g: expected {g_ndim} dims for this variant, got shape {tuple(g.shape)}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    kt, vt, check_rates = scaled_kv(k, v, beta, None, names=("beta", "beta"))
    out = ChunkDeltaRuleFunction.apply(q, kt, vt, g, scale, initial_state, output_final_state,
                                       offsets, chunk_size)
    check_rates()
    return out


def chunk_gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None,
                           output_final_state=False, cu_seqlens=None, chunk_size=CHUNK_SIZE):
    """Gated DeltaNet: ``S_t = (I - beta k k^T) exp(g_t) S_{t-1} + beta k v^T``.

    ``g [B, T, H]`` scalar log-decay, ``beta [B, T, H]`` in (0, 1]; other arguments and returns as
    :func:`chunk_fg2_delta_rule` (K and V may differ). Runs the FG2 kernels with k~ = sqrt(beta) k,
    v~ = sqrt(beta) v. Example: ``o, _ = chunk_gated_delta_rule(q, k, v, g, beta)``.
    """
    return _beta_entry(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                       chunk_size, 3)


def chunk_kda(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False,
              cu_seqlens=None, chunk_size=CHUNK_SIZE):
    """Kimi Delta Attention: per-channel log-decay ``g [B, T, H, K]``, scalar ``beta [B, T, H]``.

    Same arguments and returns as :func:`chunk_gated_delta_rule`.
    Example: ``o, _ = chunk_kda(q, k, v, g, beta)``.
    """
    return _beta_entry(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                       chunk_size, 4)
