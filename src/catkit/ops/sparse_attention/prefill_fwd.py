"""Block-sparse causal attention, forward pass: the shared host plan, tile table and Triton kernel.

See ``prefill.py`` for the public functions and ``naive.py`` for the exact semantics.

One program per (query head, query tile, sequence); query tiles never straddle a sparse block. It
walks the key tiles it may read in two ranges: every fully visible tile (no mask arithmetic, no
bounds checks) in ONE software-pipelined loop, then the causal diagonal tile range (masked). In
streaming mode the sinks and the window are two key ranges; the first loop walks them as one
"virtual" range with a jump (``split``/``gap``), so short windows keep a single pipeline.
Online softmax runs in base 2 with the scale folded into one FMA. On Hopper the K/V tiles can come
through on-device tensor descriptors (TMA: bulk copies, no per-element address math; ``TMA`` config
flag), and programs stack up to 4 query heads of a GQA group so each K/V tile feeds 4 heads.
"""

from __future__ import annotations

import torch

from catkit.utils.triton_utils import triton_available

if triton_available():
    import triton
    import triton.language as tl
else:  # pragma: no cover - the module stays importable; CPU then falls back to naive.py
    triton = None

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
MODE_STREAM, MODE_INDEX = 0, 1

# ---------------------------------------------------------------------------------------------
# Level 1: Triton kernels
# ---------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _query_rows(pid_h, m0, G: tl.constexpr, BS: tl.constexpr, D: tl.constexpr,
                    BLOCK_M: tl.constexpr, HPP: tl.constexpr):
        """(KV head, query block, token offsets, head per row, feature offsets) of a program that
        stacks HPP query heads of one GQA group x BLOCK_M tokens as rows (fwd and dq share it)."""
        rows = tl.arange(0, HPP * BLOCK_M)
        return ((pid_h * HPP) // G, m0 // BS, m0 + rows % BLOCK_M, pid_h * HPP + rows // BLOCK_M,
                tl.arange(0, D))

    @triton.jit
    def _streaming_bounds(qb, m0, SINK, RECENT, BS: tl.constexpr):
        """The streaming pattern's key ranges for query block qb starting at token m0: window blocks
        [w_lo, qb] (own block included when recent >= 1 or qb is a sink), sink blocks
        [0, min(SINK, w_lo)). Returns (w_lo, s_hi, n_full): the walk covers virtual positions
        [0, n_full) with keys jumping by w_lo * BS - s_hi at s_hi (the unmasked part); the masked
        diagonal tile follows when w_lo <= qb."""
        w_lo = tl.maximum(qb - RECENT + 1, 0)
        if qb < SINK:
            w_lo = tl.minimum(w_lo, qb)
        s_hi = tl.minimum(SINK, w_lo) * BS
        n_full = s_hi + tl.where(w_lo <= qb, m0 - w_lo * BS, 0)
        return w_lo, s_hi, n_full

    @triton.jit
    def _fwd_range(acc, m_i, l_i, q, Kb, Vb, stride_kt, stride_vt, lo, hi, split, gap, q_pos, L, qk_scale,
                   BLOCK_N: tl.constexpr, D: tl.constexpr, MASKED: tl.constexpr, TMA: tl.constexpr):
        # Virtual positions v in [lo, hi); keys start at v, or v + gap once v >= split. With TMA, Kb/Vb
        # are tensor descriptors of this sequence's [L, D] keys/values (rows past L read as zeros).
        offs_d = tl.arange(0, D)
        for v0 in range(lo, hi, BLOCK_N):
            start = v0 + tl.where(v0 >= split, gap, 0)
            start = tl.multiple_of(start, BLOCK_N)
            offs_n = start + tl.arange(0, BLOCK_N)
            if TMA:
                k = Kb.load([start, 0])
                v = Vb.load([start, 0])
            elif MASKED:
                kv_ok = offs_n < L
                k = tl.load(Kb + offs_n[:, None] * stride_kt + offs_d[None, :], mask=kv_ok[:, None], other=0.0)
                v = tl.load(Vb + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kv_ok[:, None], other=0.0)
            else:
                k = tl.load(Kb + offs_n[:, None] * stride_kt + offs_d[None, :])
                v = tl.load(Vb + offs_n[:, None] * stride_vt + offs_d[None, :])
            qk = tl.dot(q, tl.trans(k))
            if MASKED:
                # Causal; keys past L only meet rows past L (offs_n <= q_pos), which are never stored.
                qk = tl.where(offs_n[None, :] <= q_pos[:, None], qk, float("-inf"))
            # m_i starts at a finite floor, so a row masked so far gives exp2(-inf) = 0, never NaN.
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            p = tl.exp2(qk * qk_scale - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])  # accumulate inside the MMA
            m_i = m_new
        return acc, m_i, l_i

    @triton.jit
    def _fwd_kernel(Q, K, V, O, LSE, CU, IDX, CNT, qk_scale,
                    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                    stride_ib, stride_ih, stride_iq, stride_cb, stride_ch,
                    H, SINK, RECENT,
                    G: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, MODE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HPP: tl.constexpr, TMA: tl.constexpr = 0,
                    SM90: tl.constexpr = 0):
        # SM90 only tags the configs tuned for Hopper (see _prune); the kernel ignores it.
        # A program owns HPP query heads of one GQA group x BLOCK_M tokens, stacked as rows, so
        # every K/V tile it loads feeds HPP heads (less L2 -> SM traffic per FLOP).
        pid_h = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_b = tl.program_id(2)
        bos = tl.load(CU + pid_b)
        L = tl.load(CU + pid_b + 1) - bos
        m0 = pid_m * BLOCK_M
        if m0 < L:
            hkv, qb, offs_m, head, offs_d = _query_rows(pid_h, m0, G, BS, D, BLOCK_M, HPP)
            row_ok = offs_m < L
            q = tl.load(Q + (bos + offs_m)[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                        mask=row_ok[:, None], other=0.0)
            Kb = K + bos * stride_kt + hkv * stride_kh
            Vb = V + bos * stride_vt + hkv * stride_vh
            if TMA:  # Hopper bulk copies: no per-element address math, bounds handled by the copy engine
                Kb = tl.make_tensor_descriptor(Kb, shape=[L, D], strides=[stride_kt, 1], block_shape=[BLOCK_N, D])
                Vb = tl.make_tensor_descriptor(Vb, shape=[L, D], strides=[stride_vt, 1], block_shape=[BLOCK_N, D])
            acc = tl.zeros([HPP * BLOCK_M, D], dtype=tl.float32)
            m_i = tl.zeros([HPP * BLOCK_M], dtype=tl.float32) - 1.0e30
            l_i = tl.zeros([HPP * BLOCK_M], dtype=tl.float32)
            if MODE == 0:
                w_lo, s_hi, n_full = _streaming_bounds(qb, m0, SINK, RECENT, BS)
                acc, m_i, l_i = _fwd_range(acc, m_i, l_i, q, Kb, Vb, stride_kt, stride_vt, 0, n_full, s_hi,
                                           w_lo * BS - s_hi, offs_m, L, qk_scale, BLOCK_N, D, False, TMA)
                if w_lo <= qb:
                    acc, m_i, l_i = _fwd_range(acc, m_i, l_i, q, Kb, Vb, stride_kt, stride_vt, m0, m0 + BLOCK_M,
                                               L, 0, offs_m, L, qk_scale, BLOCK_N, D, True, TMA)
            else:
                n_idx = tl.load(CNT + pid_b * stride_cb + hkv * stride_ch + qb)
                Ib = IDX + pid_b * stride_ib + hkv * stride_ih + qb * stride_iq
                for t in range(0, n_idx):
                    j = tl.load(Ib + t)
                    if j < qb:
                        acc, m_i, l_i = _fwd_range(acc, m_i, l_i, q, Kb, Vb, stride_kt, stride_vt, j * BS,
                                                   j * BS + BS, L, 0, offs_m, L, qk_scale, BLOCK_N, D, False, TMA)
                    elif j == qb:
                        acc, m_i, l_i = _fwd_range(acc, m_i, l_i, q, Kb, Vb, stride_kt, stride_vt, j * BS, m0,
                                                   L, 0, offs_m, L, qk_scale, BLOCK_N, D, False, TMA)
                        acc, m_i, l_i = _fwd_range(acc, m_i, l_i, q, Kb, Vb, stride_kt, stride_vt, m0,
                                                   m0 + BLOCK_M, L, 0, offs_m, L, qk_scale, BLOCK_N, D, True, TMA)
            empty = l_i == 0.0  # no allowed key: output 0, lse -inf (documented behaviour)
            l_safe = tl.where(empty, 1.0, l_i)
            o = acc / l_safe[:, None]
            lse = tl.where(empty, float("-inf"), m_i + tl.log2(l_safe))
            tl.store(O + (bos + offs_m)[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
                     o.to(O.dtype.element_ty), mask=row_ok[:, None])
            tl.store(LSE + (bos + offs_m) * H + head, lse, mask=row_ok)


    _fwd_kernel_tuned = None  # set below, once ``tuned`` is defined


# ---------------------------------------------------------------------------------------------
# Level 2: host plan, tiles and launcher
# ---------------------------------------------------------------------------------------------
# Tiles per pass: (BLOCK_M, BLOCK_N, num_warps, num_stages[, HPP]); BLOCK_M counts tokens, HPP is
# the number of query heads of one GQA group a program stacks (rows = HPP * BLOCK_M). On a GPU,
# fwd and dq are autotuned over ATTN_CONFIGS (keyed on D, block size, group size, mode); dkdv uses
# the table below (its grid depends on BLOCK_N). Tests pass small tiles through ``tiles``.
GPU_TILES = {
    "fwd": {128: (128, 64, 8, 3, 1), 64: (64, 64, 4, 3, 1)},
    "dq": {128: (64, 64, 4, 2, 1), 64: (64, 64, 4, 2, 1)},
    "dkdv": {128: (32, 64, 4, 2, 1), 64: (32, 64, 4, 2, 1)},
}
ATTN_CONFIGS = [  # dq: (BLOCK_M, BLOCK_N, HPP, num_warps, num_stages); the last one fits every case
    (128, 64, 1, 8, 3), (128, 32, 1, 4, 4), (64, 64, 2, 8, 3), (64, 32, 2, 4, 4), (32, 64, 4, 8, 3),
    (64, 64, 1, 4, 4), (64, 32, 1, 4, 4), (64, 64, 1, 4, 2), (64, 64, 1, 4, 3),
]
# fwd: the same fields plus TMA (1: K/V tiles through tensor descriptors, sm90+ only). Hopper tunes
# over its own short list (H200 sweep, 32 q / 8 kv heads, d 128, 128K tokens: (64, 64, 4, 8, 2, 1)
# 5.54 ms, (64, 64, 2, 8, 3, 0) 5.74, (128, 64, 1, 8, 3, 0) 5.92; FlexAttention 6.7-7.3 ms).
FWD_CONFIGS = [(bm, bn, h, w, st, 0) for bm, bn, h, w, st in ATTN_CONFIGS]
FWD_CONFIGS_SM90 = [
    (64, 64, 4, 8, 2, 1), (64, 64, 4, 8, 3, 1), (64, 64, 4, 8, 2, 0), (64, 64, 2, 8, 3, 0), (64, 64, 2, 8, 3, 1),
    (128, 64, 1, 8, 3, 0), (64, 64, 1, 4, 3, 0),
]


def _tma_ok() -> bool:
    """Tensor descriptors need sm90+ and a scratch allocator for the on-device descriptors."""
    if not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9):
        return False
    if not _ALLOC["set"]:
        triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
        _ALLOC["set"] = True
    return True


_ALLOC = {"set": False}


def _prune(configs, named_args, **kwargs):
    a = {**named_args, **kwargs}
    bs, g = a["BS"], a["G"]
    if any("TMA" in c.kwargs for c in configs):  # fwd: the sm90 list on Hopper, the generic one elsewhere
        hopper = _tma_ok()
        configs = [c for c in configs if c.kwargs.get("SM90", 0) == hopper] or configs
    ok = [c for c in configs if bs % c.kwargs["BLOCK_M"] == 0 and c.kwargs["BLOCK_M"] % c.kwargs["BLOCK_N"] == 0
          and g % c.kwargs["HPP"] == 0]
    return ok or configs[-1:]


def tuned(kernel, fwd: bool = False):
    """``kernel`` autotuned over ATTN_CONFIGS (fwd: FWD_CONFIGS, or FWD_CONFIGS_SM90 on Hopper); GPU
    launches without explicit tiles use it."""
    from catkit.utils.triton_utils import autotune

    if fwd:
        cfgs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "HPP": h, "TMA": t, "SM90": sm}, num_warps=w,
                              num_stages=st)
                for sm, table in ((1, FWD_CONFIGS_SM90), (0, FWD_CONFIGS)) for bm, bn, h, w, st, t in table]
    else:
        cfgs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "HPP": h}, num_warps=w, num_stages=st)
                for bm, bn, h, w, st in ATTN_CONFIGS]
    return autotune(cfgs, key=["D", "BS", "G", "MODE"], prune_configs_by={"early_config_prune": _prune})(kernel)


def length_bucket(tokens: int) -> int:
    """Tokens of one launch bucketed by powers of two: < 16K, 16-32K, 32-64K, 64-128K, >= 128K."""
    return min(4, max(0, int(tokens).bit_length() - 14))


class TunedByLength:
    """One autotuner per :func:`length_bucket`: the fastest tiles at 4K tokens are not the fastest
    at 128K (H200 sweep above: the 4K pick ran 5.85-5.97 ms at 128K, the 128K best 5.54 ms), and a
    plain autotuner keeps whatever it picked on the first call for every length. Measured on an
    H100 (benchmarks/results/sparse_attention-NVIDIA_H100_80GB_HBM3*.json, same card, one tuner vs
    one per bucket): forward 1.41 / 2.93 / 5.86 -> 1.29 / 2.56 / 5.24 ms at 32K / 64K / 128K;
    fwd+bwd 6.84 / 13.64 / 27.84 -> 6.81 / 14.05 / 27.45 ms."""

    def __init__(self, kernel, fwd: bool = False):
        self.kernel, self.fwd, self.by_bucket = kernel, fwd, {}

    def for_tokens(self, tokens: int):
        bucket = length_bucket(tokens)
        if bucket not in self.by_bucket:
            self.by_bucket[bucket] = tuned(self.kernel, fwd=self.fwd)
        return self.by_bucket[bucket]


TUNING = {"on": True}  # switched off (with a warning) if autotuning ever fails on this machine


def run_tuned(kernel, grid, args, meta) -> bool:
    """Launch an autotuned kernel; False (and fixed tiles from then on) if tuning fails."""
    if not TUNING["on"]:
        return False
    try:
        kernel[grid](*args, **meta)
        return True
    except Exception as e:  # noqa: BLE001 - a tuning failure must not take training down
        import warnings

        warnings.warn(f"sparse_attention autotuning failed ({type(e).__name__}: {e}); using fixed tiles")
        TUNING["on"] = False
        return False


def pick_tiles(kind: str, block_size: int, D: int, tiles: dict | None, G: int = 1):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages, HPP) for one pass, checked against the block size.

    ``tiles[kind]`` may carry a sixth field, TMA (fwd only; read it with :func:`tile_tma`)."""
    if tiles is not None and kind in tiles:
        cfg = tuple(tiles[kind])
    elif block_size in GPU_TILES[kind]:
        cfg = GPU_TILES[kind][block_size]
        if D <= 32:
            cfg = (cfg[0], cfg[1], 4) + tuple(cfg[3:])
    else:
        cfg = (min(block_size, 64), min(block_size, 64), 4, 2)
    bm, bn, w, s = cfg[:4]
    hpp = cfg[4] if len(cfg) > 4 else 1
    # Tiles never straddle a sparse block and the inner tile divides the outer one, so every range
    # the kernels walk is tile aligned (the unmasked loops rely on it).
    inner_ok = (bm % bn == 0) if kind != "dkdv" else (bn % bm == 0)
    if block_size % bm or block_size % bn or not inner_ok or G % hpp:
        raise ValueError(f"_tiles: {kind} tiles {cfg} do not fit block_size {block_size} / group {G}")
    return bm, bn, w, s, hpp


class Plan:
    """What forward and backward share: sequence packing, the pattern and its index tensors."""

    def __init__(self, B, T, cu_seqlens, device, block_size, sink, recent, block_indices):
        if cu_seqlens is None:
            self.cu = torch.arange(0, (B + 1) * T, T, dtype=torch.int32, device=device)
            self.n_seq, self.max_len, self.packed = B, T, False
        else:
            self.cu = cu_seqlens.to(device=device, dtype=torch.int32)
            self.n_seq = cu_seqlens.numel() - 1
            self.max_len = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if self.n_seq > 0 else 0
            self.packed = True
        self.block_size, self.sink, self.recent = block_size, sink, recent
        self.mode = MODE_STREAM if block_indices is None else MODE_INDEX
        self.nb = (self.max_len + block_size - 1) // block_size
        if self.mode == MODE_INDEX:
            self.idx = block_indices.to(device=device, dtype=torch.int32).contiguous()
            self.cnt = (self.idx >= 0).sum(-1, dtype=torch.int32).contiguous()  # [N, H_kv, NQ]
        else:
            self.idx = self.cnt = torch.zeros(1, 1, 1, dtype=torch.int32, device=device)
        self.ridx = self.rcnt = None

    def reverse(self):
        """Per key block, the sorted query blocks that read it (index mode, backward only)."""
        if self.ridx is None:
            N, Hk, NQ, _ = self.idx.shape
            nb = max(self.nb, NQ)
            qb = torch.arange(NQ, device=self.idx.device)[None, None, :, None]
            idx = self.idx.long()
            keep = (idx >= 0) & (idx <= qb)  # entries above the query block read nothing (causal)
            mask = torch.zeros(N, Hk, NQ, nb + 1, dtype=torch.bool, device=idx.device)
            mask.scatter_(-1, torch.where(keep, idx, nb), True)
            maskT = mask[..., :nb].transpose(-1, -2)  # [N, H_kv, NK, NQ]
            self.rcnt = maskT.sum(-1, dtype=torch.int32).contiguous()
            ar = torch.arange(NQ, device=idx.device, dtype=torch.int32).expand_as(maskT)
            order = torch.where(maskT, ar, torch.full_like(ar, NQ)).sort(-1).values
            width = max(int(self.rcnt.max()) if self.rcnt.numel() else 0, 1)
            self.ridx = order[..., :width].contiguous()
        return self.ridx, self.rcnt


def tile_tma(tiles) -> int:
    """The TMA flag of an explicit fwd tile tuple (0 when absent)."""
    cfg = tuple(tiles["fwd"]) if tiles is not None and "fwd" in tiles else ()
    return int(cfg[5]) if len(cfg) > 5 else 0


def block_sparse_attention_fwd(q, k, v, plan: Plan, scale: float, tiles=None):
    """q [B, T, H, D], k/v [B, T, H_kv, D] contiguous -> (o [B, T, H, D], lse2 [B*T, H] base-2 float32)."""
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    qf, kf, vf = q.reshape(B * T, H, D), k.reshape(B * T, Hkv, D), v.reshape(B * T, Hkv, D)
    o = torch.empty_like(qf)
    lse = torch.empty(B * T, H, dtype=torch.float32, device=q.device)
    if plan.n_seq > 0 and plan.max_len > 0:
        args = (qf, kf, vf, o, lse, plan.cu, plan.idx, plan.cnt, scale * LOG2E,
                qf.stride(0), qf.stride(1), kf.stride(0), kf.stride(1), vf.stride(0), vf.stride(1),
                o.stride(0), o.stride(1),
                plan.idx.stride(0), plan.idx.stride(1), plan.idx.stride(2), plan.cnt.stride(0), plan.cnt.stride(1),
                H, plan.sink, plan.recent)
        meta = dict(G=H // Hkv, BS=plan.block_size, D=D, MODE=plan.mode)
        grid = lambda M: (H // M["HPP"], triton.cdiv(plan.max_len, M["BLOCK_M"]), plan.n_seq)  # noqa: E731
        if not (tiles is None and q.is_cuda and run_tuned(_fwd_kernel_tuned.for_tokens(B * T), grid, args, meta)):
            bm, bn, w, s, hpp = pick_tiles("fwd", plan.block_size, D, tiles, H // Hkv)
            tma = tile_tma(tiles)
            if tma and q.is_cuda and not _tma_ok():
                raise ValueError("_tiles: TMA tiles need an sm90+ GPU")
            _fwd_kernel[(H // hpp, triton.cdiv(plan.max_len, bm), plan.n_seq)](
                *args, **meta, BLOCK_M=bm, BLOCK_N=bn, HPP=hpp, TMA=tma, num_warps=w, num_stages=s)
    return o.view(B, T, H, D), lse


if triton is not None:
    _fwd_kernel_tuned = TunedByLength(_fwd_kernel, fwd=True)
