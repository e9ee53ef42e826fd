"""Reference group-wise asymmetric quantization (plain PyTorch, fp32): the ground truth.

Definition (the Triton kernels in ``groupwise.py`` implement exactly this, value for value):

* The input is flattened (row-major) and split over ``rows`` rows of ``n`` values, ``n`` the
  smallest multiple of ``group_size`` (G) with ``rows * n >= numel``. Only the first ``n_valid``
  flattened values are real; the rest are *absent*: they take no part in any statistic, get
  code 0 and decode to the group's min (callers drop them).
* Per group of G consecutive values of a row, over its present values: ``mn``, ``mx``; the
  stored min is ``mn_r = meta(mn)`` (``meta`` = rounding to ``meta_dtype``), the stored scale
  ``s_r = meta(mx / qmax - mn_r / qmax)`` with ``qmax = 2**bits - 1``; a code is
  ``q = clamp(floor((x - mn_r) * (1 / s_r) + 0.5), 0, qmax)`` (``1 / s_r`` taken as 0 when
  ``s_r == 0``: a constant group decodes exactly); decoding is ``q * s_r + mn_r`` in fp32.
  Error per value: at most ``s_r / 2`` (plus fp32 rounding) with fp32 metadata.
* Spike reserving (``spike_reserve=True``): in each group the first position holding the
  group's max (``idx_hi``) and, among the other positions, the first one holding the min
  (``idx_lo``) are *spikes*: their values are stored in ``meta_dtype`` (exact for fp32 metadata)
  and decoded as stored; ``mn``/``mx``/scale are taken over the remaining G - 2 values, so one
  outlier at either end no longer stretches the step of the whole group. A missing spike (group
  with fewer than 2 present values) has index -1. The spike codes are 0.
* Non-finite input: a group with any NaN/Inf among its present values, or whose min/scale/spike
  does not fit ``meta_dtype`` (fp16 holds |x| < 65504), is *poisoned*: min, scale and spike
  values are stored as NaN, codes and indices as 0/-1, so every value of the group decodes to NaN.
  Never a wrong finite number.

``fake_quantize`` (quantize then dequantize, straight-through gradient) is the differentiable
form; the codes themselves are integers and carry no gradient.
"""

from __future__ import annotations

import torch

from catkit.ops.quant.layout import QTensor, QuantLayout, check_quant_args, pack_int4, row_length, unpack_int4


def quantize(
    x: torch.Tensor,
    bits: int = 8,
    group_size: int = 128,
    *,
    rows: int = 1,
    n_valid: int | None = None,
    spike_reserve: bool = False,
    meta_dtype: torch.dtype = torch.float32,
) -> QTensor:
    """Quantize the flattened ``x`` into a :class:`QTensor` of ``rows`` rows (see module doc)."""
    check_quant_args(bits, group_size, meta_dtype)
    G, qmax = group_size, float(2**bits - 1)
    flat = x.detach().reshape(-1)
    numel = flat.numel() if n_valid is None else n_valid
    n = row_length(flat.numel(), rows, G)
    layout = QuantLayout(n, bits, G, spike_reserve, meta_dtype)
    P = rows * n
    xp = torch.zeros(P, dtype=torch.float32, device=x.device)
    xp[: flat.numel()] = flat.float()
    valid = (torch.arange(P, device=x.device) < numel).view(-1, G)
    xg = xp.view(-1, G)
    idx = torch.arange(G, device=x.device)
    inf = torch.tensor(float("inf"), device=x.device)
    bad = (valid & ~torch.isfinite(xg)).any(1)

    rest = valid
    if spike_reserve:
        mx_all = torch.where(valid, xg, -inf).amax(1, keepdim=True)
        i_hi = torch.where(valid & (xg == mx_all), idx, G).amin(1)
        rest1 = valid & (idx != i_hi[:, None])
        mn_all = torch.where(rest1, xg, inf).amin(1, keepdim=True)
        i_lo = torch.where(rest1 & (xg == mn_all), idx, G).amin(1)
        rest = rest1 & (idx != i_lo[:, None])
        lo = torch.where(i_lo < G, xg.gather(1, i_lo.clamp_max(G - 1)[:, None])[:, 0], 0.0)
        hi = torch.where(i_hi < G, xg.gather(1, i_hi.clamp_max(G - 1)[:, None])[:, 0], 0.0)
        lo_r, hi_r = lo.to(meta_dtype).float(), hi.to(meta_dtype).float()
        bad |= ~torch.isfinite(lo_r) | ~torch.isfinite(hi_r)

    empty = ~rest.any(1)
    mn = torch.where(empty, 0.0, torch.where(rest, xg, inf).amin(1))
    mx = torch.where(empty, 0.0, torch.where(rest, xg, -inf).amax(1))
    mn_r = mn.to(meta_dtype).float()
    s_r = (mx / qmax - mn_r / qmax).to(meta_dtype).float()
    bad |= ~torch.isfinite(mn_r) | ~torch.isfinite(s_r)
    inv = torch.where(s_r > 0, 1.0 / s_r, 0.0)
    q = torch.floor((xg - mn_r[:, None]) * inv[:, None] + 0.5).clamp(0.0, qmax)
    q = torch.where(rest & ~bad[:, None], q, 0.0).to(torch.uint8).view(rows, n)

    nan = torch.tensor(float("nan"), device=x.device)
    out = QTensor(torch.zeros(rows, layout.row_bytes, dtype=torch.uint8, device=x.device), layout, numel)
    out.codes.copy_(pack_int4(q) if bits == 4 else q)
    out.min.copy_(torch.where(bad, nan, mn_r).view(rows, -1))
    out.scale.copy_(torch.where(bad, nan, s_r).view(rows, -1))
    if spike_reserve:
        out.spike_lo.copy_(torch.where(bad, nan, lo_r).view(rows, -1))
        out.spike_hi.copy_(torch.where(bad, nan, hi_r).view(rows, -1))
        out.idx_lo.copy_(torch.where(bad | (i_lo >= G), -1, i_lo).view(rows, -1))
        out.idx_hi.copy_(torch.where(bad | (i_hi >= G), -1, i_hi).view(rows, -1))
    return out


def dequantize(
    q: QTensor,
    *,
    reduce_rows: bool = False,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Decode ``q``: the flat ``[numel]`` values, or with ``reduce_rows`` the fp32 sum over rows ``[n]``."""
    L = q.layout
    codes = unpack_int4(q.codes) if L.bits == 4 else q.codes
    codes = codes.float().view(q.rows, L.groups, L.group_size)
    y = codes * q.scale.float()[..., None] + q.min.float()[..., None]
    if L.spike_reserve:
        pos = torch.arange(L.group_size, device=y.device)
        y = torch.where(q.idx_lo.long()[..., None] == pos, q.spike_lo.float()[..., None], y)
        y = torch.where(q.idx_hi.long()[..., None] == pos, q.spike_hi.float()[..., None], y)
    if reduce_rows:
        return y.sum(0).reshape(-1).to(out_dtype)
    return y.reshape(-1)[: q.numel].to(out_dtype)


def fake_quantize(x: torch.Tensor, bits: int = 8, group_size: int = 128, *, spike_reserve: bool = False,
                  meta_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``dequantize(quantize(x))`` in ``x``'s shape and dtype, with a straight-through gradient."""
    q = quantize(x, bits, group_size, spike_reserve=spike_reserve, meta_dtype=meta_dtype)
    y = dequantize(q).view(x.shape)
    return (x + (y - x.float()).detach()).to(x.dtype) if x.requires_grad else y.to(x.dtype)
