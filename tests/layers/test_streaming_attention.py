"""Streaming (LoZA SSA) mode of ``catkit.layers.attention.Attention`` and its ring-buffer cache.

Tiny shapes, block size 16 so sink + window (1 + 2 blocks) is much shorter than the sequence.
Kernel paths run under the Triton interpreter (conftest sets TRITON_INTERPRET=1 on CPU machines);
``use_kernels=False`` gives the plain-PyTorch path (``naive.py`` / masked SDPA).
"""

import pytest
import torch

from catkit.layers.attention import Attention, StreamingSpec, streaming_mask
from catkit.layers.kv_cache import KVCache, StreamingKVCache
from catkit.layers.rope import rope_cos_sin
from catkit.models import CatModel, ModelConfig
from catkit.ops.sparse_attention.naive import naive_streaming_attention
from catkit.utils.testing import assert_close

SPEC = dict(sink_blocks=1, recent_blocks=2, block_size=16)
# Kernel variants run where the kernels do: CUDA tensors on a GPU machine (TF32 dots, looser
# tolerance), CPU tensors under the interpreter elsewhere.
KDEV = "cuda" if torch.cuda.is_available() else "cpu"
KTOL = 3e-3 if KDEV == "cuda" else 1e-5


def layer(mode="streaming", use_kernels=False, d_model=64, hq=4, hk=2, **spec):
    att = Attention(d_model, hq, hk, d_model // hq, mode=mode, streaming=StreamingSpec(**(spec or SPEC)))
    att.use_kernels = use_kernels
    return att


def rope_for(b, t, d, start=0):
    pos = torch.arange(start, start + t).expand(b, t)
    return rope_cos_sin(pos, d, 10000.0)


def model(pattern="ASA", **kw):
    cfg = ModelConfig(d_model=64, n_heads=4, n_kv_heads=2, pattern=pattern, max_seq_len=160,
                      mixer_options={"streaming": dict(SPEC)}, **kw)
    return CatModel(cfg).eval()


def set_kernels(m, flag):
    for b in m.blocks:
        b.mixer.use_kernels = flag


def reference(att, x, rope, cu_seqlens=None):
    """Streaming layer output from naive.py on the layer's own projections."""
    from catkit.layers.rope import apply_rope

    b, t, _ = x.shape
    q, k, v = att.qkv(x).view(b, t, -1, att.head_dim).split([att.n_heads, att.n_kv_heads, att.n_kv_heads], 2)
    q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    o = naive_streaming_attention(q, k, v, **SPEC, cu_seqlens=cu_seqlens)
    return att.out(o.reshape(b, t, -1))


@pytest.mark.parametrize("use_kernels", [False, True])
def test_streaming_layer_matches_naive_with_grads(seed, use_kernels):
    """Packed varlen batch (odd lengths, GQA): output and every gradient vs the naive reference."""
    dev, tol = (KDEV, max(KTOL, 1e-4)) if use_kernels else ("cpu", 1e-4)
    att = layer(use_kernels=use_kernels).to(dev)
    lens = [63, 37] if use_kernels else [63, 100, 5]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=dev)
    x = torch.randn(1, sum(lens), 64, device=dev, requires_grad=True)
    pos = torch.cat([torch.arange(n) for n in lens])[None].to(dev)
    rope = rope_cos_sin(pos, 16, 10000.0)
    out = att(x, rope=rope, cu_seqlens=cu)
    ref = reference(att, x, rope, cu)
    assert_close(out, ref, tol, "output")
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, att.qkv.weight, att.out.weight], g)
    grads_ref = torch.autograd.grad(ref, [x, att.qkv.weight, att.out.weight], g)
    for name, a, e in zip(["dx", "dW_qkv", "dW_out"], grads, grads_ref):
        assert_close(a, e, tol, name)


def test_streaming_equals_dense_within_window_and_differs_beyond(seed):
    att = layer()
    dense = layer(mode="dense")
    dense.load_state_dict(att.state_dict())
    short = torch.randn(2, 2 * 16, 64)  # T <= recent_blocks * block: every query sees every key
    assert_close(att(short, rope=rope_for(2, 32, 16)), dense(short, rope=rope_for(2, 32, 16)), 1e-5, "short")
    long = torch.randn(2, 100, 64)
    diff = (att(long, rope=rope_for(2, 100, 16)) - dense(long, rope=rope_for(2, 100, 16))).abs()
    assert diff[:, :48].max() < 1e-5 and diff[:, 48:].max() > 1e-3  # first query block past the window: 48


def test_mode_flip_on_trained_layer(seed):
    att = layer(mode="dense")
    x = torch.randn(1, 80, 64)
    dense = att(x, rope=rope_for(1, 80, 16))
    att.mode = "streaming"
    assert_close(att(x, rope=rope_for(1, 80, 16)), reference(att, x, rope_for(1, 80, 16)), 1e-5, "flipped")
    att.mode = "dense"
    assert torch.equal(att(x, rope=rope_for(1, 80, 16)), dense)


def test_ring_buffer_stays_at_sink_plus_window():
    s, r, bs = SPEC["sink_blocks"], SPEC["recent_blocks"], SPEC["block_size"]
    cache = StreamingKVCache(2, 1000, 2, 16, "cpu", torch.float32, **SPEC)
    assert cache.capacity == (s + r) * bs
    shape, nbytes = cache.k.shape, cache.nbytes
    full = KVCache(2, 1000, 2, 16, "cpu", torch.float32)
    assert nbytes * 1000 == full.nbytes * cache.capacity
    n = 0
    for t in [5, 1, 70, 1, 1, 33, 1, 120, 1]:  # prefill, decode steps and chunks longer than the window
        k = torch.arange(n, n + t, dtype=torch.float32)[None, :, None, None].expand(2, t, 2, 16)
        cache.append(k, k + 0.5)
        n += t
        assert cache.length == n and cache.k.shape == shape and cache.nbytes == nbytes
        # Holds the sink tokens and the last window (r * bs) tokens, each in its own slot.
        want = sorted(set(range(min(n, s * bs))) | set(range(max(0, n - r * bs), n)))
        held = sorted(p for p in cache.slot_pos.tolist() if p >= 0)
        assert held == want
        ok = cache.slot_pos >= 0
        assert torch.equal(cache.k[0, ok, 0, 0], cache.slot_pos[ok].float())
        assert torch.equal(cache.v[1, ok, 1, 3], cache.slot_pos[ok].float() + 0.5)
    small = StreamingKVCache(1, 20, 2, 16, "cpu", torch.float32, **SPEC)
    assert small.capacity == 32  # never more than max_len rounded up to blocks
    with pytest.raises(ValueError, match="max_len"):
        small.append(torch.zeros(1, 21, 2, 16), torch.zeros(1, 21, 2, 16))


def test_block_table_pages_match_slots():
    cache = StreamingKVCache(3, 500, 1, 16, "cpu", torch.float32, **SPEC)
    table = cache.block_table(20)
    pos = torch.arange(320)
    for b in range(3):
        page_slot = (table[b, pos // 16].long() - b * cache.n_blocks) * 16 + pos % 16
        assert torch.equal(page_slot, cache.slots(pos))


@pytest.mark.parametrize("use_kernels", [False, True])
def test_streaming_decode_equals_prefill(seed, use_kernels, monkeypatch):
    """Prefill + chunk + one-token steps through the ring buffer == one full forward, same positions."""
    import catkit.ops.sparse_attention as sa

    calls = {"prefill": 0, "decode": 0}
    real_prefill, real_decode = sa.streaming_attention, sa.paged_decode_attention

    def spy(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(sa, "streaming_attention", spy("prefill", real_prefill))
    monkeypatch.setattr(sa, "paged_decode_attention", spy("decode", real_decode))
    dev, tol = (KDEV, KTOL) if use_kernels else ("cpu", 1e-5)
    m = model("ASA").to(dev)
    set_kernels(m, use_kernels)
    x = torch.randint(0, 259, (2, 100), device=dev)
    # Kernel path: prefill kernel then paged decode across two ring wrap-arounds (blocks 3 and 4).
    cuts = [50] + list(range(51, 68)) if use_kernels else [20, 45] + list(range(46, 100))
    full = m(x[:, : cuts[-1]]).logits
    caches = m.new_caches(2, 128)
    assert isinstance(caches[1], StreamingKVCache) and isinstance(caches[0], KVCache)
    assert caches[1].k.device.type == dev
    parts, start = [], 0
    for end in cuts:
        parts.append(m(x[:, start:end], caches=caches).logits)
        start = end
        assert caches[1].k.shape[1] == 48
    assert_close(torch.cat(parts, 1), full, tol, "cached logits")
    # The kernels ran (full forward + prefill, and every one-token step) or were not touched.
    assert calls == ({"prefill": 2, "decode": len(cuts) - 1} if use_kernels else {"prefill": 0, "decode": 0})


def test_generate_with_streaming_layers(seed):
    m = model("SAS")
    set_kernels(m, False)
    x = torch.randint(0, 259, (2, 40))
    a = m.generate(x, 15)
    b = m.generate(x, 15, use_cache=False)
    assert torch.equal(a, b)


def test_full_cache_made_before_flip(seed):
    """A dense KVCache made before switching to streaming still gives streaming results."""
    m = model("AAA")
    set_kernels(m, False)
    x = torch.randint(0, 259, (1, 90))
    caches = m.new_caches(1, 96)
    for b in m.blocks:
        b.mixer.mode = "streaming"
    full = m(x).logits
    parts = [m(x[:, :40], caches=caches).logits] + [m(x[:, t:t + 1], caches=caches).logits for t in range(40, 90)]
    assert_close(torch.cat(parts, 1), full, 1e-5, "flipped with a full cache")


def test_gated_mode_blends_dense_and_streaming(seed):
    att = layer(mode="gated")
    att.loza_gate = torch.nn.Parameter(torch.tensor(0.7))
    x = torch.randn(2, 70, 64)
    rope = rope_for(2, 70, 16)
    out = att(x, rope=rope)
    att.mode = "dense"
    dense = att(x, rope=rope)
    att.mode = "streaming"
    sparse = att(x, rope=rope)
    a = torch.sigmoid(torch.tensor(0.7))
    assert_close(out, a * dense + (1 - a) * sparse, 1e-5, "blend")
    att.mode = "gated"
    (g,) = torch.autograd.grad(att(x, rope=rope).pow(2).sum(), [att.loza_gate])
    assert g.abs() > 0


def test_streaming_mask_window_sizes():
    """Block-aligned window: recent tokens seen vary between (R-1)*block+1 and R*block."""
    spec = StreamingSpec(sink_blocks=0, recent_blocks=3, block_size=16)
    p = torch.arange(200)
    seen = streaming_mask(p, p, spec).sum(1)
    assert seen[48:].min() == 2 * 16 + 1 and seen[48:].max() == 3 * 16


def test_bad_input():
    with pytest.raises(ValueError, match="recent_blocks"):
        StreamingSpec(recent_blocks=0)
    with pytest.raises(ValueError, match="sink_blocks"):
        StreamingSpec(sink_blocks=-1)
    with pytest.raises(ValueError, match="block_size"):
        StreamingSpec(block_size=0)
    with pytest.raises(ValueError, match="mode"):
        layer(mode="sparse")
    with pytest.raises(ValueError, match="mixer_options"):
        CatModel(ModelConfig(pattern="S", mixer_options={"streaming": {"window": 3}}))
    att = layer(mode="gated")
    with pytest.raises(ValueError, match="cache"):
        att(torch.randn(1, 4, 64), rope=rope_for(1, 4, 16), cache=KVCache(1, 8, 2, 16, "cpu", torch.float32))
    att.mode = "dense"
    sc = StreamingKVCache(1, 8, 2, 16, "cpu", torch.float32, **SPEC)
    with pytest.raises(ValueError, match="cache"):
        att(torch.randn(1, 4, 64), rope=rope_for(1, 4, 16), cache=sc)
    att.mode = "streaming"
    wrong = StreamingKVCache(1, 8, 2, 16, "cpu", torch.float32, sink_blocks=2, recent_blocks=2, block_size=16)
    with pytest.raises(ValueError, match="cache"):
        att(torch.randn(1, 4, 64), rope=rope_for(1, 4, 16), cache=wrong)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_bf16_streaming_layer_lo_za_pattern(seed, head_dim):
    """LoZA's pattern (1 sink + 8 recent blocks of 128) in bf16 on the GPU: kernels vs an fp32 reference,
    forward and gradients, then prefill + paged decode through the ring buffer vs one full pass."""
    dm, t = 4 * head_dim, 2500
    att = Attention(dm, 4, 2, head_dim, mode="streaming", streaming=StreamingSpec()).cuda()
    x = torch.randn(2, t, dm, device="cuda", requires_grad=True)
    pos = torch.arange(t, device="cuda").expand(2, t)
    rope = rope_cos_sin(pos, head_dim, 10000.0)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = att(x, rope=rope)
    from catkit.layers.rope import apply_rope

    q, k, v = att.qkv(x).view(2, t, -1, head_dim).split([4, 2, 2], 2)
    q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    ref = att.out(naive_streaming_attention(q, k, v, sink_blocks=1, recent_blocks=8, block_size=128).reshape(2, t, -1))
    assert_close(out.float(), ref, 2e-2, "bf16 output")
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out.float(), [x, att.qkv.weight], g)
    want = torch.autograd.grad(ref, [x, att.qkv.weight], g)
    for name, a, e in zip(["dx", "dW_qkv"], got, want):
        assert_close(a.float(), e, 3e-2, name)
    att = att.to(torch.bfloat16)
    xb = x.detach().to(torch.bfloat16)
    with torch.no_grad():
        full = att(xb, rope=rope)
        cache = att.new_cache(2, t, "cuda", torch.bfloat16)
        assert cache.capacity == 9 * 128
        parts = [att(xb[:, :2300], rope=tuple(r[:, :2300] for r in rope), cache=cache)]
        for i in range(2300, t):
            parts.append(att(xb[:, i:i + 1], rope=tuple(r[:, i:i + 1] for r in rope), cache=cache))
    assert_close(torch.cat(parts, 1).float(), full.float(), 2e-2, "bf16 decode vs prefill")
