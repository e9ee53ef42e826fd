"""Inputs and the whole fg2 forward + backward for the delta-rule variant tests: packed odd-length
sequences with per-channel decay, rates and an initial state; o, the final state and every gradient
of a fixed random projection of both."""

import torch
import torch.nn.functional as F

from catkit.ops.delta_rule.naive import naive_fg2_delta_rule

NAMES = ("q", "k", "v", "g", "bk", "bv", "s0")
OUTS = ("o", "ht") + NAMES


def make_inputs(lens, H, K, V, dtype, decay):
    n = sum(lens)
    q = F.normalize(torch.randn(1, n, H, K), dim=-1)
    k = F.normalize(torch.randn(1, n, H, K), dim=-1)
    x = dict(q=q, k=k, v=torch.randn(1, n, H, V), g=F.logsigmoid(torch.randn(1, n, H, K) + 1.0) * decay,
             bk=torch.sigmoid(torch.randn(1, n, H, K)).clamp_min(1e-3),
             bv=torch.sigmoid(torch.randn(1, n, H, V)).clamp_min(1e-3), s0=torch.randn(len(lens), H, K, V))
    x = {n_: (t if n_ in ("g", "s0") else t.to(dtype)) for n_, t in x.items()}
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    return x, cu


def fwd_bwd(fn, x, cu, **kw):
    """o, final state and the gradients of a random projection of both, as a dict."""
    xs = {n: x[n].detach().clone().requires_grad_() for n in NAMES}
    if fn is naive_fg2_delta_rule:
        xs.update({n: xs[n].detach().float().requires_grad_() for n in ("q", "k", "v", "bk", "bv")})
    o, s = fn(xs["q"], xs["k"], xs["v"], xs["g"], xs["bk"], xs["bv"], initial_state=xs["s0"],
              output_final_state=True, cu_seqlens=cu, **kw)
    gen = torch.Generator().manual_seed(7)
    loss = (o.float() * torch.randn(o.shape, generator=gen)).sum()
    loss = loss + (s * torch.randn(s.shape, generator=gen)).sum()
    grads = torch.autograd.grad(loss, [xs[n] for n in NAMES])
    return dict(o=o.detach(), ht=s.detach(), **dict(zip(NAMES, grads)))
