"""Delta-rule kernels (chunked fwd+bwd, recurrent decode) against the token-loop ground truth."""

import math

import pytest
import torch
import torch.nn.functional as F

from catkit.ops.delta_rule import (chunk_fg2_delta_rule, chunk_gated_delta_rule, chunk_kda,
                                   fused_recurrent_fg2_delta_rule, fused_recurrent_gated_delta_rule)
from catkit.ops.delta_rule import chunk_fwd as chunk_fwd_mod
from catkit.ops.delta_rule.naive import (chunked_reference_fg2, naive_fg2_delta_rule,
                                         naive_gated_delta_rule, naive_kda,
                                         naive_one_sided_delta_rule)
from catkit.utils.testing import assert_close, rel_rms

RTOL = 1e-4  # fp32 kernels vs fp32 token loop, relative RMS
# A kernel lane that overflows (even if masked out later) means it read past a sequence or chunk.
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")


def _inputs(B, T, H, K, V, *, decay=1.0, scalar_g=False, dtype=torch.float32, device="cpu", h0=True,
            N=None):
    q = F.normalize(torch.randn(B, T, H, K, device=device), dim=-1)
    k = F.normalize(torch.randn(B, T, H, K, device=device), dim=-1)
    v = torch.randn(B, T, H, V, device=device)
    gshape = (B, T, H) if scalar_g else (B, T, H, K)
    g = F.logsigmoid(torch.randn(*gshape, device=device) + 1.0) * decay
    bk = torch.sigmoid(torch.randn(B, T, H, K, device=device)).clamp_min(1e-3)
    bv = torch.sigmoid(torch.randn(B, T, H, V, device=device)).clamp_min(1e-3)
    s0 = torch.randn(N or B, H, K, V, device=device) if h0 else None
    cast = lambda x: x.to(dtype).requires_grad_()  # noqa: E731
    return dict(q=cast(q), k=cast(k), v=cast(v), g=cast(g), bk=cast(bk), bv=cast(bv),
                s0=s0.requires_grad_() if h0 else None)


def _grads(o, s, tensors, seed_like=None):
    gen = torch.Generator().manual_seed(1234)
    do = torch.randn(o.shape, generator=gen).to(o.device)
    loss = (o.float() * do).sum()
    if s is not None:
        loss = loss + (s * torch.randn(s.shape, generator=gen).to(s.device)).sum()
    return torch.autograd.grad(loss, tensors)


def _check(name, a, b, rtol):
    err = assert_close(a, b, rtol=rtol, name=name)
    print(f"{name}: {err:.2e}")


@pytest.mark.parametrize("T,BT,K,decay,coupled", [(63, 32, 48, 1.0, False), (100, 64, 16, 1.0, True),
                                                   (70, 64, 16, 20.0, False)])
def test_chunk_matches_naive_fwd_bwd(seed, T, BT, K, decay, coupled):
    # K = 48 runs the two dq/dk/dg kernels on two key blocks each, the second half masked;
    # decay 20 checks that no masked lane of their exp overflows (RuntimeWarning is an error)
    chunk_fwd_mod.COMPILED.clear()
    V = K if coupled else 32
    x = _inputs(2, T, 2, K, V, decay=decay)
    bv = None if coupled else x["bv"]
    names = ["q", "k", "v", "g", "bk"] + ([] if coupled else ["bv"]) + ["s0"]
    ts = [x[n] for n in names]
    o, s = chunk_fg2_delta_rule(x["q"], x["k"], x["v"], x["g"], x["bk"], bv, initial_state=x["s0"],
                                output_final_state=True, chunk_size=BT)
    o_ref, s_ref = naive_fg2_delta_rule(x["q"], x["k"], x["v"], x["g"], x["bk"], bv,
                                        initial_state=x["s0"], output_final_state=True)
    _check("o", o, o_ref, RTOL)
    _check("final_state", s, s_ref, RTOL)
    for n, a, b in zip(names, _grads(o, s, ts), _grads(o_ref, s_ref, ts)):
        _check(f"d{n}", a, b, 1e-3 if n == "g" else RTOL)
    assert {"chunk_bwd_dqkg_inter_kernel", "chunk_bwd_dqkg_intra_kernel"} <= set(chunk_fwd_mod.COMPILED)


def test_chunked_reference_matches_naive(seed):
    x = _inputs(2, 70, 2, 16, 16, decay=5.0)
    a = naive_fg2_delta_rule(x["q"], x["k"], x["v"], x["g"], x["bk"], initial_state=x["s0"],
                             output_final_state=True)
    b = chunked_reference_fg2(x["q"], x["k"], x["v"], x["g"], x["bk"], initial_state=x["s0"],
                              output_final_state=True, chunk_size=32)
    _check("o", b[0], a[0], 1e-5)
    _check("final_state", b[1], a[1], 1e-5)


def test_varlen_packed_equals_separate(seed):
    lens = [37, 33, 5, 20]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    x = _inputs(1, sum(lens), 2, 16, 32, N=len(lens))
    ts = [x[n] for n in ("q", "k", "v", "g", "bk", "bv", "s0")]
    o, s = chunk_fg2_delta_rule(x["q"], x["k"], x["v"], x["g"], x["bk"], x["bv"], initial_state=x["s0"],
                                output_final_state=True, cu_seqlens=cu, chunk_size=32)
    o_ref, s_ref = naive_fg2_delta_rule(x["q"], x["k"], x["v"], x["g"], x["bk"], x["bv"],
                                        initial_state=x["s0"], output_final_state=True, cu_seqlens=cu)
    _check("o", o, o_ref, RTOL)
    _check("final_state", s, s_ref, RTOL)
    for n, a, b in zip(("q", "k", "v", "g", "bk", "bv", "s0"), _grads(o, s, ts), _grads(o_ref, s_ref, ts)):
        _check(f"d{n}", a, b, 1e-3 if n == "g" else RTOL)
    # each sequence on its own through the same kernel gives the same numbers
    with torch.no_grad():
        for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
            oi, si = chunk_fg2_delta_rule(*(x[n][:, a:b] for n in ("q", "k", "v", "g", "bk", "bv")),
                                          initial_state=x["s0"][i:i + 1], output_final_state=True,
                                          chunk_size=32)
            _check(f"seq{i}.o", oi, o[:, a:b], 1e-5)
            _check(f"seq{i}.state", si, s[i:i + 1], 1e-5)


def test_prefill_then_decode_equals_one_pass(seed):
    T, split = 70, 66
    x = _inputs(2, T, 2, 16, 32)
    args = ("q", "k", "v", "g", "bk", "bv")
    with torch.no_grad():
        o_full, s_full = chunk_fg2_delta_rule(*(x[n] for n in args), initial_state=x["s0"],
                                              output_final_state=True, chunk_size=32)
        o1, s = chunk_fg2_delta_rule(*(x[n][:, :split] for n in args), initial_state=x["s0"],
                                     output_final_state=True, chunk_size=32)
        outs = [o1]
        # one token per step, then the rest as a 3-token decode call
        o2, s = fused_recurrent_fg2_delta_rule(*(x[n][:, split:split + 1] for n in args), initial_state=s,
                                               output_final_state=True)
        o3, s = fused_recurrent_fg2_delta_rule(*(x[n][:, split + 1:] for n in args), initial_state=s,
                                               output_final_state=True)
        outs += [o2, o3]
    _check("o", torch.cat(outs, 1), o_full, 1e-5)
    _check("final_state", s, s_full, 1e-5)


def test_recurrent_varlen_matches_naive(seed):
    cu = torch.tensor([0, 1, 4, 6], dtype=torch.int32)
    x = _inputs(1, 6, 3, 32, 32, scalar_g=True, N=3)
    with torch.no_grad():
        o, s = fused_recurrent_gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["bk"][..., 0],
                                                initial_state=x["s0"], output_final_state=True,
                                                cu_seqlens=cu)
        o_ref, s_ref = naive_gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["bk"][..., 0],
                                              initial_state=x["s0"], output_final_state=True,
                                              cu_seqlens=cu)
    _check("o", o, o_ref, 1e-5)
    _check("final_state", s, s_ref, 1e-5)
    o, _ = fused_recurrent_fg2_delta_rule(x["q"], x["k"], x["v"], x["g"], x["bk"], cu_seqlens=cu)
    with pytest.raises(NotImplementedError, match="forward-only"):
        o.sum().backward()


def test_fg2_with_uniform_rate_is_kda(seed):
    x = _inputs(2, 40, 2, 16, 32)
    beta = torch.sigmoid(torch.randn(2, 40, 2)).requires_grad_()
    bk = beta[..., None].expand(2, 40, 2, 16)
    bv = beta[..., None].expand(2, 40, 2, 32)
    o_fg2, _ = chunk_fg2_delta_rule(x["q"], x["k"], x["v"], x["g"], bk, bv, chunk_size=16)
    o_kda, _ = chunk_kda(x["q"], x["k"], x["v"], x["g"], beta, chunk_size=16)
    _check("fg2 vs kda", o_fg2, o_kda, 1e-6)
    o_ref, _ = naive_kda(x["q"], x["k"], x["v"], x["g"], beta)
    _check("kda vs naive", o_kda, o_ref, RTOL)
    ts = [x["q"], x["k"], x["v"], x["g"], beta]
    for n, a, b in zip(("q", "k", "v", "g", "beta"), _grads(o_kda, None, ts), _grads(o_ref, None, ts)):
        _check(f"kda d{n}", a, b, 1e-3 if n == "g" else RTOL)


def test_scalar_decay_equals_broadcast_channel_decay(seed):
    x = _inputs(2, 50, 2, 16, 32, scalar_g=True, h0=False)
    beta = torch.sigmoid(torch.randn(2, 50, 2)).requires_grad_()
    g_vec = x["g"][..., None].expand(2, 50, 2, 16)
    o_gdn, _ = chunk_gated_delta_rule(x["q"], x["k"], x["v"], x["g"], beta, chunk_size=32)
    o_kda, _ = chunk_kda(x["q"], x["k"], x["v"], g_vec, beta, chunk_size=32)
    _check("gdn vs kda(broadcast g)", o_gdn, o_kda, 1e-6)
    ts = [x["q"], x["k"], x["v"], x["g"], beta]
    d_gdn = _grads(o_gdn, None, ts)
    for n, a, b in zip(("q", "k", "v", "g", "beta"), d_gdn, _grads(o_kda, None, ts)):
        _check(f"d{n}", a, b, 1e-5)
    o_ref, _ = naive_gated_delta_rule(x["q"], x["k"], x["v"], x["g"], beta)
    for n, a, b in zip(("q", "k", "v", "g", "beta"), d_gdn, _grads(o_ref, None, ts)):
        _check(f"gdn vs naive d{n}", a, b, 1e-3 if n == "g" else RTOL)


def test_half_precision_inputs_fp32_state(seed):
    x = _inputs(1, 40, 2, 16, 16, dtype=torch.float16, decay=0.05)
    o, s = chunk_fg2_delta_rule(x["q"], x["k"], x["v"] * 300, x["g"], x["bk"], output_final_state=True,
                                chunk_size=16)
    assert o.dtype == torch.float16 and s.dtype == torch.float32
    o_ref, s_ref = naive_fg2_delta_rule(x["q"], x["k"], x["v"] * 300, x["g"], x["bk"],
                                        output_final_state=True)
    _check("o fp16", o, o_ref, 3e-3)
    _check("state fp16", s, s_ref, 3e-3)


def test_bf16_inputs(seed):
    x = _inputs(1, 80, 2, 32, 32, dtype=torch.bfloat16, h0=False)
    ts = [x[n] for n in ("q", "k", "v", "bk")]
    o, s = chunk_fg2_delta_rule(x["q"], x["k"], x["v"], x["g"].float(), x["bk"], output_final_state=True,
                                chunk_size=32)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    ref = [t.detach().float().requires_grad_() for t in ts]
    o_ref, s_ref = naive_fg2_delta_rule(ref[0], ref[1], ref[2], x["g"].float(), ref[3], output_final_state=True)
    _check("o bf16", o, o_ref, 2e-2)
    _check("state bf16", s, s_ref, 2e-2)
    for n, a, b in zip(("q", "k", "v", "bk"), _grads(o, s, ts), _grads(o_ref, s_ref, ref)):
        _check(f"d{n} bf16", a, b, 2e-2)


def test_one_sided_ablation_differs_and_reduces():
    torch.manual_seed(0)
    x = _inputs(1, 20, 1, 16, 16, h0=False)
    with torch.no_grad():
        ones = torch.ones_like(x["bk"])
        a, _ = naive_one_sided_delta_rule(x["q"], x["k"], x["v"], x["g"], ones)
        b, _ = naive_fg2_delta_rule(x["q"], x["k"], x["v"], x["g"], ones)
        _check("one-sided with b=1 vs fg2", a, b, 1e-6)
        a, _ = naive_one_sided_delta_rule(x["q"], x["k"], x["v"], x["g"], x["bk"])
        b, _ = naive_fg2_delta_rule(x["q"], x["k"], x["v"], x["g"], x["bk"])
    assert rel_rms(a, b) > 1e-2


def test_bad_inputs():
    x = _inputs(1, 8, 2, 16, 32, h0=False)
    q, k, v, g, bk, bv = (x[n].detach() for n in ("q", "k", "v", "g", "bk", "bv"))
    f = chunk_fg2_delta_rule
    with pytest.raises(ValueError, match="bv"):
        f(q, k, v, g, bk)  # K != V with bv=None
    with pytest.raises(ValueError, match="^k:"):
        f(q, k[:, :4], v, g, bk, bv)
    with pytest.raises(ValueError, match="^g:"):
        f(q, k, v, g[..., :3], bk, bv)
    with pytest.raises(ValueError, match="^bk:"):
        f(q, k, v, g, bk * 2.5 + 0.5, bv)
    with pytest.raises(ValueError, match="^bv:"):
        f(q, k, v, g, bk, torch.zeros_like(bv))
    big = torch.zeros(1, 8, 2, 256)
    with pytest.raises(ValueError, match="^q: head dim"):
        f(big, big, big, big, big.fill_(0.5))
    with pytest.raises(ValueError, match="^cu_seqlens"):
        f(q, k, v, g, bk, bv, cu_seqlens=torch.tensor([1, 8], dtype=torch.int32))
    with pytest.raises(ValueError, match="^cu_seqlens"):
        f(q, k, v, g, bk, bv, cu_seqlens=torch.tensor([0, 5, 5, 8], dtype=torch.int32))
    with pytest.raises(ValueError, match="^initial_state"):
        f(q, k, v, g, bk, bv, initial_state=torch.zeros(1, 2, 16, 16))
    with pytest.raises(ValueError, match="^beta"):
        chunk_gated_delta_rule(q, k, v, g[..., 0], bk)
    with pytest.raises(ValueError, match="^g"):
        chunk_gated_delta_rule(q, k, v, g, bk[..., 0])
    with pytest.raises(ValueError, match="^k, v"):
        f(q, k.half(), v, g, bk, bv)



@pytest.mark.parametrize("dev", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_rate_range_checked_by_the_scaling_kernel(seed, dev):
    """The (0, 1] check runs inside scaled_kv's kernel (no separate pass): every entry point names
    the offending rate, NaN included, and valid rates pass."""
    if dev == "cuda" and not torch.cuda.is_available():
        pytest.skip("gpu test: no CUDA device on this machine")
    x = _inputs(1, 40, 2, 16, 16, h0=False)
    q, k, v, g, bk, bv = (x[n].detach().to(dev) for n in ("q", "k", "v", "g", "bk", "bv"))
    with pytest.raises(ValueError, match="^bk: rates"):
        chunk_fg2_delta_rule(q, k, v, g, bk.masked_fill(bk > bk.median(), float("nan")), bv)
    with pytest.raises(ValueError, match="^bv: rates"):
        chunk_fg2_delta_rule(q, k, v, g, bk, bv * 0.0)
    with pytest.raises(ValueError, match="^bk: rates"):
        chunk_fg2_delta_rule(q, k, v, g, bk + 1.0)  # coupled: bk scales v too
    with pytest.raises(ValueError, match="^beta: rates"):
        chunk_gated_delta_rule(q, k, v, g[..., 0], bk[..., 0] + 1.0)
    with pytest.raises(ValueError, match="^bk: rates"):
        fused_recurrent_fg2_delta_rule(q, k, v, g, -bk, bv)
    o, _ = chunk_fg2_delta_rule(q, k, v, g, bk, bv)
    assert torch.isfinite(o).all()

@pytest.mark.gpu
def test_gpu_bf16_large_vs_fp32_reference(seed):
    """B=4, T=4096, H=16, K=V=128, bf16, forward and every gradient.

    Method: (1) the fp32 kernel (ieee dots) is checked against the plain-PyTorch chunked fp32
    reference at B=1, T=1024 and against the token loop at T=128; (2) the bf16 kernel at full size
    is checked against the fp32 kernel run on the same (bf16-rounded) inputs.
    """
    dev = "cuda"
    names = ("q", "k", "v", "g", "bk", "bv", "s0")

    def run(x, fn, dtype):
        ts = [x[n] for n in names]
        cast = [t.detach().to(dtype if n != "s0" else torch.float32).requires_grad_() for n, t in zip(names, ts)]
        o, s = fn(*cast[:6], initial_state=cast[6], output_final_state=True)
        return (o.float(), s, *(g.float() for g in _grads(o, s, cast)))

    def report(tag, a, b, tols):
        errs = {n: rel_rms(x, y) for n, x, y in zip(("o", "state") + tuple("d" + n for n in names), a, b)}
        print(tag, " ".join(f"{n}={e:.2e}" for n, e in errs.items()))
        for n, e in errs.items():
            assert e <= tols.get(n, tols["*"]), f"{tag}: {n} rel RMS {e:.2e}"

    for (B, T, ref) in ((1, 128, naive_fg2_delta_rule), (1, 1024, chunked_reference_fg2)):
        x = _inputs(B, T, 16, 128, 128, device=dev)
        report(f"fp32 kernel vs {ref.__name__} T={T}:", run(x, chunk_fg2_delta_rule, torch.float32),
               run(x, ref, torch.float32), {"*": 2e-4, "dg": 2e-3})
    x = _inputs(4, 4096, 16, 128, 128, device=dev)
    xb = {n: (t.detach().bfloat16().float() if n != "s0" else t.detach()) for n, t in x.items()}
    report("bf16 kernel vs fp32 kernel B=4 T=4096:", run(xb, chunk_fg2_delta_rule, torch.bfloat16),
           run(xb, chunk_fg2_delta_rule, torch.float32), {"*": 3e-2, "dg": 6e-2})


@pytest.mark.gpu
def test_gpu_recurrent_decode_after_chunk_prefill(seed):
    """On the device, H=16, K=V=128, bf16 inputs: chunk prefill of 4000 tokens, then 1 + 7 tokens
    through the fused recurrent kernel, against one fp32 chunk pass over all 4008 tokens."""
    x = _inputs(2, 4008, 16, 128, 128, device="cuda")
    args = ("q", "k", "v", "g", "bk", "bv")
    xb = {n: x[n].detach().bfloat16() for n in args}
    with torch.no_grad():
        o_ref, s_ref = chunk_fg2_delta_rule(*(xb[n].float() for n in args), initial_state=x["s0"].detach(),
                                            output_final_state=True)
        _, s = chunk_fg2_delta_rule(*(xb[n][:, :4000] for n in args), initial_state=x["s0"].detach(),
                                    output_final_state=True)
        o1, s = fused_recurrent_fg2_delta_rule(*(xb[n][:, 4000:4001] for n in args), initial_state=s,
                                               output_final_state=True)
        o2, s = fused_recurrent_fg2_delta_rule(*(xb[n][:, 4001:] for n in args), initial_state=s,
                                               output_final_state=True)
    e_o = rel_rms(torch.cat([o1, o2], 1).float(), o_ref[:, 4000:])
    e_s = rel_rms(s, s_ref)
    print(f"recurrent decode after bf16 chunk prefill: o={e_o:.2e} state={e_s:.2e}")
    assert s.dtype == torch.float32
    assert e_o < 3e-2 and e_s < 3e-2, (e_o, e_s)


def test_zero_length_batch_returns_empty_output_and_initial_state(seed):
    """T = 0 (an empty batch of positions) is not an error: o is empty, the state passes through."""
    x = _inputs(2, 0, 2, 16, 16)
    o, s = chunk_fg2_delta_rule(x["q"], x["k"], x["v"], x["g"], x["bk"], initial_state=x["s0"],
                                output_final_state=True)
    assert o.shape == (2, 0, 2, 16)
    torch.testing.assert_close(s, x["s0"].detach())
