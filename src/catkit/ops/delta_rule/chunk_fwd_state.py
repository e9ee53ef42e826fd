"""The sequential pass of the chunked delta-rule forward (see chunk_fwd.py for the algebra)::

    Vn = U - W S,   S <- exp(G_C) S + KD^T Vn          per chunk, with S the chunk-start state

One program carries the [K, BV] slice of one sequence/head's state through its chunks and writes
Vn and the chunk-start states ``h`` (read by chunk_fwd_o and the backward). Variants behind
constexpr switches (same math, other products), timed by scripts/sweep_delta_fwd_variants.py,
whose winners go into STATE_BEST / STATE_BEST_FEW:

  * STATE_BF16 (bf16 inputs only): both products on bf16 operands with fp32 accumulation (S
    itself stays fp32 between chunks). bf16 m16n8k16 MMAs instead of tf32 m16n8k8 ones: half the
    tensor-core instructions per product, and half the operand registers for W, KD and S's copy:
    sm_90a estimates (Triton 3.9, K = V = 128) 186 -> 127 registers at BV 32 / 8 warps, 245 -> 153
    at BV 16 / 4 warps with PREFETCH (the two defaults), so BV 32 / 4 warps (206) and BV 64 (231
    at 4 warps with KSPLIT 2) fit without spills (scripts/sweep_delta_fwd_variants.py --regs).
  * KSPLIT 2: the state as two [K/2, BV] halves, each with its own W / KD column halves and decay
    row; every product becomes two with K/2 reduction (W S = W_0 S_0 + W_1 S_1) or half the rows
    (S_i += KD_i^T Vn). Smaller tiles give Triton's layout conversions (the transposed KD operand,
    the S accumulator fed back as an operand) half the shuffles per conversion and let BV = 64
    fit without spilling.
  * H_BF16 (host option, bf16 inputs only): ``h`` stored in bf16. Every product that reads it on
    the bf16 path rounds it to bf16 anyway (chunk_fwd_o, and chunk_bwd_dap / chunk_bwd_dqkg_inter
    through _mm with OP_BF16); the one elementwise use, dG_C = sum_v S * dS_C in dqkg_inter, sees
    the rounded S (a relative change ~2^-9 per term, far below dg's bound). Halves h's bytes: at
    32K tokens x 16 heads, K = V = 128, 537 MB fp32 written here and read three times.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _mm_rnd(a, b, RND: tl.constexpr, NATIVE: tl.constexpr, DOT_PREC: tl.constexpr):
    # RND: bf16 operands, fp32 accumulation. The CPU interpreter multiplies bf16 dot operands
    # wrongly (Triton 3.9), so without NATIVE the same rounding goes through exact fp32 products.
    if RND:
        if NATIVE:
            return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
        else:
            return tl.dot(a.to(tl.bfloat16).to(tl.float32), b.to(tl.bfloat16).to(tl.float32),
                          input_precision="ieee")
    else:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=DOT_PREC)


@triton.jit
def _state_kload(W, KD, G, t0, eos, i_h, ck, H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr):
    """W and KD^T ([len(ck), BT], straight into the update product) on key columns ck, and G at the
    chunk's last row, for the chunk starting at token t0 (all masked when t0 >= eos)."""
    rows = tl.arange(0, BT)
    m = ((t0 + rows) < eos)[:, None] & (ck[None, :] < K)
    off = (t0 + rows)[:, None] * (H * K) + i_h * K + ck[None, :]
    b_W = tl.load(W + off, mask=m, other=0.0)
    b_kdt = tl.load(KD + tl.trans(off), mask=tl.trans(m), other=0.0)
    last = tl.maximum(tl.minimum(t0 + BT, eos) - 1, 0)
    G_l = tl.load(G + last * (H * K) + i_h * K + ck, mask=(ck < K) & (t0 + ck * 0 < eos), other=0.0)
    return b_W, b_kdt, G_l


@triton.jit
def _state_uload(U, t0, eos, i_h, cv, H: tl.constexpr, V: tl.constexpr, BT: tl.constexpr):
    rows = tl.arange(0, BT)
    mv = ((t0 + rows) < eos)[:, None] & (cv[None, :] < V)
    return tl.load(U + (t0 + rows)[:, None] * (H * V) + i_h * V + cv[None, :], mask=mv, other=0.0).to(tl.float32)


@triton.jit
def _seq_span(cu_seqlens, chunk_offsets, i_nh, H: tl.constexpr, BT: tl.constexpr):
    """A state pass's program walks one (sequence, head): (sequence, head, first token, end, index
    of its first chunk-start state, number of chunks)."""
    i_n = i_nh // H
    bos = tl.load(cu_seqlens + i_n)
    eos = tl.load(cu_seqlens + i_n + 1)
    return i_n, i_nh % H, bos, eos, tl.load(chunk_offsets + i_n), tl.cdiv(eos - bos, BT)


@triton.jit
def chunk_fwd_state_kernel(U, W, KD, G, vn, h, h0, ht, cu_seqlens, chunk_offsets,
                           H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                           BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                           HAS_H0: tl.constexpr, STORE_FINAL: tl.constexpr,
                           DOT_PREC: tl.constexpr, PREFETCH: tl.constexpr,
                           STATE_BF16: tl.constexpr = 0, KSPLIT: tl.constexpr = 1,
                           NATIVE: tl.constexpr = 1):
    # V columns of S evolve independently (Vn[:, v] depends only on S[:, v]), hence the V tiling.
    # Only what the recurrence needs is done here; everything independent of S was precomputed by
    # chunk_prep, and the output is chunk_fwd_o's, in parallel. The default (STATE_BF16 0) runs
    # the products on fp32 operands at DOT_PREC (tf32 for 16-bit inputs): it measured faster on
    # an H200 (Triton 3.6) than the earlier bf16 loop that also produced O (1.07 vs 1.41 ms at 32K
    # tokens x 16 heads). STATE_BF16 miscompiles into an illegal memory access at several tilings
    # under Triton 3.6 (H100: BV 16 and 32 at 4 warps, BV 32 at 8 warps with KSPLIT 1), not at the
    # BV 64 / 4 warps of STATE_BEST; the sweep runs every other tiling last (state_sweep_options).
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h, bos, eos, boh, NC = _seq_span(cu_seqlens, chunk_offsets, i_nh, H, BT)
    rows = tl.arange(0, BT)
    BKH: tl.constexpr = BK // KSPLIT
    ck0 = tl.arange(0, BKH)
    cv = i_v * BV + tl.arange(0, BV)
    m0 = (ck0[:, None] < K) & (cv[None, :] < V)
    off0 = i_h * K * V + ck0[:, None] * V + cv[None, :]
    S0 = tl.zeros([BKH, BV], dtype=tl.float32)
    if HAS_H0:
        S0 = tl.load(h0 + i_n * H * K * V + off0, mask=m0, other=0.0).to(tl.float32)
    # The loads of chunk c + 1 (independent of S) are issued before chunk c's products when
    # PREFETCH, so their latency hides behind the dots instead of stalling the serial chain.
    W0, kdt0, G0 = _state_kload(W, KD, G, bos, eos, i_h, ck0, H, K, BT)
    if KSPLIT == 2:
        ck1 = BKH + tl.arange(0, BKH)
        m1 = (ck1[:, None] < K) & (cv[None, :] < V)
        off1 = off0 + BKH * V
        S1 = tl.zeros([BKH, BV], dtype=tl.float32)
        if HAS_H0:
            S1 = tl.load(h0 + i_n * H * K * V + off1, mask=m1, other=0.0).to(tl.float32)
        W1, kdt1, G1 = _state_kload(W, KD, G, bos, eos, i_h, ck1, H, K, BT)
    b_U = _state_uload(U, bos, eos, i_h, cv, H, V, BT)
    for c in range(0, NC):
        t0 = bos + c * BT
        hc = h + (boh + c) * H * K * V
        tl.store(hc + off0, S0.to(h.dtype.element_ty), mask=m0)
        if KSPLIT == 2:
            tl.store(hc + off1, S1.to(h.dtype.element_ty), mask=m1)
        if PREFETCH:
            nW0, nk0, nG0 = _state_kload(W, KD, G, t0 + BT, eos, i_h, ck0, H, K, BT)
            if KSPLIT == 2:
                nW1, nk1, nG1 = _state_kload(W, KD, G, t0 + BT, eos, i_h, ck1, H, K, BT)
            n_U = _state_uload(U, t0 + BT, eos, i_h, cv, H, V, BT)
        b_vn = b_U - _mm_rnd(W0, S0, STATE_BF16, NATIVE, DOT_PREC)
        if KSPLIT == 2:
            b_vn -= _mm_rnd(W1, S1, STATE_BF16, NATIVE, DOT_PREC)
        offv = (t0 + rows)[:, None] * (H * V) + i_h * V + cv[None, :]
        mv = ((t0 + rows) < eos)[:, None] & (cv[None, :] < V)
        tl.store(vn + offv, b_vn.to(vn.dtype.element_ty), mask=mv)
        S0 = S0 * tl.exp(G0)[:, None] + _mm_rnd(kdt0, b_vn, STATE_BF16, NATIVE, DOT_PREC)
        if KSPLIT == 2:
            S1 = S1 * tl.exp(G1)[:, None] + _mm_rnd(kdt1, b_vn, STATE_BF16, NATIVE, DOT_PREC)
        if not PREFETCH:  # the earlier order: the loads wait for the products
            nW0, nk0, nG0 = _state_kload(W, KD, G, t0 + BT, eos, i_h, ck0, H, K, BT)
            if KSPLIT == 2:
                nW1, nk1, nG1 = _state_kload(W, KD, G, t0 + BT, eos, i_h, ck1, H, K, BT)
            n_U = _state_uload(U, t0 + BT, eos, i_h, cv, H, V, BT)
        W0, kdt0, G0, b_U = nW0, nk0, nG0, n_U
        if KSPLIT == 2:
            W1, kdt1, G1 = nW1, nk1, nG1
    if STORE_FINAL:
        tl.store(ht + i_n * H * K * V + off0, S0, mask=m0)
        if KSPLIT == 2:
            tl.store(ht + i_n * H * K * V + off1, S1, mask=m1)


def best_first(best, opts, BK=None):
    """``opts`` with ``best`` (a measured winner, or None) moved to the front; a best option wider
    than this call's key block (BKS > BK) would only mask channels, so the defaults stay then."""
    if best is None or (BK is not None and best.get("BKS", 0) > BK):
        return opts
    return [dict(best)] + [o for o in opts if o != best]


# Issue chunk c+1's loads before chunk c's products (+~40 registers on sm_90: 149 -> 179 at
# BV = 16, 185 -> 220 at BV = 32, 8 warps, Triton 3.9 estimates).
STATE_PREFETCH = True
# Fastest correct options of scripts/sweep_delta_fwd_variants.py (its BEST_FWD_OPTION lines), tried
# before the GPU-verified defaults: STATE_BEST where the grid fills the card (N H V / BV >= SMs,
# e.g. 16 x 2048 tokens), STATE_BEST_FEW where it does not (e.g. 1 x 32768). None keeps the default.
# Measured on an H100 (Triton 3.6, bf16, H = 16, K = V = 128): at 16 x 2048 tokens bf16 products
# at BV 64 / 4 warps 0.37 ms vs 0.87 (default BV 32 / 8 warps, fp32 operands); at 1 x 32768 (32 to
# 128 programs) BV 16 / 4 warps on a bf16 h 1.03 vs 1.10. Several other bf16-product tilings (BV 16
# and 32 at 4 warps, BV 32 at 8 warps with KSPLIT 1) made illegal memory accesses there: a Triton
# 3.6 miscompile of this kernel, not reproduced at BV 64 (the sweep's fp64 checks on odd-length
# packed sequences, the gpu tests).
STATE_BEST = dict(BV=64, num_warps=4, num_stages=1, PREFETCH=False, STATE_BF16=1, KSPLIT=1, H_BF16=1)
STATE_BEST_FEW = dict(BV=16, num_warps=4, num_stages=1, PREFETCH=True, STATE_BF16=0, KSPLIT=1, H_BF16=1)


def state_options(V, NH, dev):
    """(BV, PREFETCH, num_warps, num_stages[, STATE_BF16, KSPLIT, H_BF16]) for the sequential
    state pass, first that compiles runs (H_BF16 is read by the host from the first option). Its
    grid is only NH * V / BV programs (64 at N = 1, H = 16, V = 128, BV = 32: half of an
    H100/H200's SMs idle for the whole pass), so BV = 16 goes first when BV = 32 would leave SMs
    empty. BV = 16 reads W and KD twice as often (per chunk and program: BT K bf16 each, from L2
    when the V tiles of a head run together), so it is not the default when the grid fills the
    card anyway. Bytes per (chunk, head, V tile): 2 BT K bf16 + BT BV bf16 in (W, KD, U), BT BV +
    K BV fp32 out (Vn, the chunk-start state).
    """
    from catkit.ops.delta_rule.chunk_fwd import vtile_options  # (chunk_fwd imports this module)

    # prefetch only at BV = 16: at BV = 32 the H200 profile had 226 registers (Triton 3.6) before
    # it, and the ~40 it adds on sm_90 would spill there
    opts = [dict(o, PREFETCH=STATE_PREFETCH and o["BV"] <= 16) for o in vtile_options(V)]
    sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 0
    if NH * triton.cdiv(V, opts[0]["BV"]) < sms:
        # 4 warps first at BV = 16: with 8 warps, bf16 W / KD and a [BT, BK] x [BK, 16] product,
        # Triton 3.6 on an H200 made an illegal memory access in this kernel (varlen, partial
        # chunks; the fp32 path and 4 warps were fine), measured by scripts/check_delta_fwd_kernels.py
        return best_first(STATE_BEST_FEW, sorted(opts, key=lambda o: (o["BV"], o["num_warps"])))
    return best_first(STATE_BEST, opts)

