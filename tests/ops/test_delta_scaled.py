"""scaled_kv (k~ = sqrt(bk) k, v~ = sqrt(bv) v) against plain PyTorch, forward and gradients, in
each of its launch forms: a shared rate scaling k and v in one program (per channel or per row),
a per-row rate shared by k and v of different widths, and separate rates."""

import pytest
import torch

from catkit.ops.delta_rule.scaled import scaled_kv
from catkit.utils.testing import assert_close


def _plain(k, v, bk, bv):
    sk = bk.sqrt() if bk.dim() == k.dim() else bk.sqrt()[..., None]
    r = bk if bv is None else bv
    sv = r.sqrt() if r.dim() == v.dim() else r.sqrt()[..., None]
    return k * sk, v * sv


@pytest.mark.parametrize("dev", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("form", ["pair_channel", "pair_row", "row_k_ne_v", "separate"])
def test_scaled_kv_matches_plain_pytorch(seed, form, dtype, dev):
    if dev == "cuda" and not torch.cuda.is_available():
        pytest.skip("gpu test: no CUDA device on this machine")
    B, T, H, K = 2, 37, 3, 24  # odd row count (not a multiple of the 16-row tile), D not a power of 2
    V = 40 if form in ("row_k_ne_v", "separate") else K
    k, v = torch.randn(B, T, H, K), torch.randn(B, T, H, V)
    rate_shape = (B, T, H) if form in ("pair_row", "row_k_ne_v") else (B, T, H, K)
    bk = torch.rand(rate_shape) * 0.98 + 0.01
    bv = torch.rand(B, T, H, V) * 0.98 + 0.01 if form == "separate" else None
    ins = [t.to(dev, dtype).requires_grad_() if t is not None else None for t in (k, v, bk, bv)]
    ref = [t.detach().cpu().double().requires_grad_() if t is not None else None for t in ins]
    *out, check = scaled_kv(*ins)
    check()
    exp = _plain(*ref)
    dk, dv = torch.randn(out[0].shape), torch.randn(out[1].shape)
    (sum((o.float() * d.to(dev)).sum() for o, d in zip(out, (dk, dv)))).backward()
    (sum((o * d.double()).sum() for o, d in zip(exp, (dk, dv)))).backward()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for name, a, b in zip(("k~", "v~"), out, exp):
        assert a.dtype == dtype, name
        assert_close(a.float().cpu(), b.float(), tol, name)
    for name, a, b in zip(("dk", "dv", "dbk", "dbv"), ins, ref):
        if a is None:
            continue
        assert a.grad.dtype == dtype, name
        assert_close(a.grad.float().cpu(), b.grad.float(), tol, name)
