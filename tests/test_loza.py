"""LoZA calibration and conversion on catkit models and (when installed) Hugging Face Llama / Qwen3.

Plain-PyTorch attention paths (``set_use_kernels(model, False)``): the kernels are tested in
``tests/ops`` and ``tests/layers``; here the Triton interpreter would only make training slow.
"""

import pytest
import torch

from catkit.layers.kv_cache import KVCache, StreamingKVCache
from catkit.loza import calibrate, convert, kv_cache_bytes, loza_layers, set_use_kernels, streaming_layer_indices
from catkit.models import CatModel, ModelConfig
from catkit.ops.sparse_attention.naive import streaming_block_mask
from catkit.utils.testing import assert_close

SPEC = {"sink_blocks": 1, "recent_blocks": 2, "block_size": 16}


def tiny(pattern="AAAA", **kw):
    cfg = ModelConfig(d_model=64, n_heads=4, n_kv_heads=2, pattern=pattern, max_seq_len=256,
                      mixer_options={"streaming": dict(SPEC)}, **kw)
    m = CatModel(cfg)
    set_use_kernels(m, False)
    return m


def random_data(seq_len, batch=2, vocab=259):
    def data(step):
        g = torch.Generator().manual_seed(step)
        x = torch.randint(0, vocab, (batch, seq_len + 1), generator=g)
        return x[:, :-1], x[:, 1:]
    return data


def test_calibrate_trains_only_gates_and_restores_model(seed):
    m = tiny()
    m.train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m.blocks[3].mixer.mode = "streaming"
    log = []
    alphas = calibrate(m, random_data(96), steps=3, lr=0.5, log=log, progress=False)
    assert len(alphas) == 4 and all(0 < a < 1 for a in alphas)
    assert any(abs(a - 0.5) > 1e-3 for a in alphas)  # long sequences: the gates moved
    assert len(log) == 3 and len(log[0]["alphas"]) == 4
    after = m.state_dict()
    assert after.keys() == before.keys()  # no gate left behind
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for p in m.parameters()) and m.training
    assert [b.mixer.mode for b in m.blocks] == ["dense"] * 3 + ["streaming"]
    assert [b.mixer.loza_gate for b in m.blocks] == [None] * 4
    assert [b.mixer.loza_alpha for b in m.blocks] == alphas


def test_gate_gradient_is_the_dense_streaming_difference(seed):
    """Within the window dense == streaming: (almost) no gate gradient; beyond it a real one."""
    m = tiny("AA")
    grads = {}
    for t in (32, 96):
        for b in m.blocks:
            b.mixer.mode, b.mixer.loza_gate = "gated", torch.nn.Parameter(torch.zeros(()))
        x, y = random_data(t)(0)
        torch.nn.functional.cross_entropy(m(x).logits.flatten(0, 1), y.flatten()).backward()
        grads[t] = [float(b.mixer.loza_gate.grad.abs()) for b in m.blocks]
    assert max(grads[32]) < 1e-8 and min(grads[96]) > 1e-6  # observed: ~1e-9 (rounding) vs ~1e-4


def test_calibrate_ranks_gates_by_gain(seed):
    """A gate whose alpha lowers the loss more ends higher (shared-scale update keeps magnitudes)."""
    m = tiny("AAAA")
    gain = [3.0, 1.0, 0.2, 2.0]

    def loss_fn(model, x, y):
        alpha = torch.stack([torch.sigmoid(b.mixer.loza_gate) for b in model.blocks])
        return -(torch.tensor(gain) * alpha).sum() + 0 * model(x[:, :8]).logits.sum()

    alphas = calibrate(m, random_data(8), steps=20, lr=0.1, loss_fn=loss_fn, progress=False)
    assert sorted(range(4), key=lambda i: alphas[i]) == [2, 1, 3, 0]
    assert alphas[0] - alphas[3] > 0.05 and alphas[1] - alphas[2] > 0.05


def test_calibrate_l1_pushes_toward_streaming(seed):
    m = tiny("AA")
    low = calibrate(m, random_data(32), steps=3, lr=0.5, l1=1.0, progress=False)
    assert all(a < 0.3 for a in low)


def test_convert_lowest_alphas_and_pattern(seed):
    m = tiny("AAAAAA").eval()
    x = torch.randint(0, 259, (1, 100))
    chosen = convert(m, 0.5, alphas=[0.9, 0.1, 0.5, 0.2, 0.8, 0.1])
    assert chosen == [1, 3, 5]
    assert m.cfg.pattern == "ASASAS" and streaming_layer_indices(m) == [1, 3, 5]
    caches = m.new_caches(1, 128)
    assert [type(c) for c in caches] == [KVCache, StreamingKVCache] * 3
    # The converted model is the model its new pattern builds: same weights, same logits.
    twin = CatModel(m.cfg)
    set_use_kernels(twin, False)
    twin.load_state_dict(m.state_dict())
    assert_close(m(x).logits, twin.eval()(x).logits, 1e-6, "converted vs rebuilt")
    assert convert(m, layers=[0]) == [0] and m.cfg.pattern == "SAAAAA"
    assert convert(m, 1.0, alphas=[0.0] * 6) == list(range(6)) and m.cfg.pattern == "S" * 6
    assert convert(m, 0.0, alphas=[0.0] * 6) == [] and m.cfg.pattern == "A" * 6


def test_convert_uses_calibrated_alphas_and_recovers_by_training(seed):
    m = tiny()
    alphas = calibrate(m, random_data(96), steps=2, lr=0.5, progress=False)
    chosen = convert(m, 0.5)
    assert chosen == sorted(sorted(range(4), key=lambda i: (alphas[i], i))[:2])
    # Ordinary training afterwards: every parameter (streaming layers included) gets a gradient.
    x, y = random_data(96)(0)
    torch.nn.functional.cross_entropy(m(x).logits.flatten(0, 1), y.flatten()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


def test_kv_memory_halves(seed):
    m = tiny("AAAA")
    dense = kv_cache_bytes(m, 2, 4096)
    convert(m, layers=[0, 2])
    half = kv_cache_bytes(m, 2, 4096)
    window = (SPEC["sink_blocks"] + SPEC["recent_blocks"]) * SPEC["block_size"]
    assert dense == 4 * 2 * 2 * 4096 * 2 * 16 * 2  # layers * K,V * batch * tokens * kv heads * dim * bf16
    assert half == dense // 2 + 2 * (dense // 4 * window // 4096)  # two layers keep only sink + window


def test_bad_input():
    m = tiny("AA")
    with pytest.raises(ValueError, match="alphas"):
        convert(m, 0.5)
    with pytest.raises(ValueError, match="alphas"):
        convert(m, 0.5, alphas=[0.1])
    with pytest.raises(ValueError, match="fraction"):
        convert(m, 1.5, alphas=[0.1, 0.2])
    with pytest.raises(ValueError, match="layers"):
        convert(m, layers=[2])
    with pytest.raises(ValueError, match="layers"):
        convert(m, layers=[0, 0])
    with pytest.raises(ValueError, match="steps"):
        calibrate(m, random_data(8), steps=0)
    with pytest.raises(ValueError, match="data"):
        calibrate(m, 5, steps=1, progress=False)


# ------------------------------------------------------------------------------ Hugging Face
def hf_models():
    try:
        import transformers
        from transformers import AttentionInterface  # noqa: F401  (catkit.models.hf needs >= 4.48)
    except ImportError:
        pytest.skip("transformers >= 4.48 not installed (optional extra 'hf')")
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
    out = []
    for name in ("Llama", "Qwen3"):
        cfg = getattr(transformers, f"{name}Config")(**common)
        cfg._attn_implementation = "sdpa"
        out.append(getattr(transformers, f"{name}ForCausalLM")(cfg).eval())
    return out


def streaming_4d_mask(b, t):
    nb = -(-t // SPEC["block_size"])
    pos = torch.arange(t)
    bm = streaming_block_mask(nb, nb, SPEC["sink_blocks"], SPEC["recent_blocks"])
    allowed = bm[pos[:, None] // 16, pos[None, :] // 16] & (pos[None, :] <= pos[:, None])
    return allowed[None, None].expand(b, 1, t, t)


def test_hf_patch_dense_unchanged_streaming_matches_mask(seed):
    from catkit.models import hf

    for m in hf_models():
        x = torch.randint(0, 128, (2, 90))
        with torch.no_grad():
            ref = m(x).logits
            mods = hf.patch(m, **SPEC)
            assert len(mods) == 4 and loza_layers(m) == mods
            assert torch.equal(m(x).logits, ref)  # dense mode is transformers' SDPA path
            set_use_kernels(m, False)
            convert(m, 1.0, alphas=[0.0] * 4)
            streaming = m(x).logits
            # Reference: the dense SDPA model fed the streaming pattern as a custom 4D mask.
            convert(m, 0.0, alphas=[0.0] * 4)
            masked = m(x, attention_mask=streaming_4d_mask(2, 90)).logits
        assert_close(streaming, masked, 1e-5, f"{type(m).__name__} streaming")
        assert (streaming - ref).abs().max() > 1e-3


def test_hf_streaming_decode_and_padding(seed):
    from catkit.models import hf

    for m in hf_models():
        hf.patch(m, **SPEC)
        set_use_kernels(m, False)
        convert(m, layers=[1, 2])
        x = torch.randint(1, 128, (2, 40))
        kw = dict(max_new_tokens=12, do_sample=False, output_scores=True, return_dict_in_generate=True,
                  pad_token_id=0, attention_mask=torch.ones_like(x))
        cached = m.generate(x, use_cache=True, **kw)
        fresh = m.generate(x, use_cache=False, **kw)
        assert torch.equal(cached.sequences, fresh.sequences)
        assert_close(torch.stack(cached.scores), torch.stack(fresh.scores), 1e-5, "decode scores")
        # Right padding (explicit 2D mask -> masked path): valid positions match the unpadded row.
        with torch.no_grad():
            mask = torch.ones(2, 70, dtype=torch.long)
            mask[1, 50:] = 0
            y = torch.randint(1, 128, (2, 70))
            padded = m(y, attention_mask=mask).logits
            alone = m(y[1:, :50]).logits
        assert_close(padded[1:, :50], alone, 1e-5, "padded row")


def test_hf_calibrate_convert(seed):
    for m in hf_models():
        m.train()
        layers = loza_layers(m)  # patches on first use (LoZA defaults), then use the tiny pattern
        for mod in layers:
            mod.streaming = type(mod.streaming)(**SPEC)
        set_use_kernels(m, False)
        before = {k: v.clone() for k, v in m.state_dict().items()}
        alphas = calibrate(m, random_data(96, vocab=128), steps=2, lr=0.5, progress=False)
        assert len(alphas) == 4 and any(abs(a - 0.5) > 1e-3 for a in alphas)
        assert all(torch.equal(before[k], v) for k, v in m.state_dict().items()) and m.training
        chosen = convert(m, 0.5)
        assert [mod.mode for mod in layers] == ["streaming" if i in chosen else "dense" for i in range(4)]
        x, y = random_data(96, vocab=128)(1)
        torch.nn.functional.cross_entropy(m(x).logits.flatten(0, 1), y.flatten()).backward()
        assert all(p.grad is not None for p in m.parameters() if p.requires_grad)
