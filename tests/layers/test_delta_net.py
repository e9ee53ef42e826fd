"""DeltaNet layer (GDN / KDA / FG2-GDN / FG2-GDN+): kernels vs token loop, cache, varlen, model use."""

import pytest
import torch
import torch.nn.functional as F

from catkit.layers.delta_net import VARIANTS, DeltaNet, causal_conv
from catkit.models import CatModel
from catkit.models.config import ModelConfig
from catkit.utils.testing import rel_rms

D, H, K = 32, 2, 16


def _layer(variant, impl="triton", **kw):
    m = DeltaNet(D, H, K, variant, impl=impl, **kw)
    # larger weights than the model's 0.02 init, so gates, rates and the state are all exercised
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
        m.norm_weight.uniform_(0.5, 1.5)
    return m


def _grads(m, x, gy):
    y = m(x, rope=None)
    params = [p for p in m.parameters()]
    return y, torch.autograd.grad((y * gy).sum(), [x] + params)


@pytest.mark.parametrize("variant", VARIANTS)
def test_chunk_matches_naive_forward_and_grads(seed, variant):
    m = _layer(variant)
    x = torch.randn(2, 63, D, requires_grad=True)
    gy = torch.randn(2, 63, D)
    y, g = _grads(m, x, gy)
    m.impl = "naive"
    y_ref, g_ref = _grads(m, x, gy)
    assert rel_rms(y, y_ref) < 1e-4
    names = ["x"] + [n for n, _ in m.named_parameters()]
    for n, a, b in zip(names, g, g_ref):
        assert torch.isfinite(a).all(), n
        assert rel_rms(a, b) < 1e-3, (n, rel_rms(a, b))
    m.impl = "torch"  # the CPU fallback (chunked PyTorch form) agrees as well
    y_t, g_t = _grads(m, x, gy)
    assert rel_rms(y_t, y_ref) < 1e-4
    for n, a, b in zip(names, g_t, g_ref):
        assert rel_rms(a, b) < 1e-3, (n, rel_rms(a, b))


@pytest.mark.parametrize("variant", VARIANTS)
def test_prefill_then_decode_matches_full(seed, variant):
    m = _layer(variant)
    x = torch.randn(2, 63, D)
    with torch.no_grad():
        full = m(x)
        cache = m.new_cache(2, 63, x.device, x.dtype)
        parts = [m(x[:, :37], cache=cache)]  # chunk kernel prefill
        assert cache.length == 37
        for t in range(37, 42):  # one-token steps: fused recurrent kernel
            assert m._mode(x, 1, cache, None) == "recurrent"
            parts.append(m(x[:, t:t + 1], cache=cache))
        parts.append(m(x[:, 42:], cache=cache))  # chunked prefill continuing from the state
        assert cache.length == 63
        assert cache.state.dtype == torch.float32 and cache.state.shape == (2, H, K, K)
    assert rel_rms(torch.cat(parts, 1), full) < 1e-4


@pytest.mark.parametrize("variant", ["kda", "fg2+"])
def test_varlen_matches_separate(seed, variant):
    m = _layer(variant)
    lens = [20, 1, 42]
    xs = [torch.randn(1, n, D) for n in lens]
    cu = torch.tensor([0, 20, 21, 63], dtype=torch.int32)
    packed = torch.cat(xs, 1).requires_grad_()
    y = m(packed, cu_seqlens=cu)
    gy = torch.randn_like(y)
    (gx,) = torch.autograd.grad((y * gy).sum(), packed)
    sep, sep_gx = [], []
    for i, xi in enumerate(xs):
        xi = xi.clone().requires_grad_()
        yi = m(xi)
        sep.append(yi)
        sep_gx.append(torch.autograd.grad((yi * gy[:, cu[i]:cu[i + 1]]).sum(), xi)[0])
    assert rel_rms(y, torch.cat(sep, 1)) < 1e-4
    assert rel_rms(gx, torch.cat(sep_gx, 1)) < 1e-4
    m.impl = "naive"  # and the token-loop fallback takes the same packed batch
    assert rel_rms(m(packed, cu_seqlens=cu), y) < 1e-4


def test_conv_does_not_cross_sequences():
    w = torch.randn(3, 4)
    x = torch.randn(1, 10, 3)
    cu = torch.tensor([0, 4, 10])
    y, _ = causal_conv(x, w, cu_seqlens=cu)
    y0, _ = causal_conv(x[:, :4], w)
    y1, _ = causal_conv(x[:, 4:], w)
    assert torch.allclose(y, torch.cat([y0, y1], 1), atol=1e-6)
    # and the cached tail continues a sequence exactly
    ya, tail = causal_conv(x[:, :7], w)
    yb, _ = causal_conv(x[:, 7:], w, prefix=tail)
    assert torch.allclose(torch.cat([ya, yb], 1), causal_conv(x, w)[0], atol=1e-6)


def test_fg2_with_equal_rates_is_kda(seed):
    """FG2 with bk = bv = beta * 1 is KDA: at the op level and for whole layers with tied weights."""
    kda = _layer("kda")
    fg2 = _layer("fg2", rate_rank=0)  # full-rank rate projection, so it can copy KDA's per-head one
    B, T = 2, 40
    q = F.normalize(torch.randn(B, T, H, K), dim=-1)
    k = F.normalize(torch.randn(B, T, H, K), dim=-1)
    v = torch.randn(B, T, H, K)
    g = F.logsigmoid(torch.randn(B, T, H, K) + 1)
    beta = torch.sigmoid(torch.randn(B, T, H))
    sq = beta.sqrt()[..., None].expand(B, T, H, K)
    o_kda, _ = kda.delta_op(q, k, v, g, beta, None)
    o_fg2, _ = fg2.delta_op(q, k, v, g, sq, sq)
    assert rel_rms(o_fg2, o_kda) < 1e-5
    with torch.no_grad():
        fg2.load_state_dict({n: p for n, p in kda.state_dict().items() if not n.startswith("b_proj")}, strict=False)
        fg2.b_proj.weight.copy_(kda.b_proj.weight.repeat_interleave(K, 0))
        x = torch.randn(B, T, D)
        assert rel_rms(fg2(x), kda(x)) < 1e-5
        fg2.b_proj.weight.add_(0.5 * torch.randn_like(fg2.b_proj.weight))  # and the test can fail
        assert rel_rms(fg2(x), kda(x)) > 1e-3


def test_auto_falls_back_without_triton(monkeypatch, seed):
    m = _layer("fg2", impl="auto")
    x = torch.randn(1, 40, D)
    assert m._mode(x, 40, None, None) == "chunk"  # CPU under the interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert m._mode(x, 40, None, None) == "torch"
    assert m._mode(x, 40, None, torch.tensor([0, 40])) == "naive"
    y = m(x)
    m.impl = "naive"
    assert rel_rms(y, m(x)) < 1e-4


@pytest.mark.parametrize("pattern", ["FA", "GKPA"])
def test_hybrid_model_trains_and_generates(seed, pattern):
    cfg = ModelConfig(d_model=D, n_heads=2, pattern=pattern, max_seq_len=64, ffn_hidden=64,
                      mixer_options={"delta": {"head_dim": K}})
    model = CatModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, cfg.vocab_size, (1, 33))
    losses = []
    for _ in range(3):
        loss, _ = model.loss(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    prompt = torch.randint(0, cfg.vocab_size, (2, 12))
    cached = model.generate(prompt, 3)
    assert torch.equal(cached, model.generate(prompt, 3, use_cache=False))
    assert cached.shape == (2, 15)


def test_bad_options():
    with pytest.raises(ValueError, match="variant"):
        DeltaNet(D, H, K, "gla")
    with pytest.raises(ValueError, match="impl"):
        DeltaNet(D, H, K, "gdn", impl="cuda")
    with pytest.raises(ValueError, match="neg_eigval"):
        DeltaNet(D, H, K, "kda", neg_eigval=True)
    with pytest.raises(ValueError, match="head_dim"):
        DeltaNet(D, H, 256, "fg2")
    with pytest.raises(ValueError, match="mixer_options"):
        CatModel(ModelConfig(d_model=D, n_heads=2, pattern="F", mixer_options={"delta": {"heads": 2}}))
    m = DeltaNet(D, H, K, "fg2")
    cache = m.new_cache(1, 8, "cpu", torch.float32)
    with pytest.raises(ValueError, match="cu_seqlens"):
        m(torch.randn(1, 4, D), cache=cache, cu_seqlens=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="max_len"):
        m(torch.randn(1, 9, D), cache=cache)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", VARIANTS)
def test_gpu_bf16_autocast_layer(variant):
    """On the device: bf16 autocast forward+backward through the Triton kernels vs fp32 PyTorch."""
    torch.manual_seed(0)
    m = DeltaNet(256, 4, 64, variant, impl="triton").cuda()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.05)
    x = torch.randn(2, 1000, 256, device="cuda", requires_grad=True)
    gy = torch.randn(2, 1000, 256, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y, g = _grads(m, x, gy)
    m.impl = "torch"
    y_ref, g_ref = _grads(m, x, gy)
    assert rel_rms(y.float(), y_ref) < 3e-2
    for n, a, b in zip(["x"] + [n for n, _ in m.named_parameters()], g, g_ref):
        assert torch.isfinite(a).all(), n
        assert rel_rms(a.float(), b) < 5e-2, (n, rel_rms(a.float(), b))
