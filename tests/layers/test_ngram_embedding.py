"""NgramEmbedding: the spec's formula, kernel == plain PyTorch, decode state, model integration."""

import math

import pytest
import torch

from catkit.layers.ngram_embedding import NgramEmbedding, ngram_options
from catkit.models import CatModel, ModelConfig
from catkit.ops.ngram import naive
from catkit.utils.testing import assert_close

V = 259


def _layer(**kw):
    base = dict(max_n=3, n_splits=2, table_base=2 * V, table_dim=12, eos_id=257)
    base.update(kw)
    return NgramEmbedding(V, 32, **base)


def test_output_is_the_spec_formula_and_kernel_matches_plain(seed):
    emb = _layer(amplify=2.5)
    x = torch.randint(0, V, (2, 63))
    x[0, 20] = 257
    out = emb(x)
    # spec: (E_0[x] + sum_t P_t E_t[h_t]) / (1 + K (N - 1)), here times the amplification
    ids = naive.ngram_hash_ids_bigint(x, eos_id=257, **emb.spec.kwargs())
    ref = emb.weight[x].clone()
    for t in range(emb.n_tables):
        ref = ref + emb.tables[emb.spec.offsets[t] + ids[..., t]] @ emb.proj[t]
    ref = 2.5 * ref / (1 + emb.n_tables)
    assert_close(out, ref, 1e-6, "embedding")
    # fused kernel path == plain PyTorch path, outputs and every gradient
    plain = _layer(amplify=2.5, use_kernel=False)
    plain.load_state_dict(emb.state_dict())
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, list(emb.parameters()), g)
    grads_ref = torch.autograd.grad(plain(x), list(plain.parameters()), g)
    for (name, _), a, b in zip(emb.named_parameters(), grads, grads_ref):
        assert_close(a, b, 1e-5, name)
    assert grads[1].abs().sum() > 0


def test_decode_state_step_by_step_equals_full(seed):
    emb = _layer(norm=True)
    x = torch.randint(250, V, (3, 21))  # narrow range so EOS (257) shows up often
    full = emb(x)
    state = emb.new_cache(3)
    parts = [emb(x[:, :4], cache=state), emb(x[:, 4:5], cache=state), emb(x[:, 5:13], cache=state)]
    parts += [emb(x[:, t:t + 1], cache=state) for t in range(13, 21)]
    assert state.length == 21 and state.context.device == x.device
    assert_close(torch.cat(parts, 1), full, 1e-6, "decoded embeddings")
    assert torch.equal(state.context, naive.next_context(x, None, max_n=3, eos_id=257))


def test_packed_sequences_equal_separate(seed):
    emb = _layer()
    lens = [5, 1, 17, 9]
    seqs = [torch.randint(0, V, (1, n)) for n in lens]
    cu = torch.tensor([0, 5, 6, 23, 32], dtype=torch.int32)
    packed = emb(torch.cat(seqs, 1), cu_seqlens=cu)
    assert_close(packed, torch.cat([emb(s) for s in seqs], 1), 1e-6, "varlen")
    with pytest.raises(ValueError, match="cu_seqlens"):
        emb(torch.cat(seqs, 1), cu_seqlens=cu, cache=emb.new_cache(1))


def _tiny_model(**ngram):
    opts = dict(max_n=3, n_splits=2, table_ratio=3, eos_id=7, use_kernel=False)
    opts.update(ngram)
    cfg = ModelConfig(d_model=32, n_heads=2, pattern="AA", max_seq_len=64, ngram=opts)
    return CatModel(cfg).eval()


@pytest.mark.parametrize("use_kernel", [False, None])
def test_model_generate_with_cache_equals_without(seed, use_kernel):
    m = _tiny_model(use_kernel=use_kernel)
    steps = 8 if use_kernel is False else 3  # the interpreted kernel is slow per launch
    x = torch.randint(0, V, (2, 9))
    x[0, 4] = 7
    a = m.generate(x, steps, temperature=1.0, generator=torch.Generator().manual_seed(3))
    b = m.generate(x, steps, temperature=1.0, generator=torch.Generator().manual_seed(3), use_cache=False)
    assert torch.equal(a, b)
    caches = m.new_caches(2, 32)
    assert len(caches) == 3 and caches[-1].context.shape == (2, 2)
    full = m(a).logits
    parts = [m(a[:, :9], caches=caches).logits] + [m(a[:, t:t + 1], caches=caches).logits for t in range(9, a.shape[1])]
    assert_close(torch.cat(parts, 1), full, 1e-5, "cached logits")


def test_model_trains_table_parameters(seed):
    m = _tiny_model(use_kernel=None).train()
    x = torch.randint(0, V, (2, 24))
    loss, _ = m.loss(x, x.roll(-1, 1))
    loss.backward()
    assert m.embed.tables.grad is not None and m.embed.tables.grad.abs().sum() > 0
    assert m.embed.proj.grad.abs().sum() > 0
    n_tables = 4
    assert m.embed.tables.shape == (sum(778 + 2 * t + 1 for t in range(n_tables)), 32 // n_tables)
    cfg = ModelConfig.from_dict(m.cfg.to_dict())
    assert cfg.ngram == m.cfg.ngram


def test_options_and_bad_config():
    o = ngram_options({"table_ratio": 78}, V, 128)
    assert o["table_base"] == 20202 and o["table_base"] % 2 == 0 and o["table_dim"] == 128 // 12
    assert ngram_options({"table_ratio": 2.5}, V, 64)["table_base"] == 648  # ceil(647.5) rounded up to even
    bad = [({"max_n": 1}, "ngram.max_n"), ({"n_splits": 0}, "ngram.n_splits"), ({"table_base": 519}, "ngram.table_base"),
           ({"table_base": 100}, "ngram.table_base"), ({"table_ratio": 0.5}, "ngram.table_ratio"),
           ({"amplify": 0}, "ngram.amplify"), ({"eos_id": 300}, "ngram.eos_id"), ({"bogus": 1}, "ngram"),
           ({"table_base": 600, "table_ratio": 3}, "ngram.table_base"), ({"norm": 1}, "ngram.norm")]
    for opts, name in bad:
        with pytest.raises(ValueError, match=name.replace(".", r"\.")):
            ModelConfig(d_model=64, n_heads=4, pattern="A", ngram=opts)
    with pytest.raises(ValueError, match="ngram"):
        ModelConfig(ngram=[3])
    emb = _layer()
    with pytest.raises(ValueError, match="input_ids"):
        emb(torch.zeros(4, dtype=torch.long))
    assert math.isclose(emb.proj.std().item(), 1 / math.sqrt(12), rel_tol=0.2)
