import pytest
import torch

from catkit.models import CatModel, ModelConfig
from catkit.models.sampling import filter_logits
from catkit.utils.testing import assert_close


def tiny(**kw):
    base = dict(d_model=64, n_heads=4, n_kv_heads=2, pattern="AAA", max_seq_len=96)
    base.update(kw)
    return CatModel(ModelConfig(**base)).eval()


@pytest.mark.parametrize("moe", [False, True])
def test_cached_forward_matches_full(seed, moe):
    m = tiny(n_experts=4 if moe else 0, moe_shared_expert=moe)
    x = torch.randint(0, 259, (2, 37))
    full = m(x).logits
    caches = m.new_caches(2, 64)
    parts = [m(x[:, :20], caches=caches).logits, m(x[:, 20:33], caches=caches).logits]
    parts += [m(x[:, t : t + 1], caches=caches).logits for t in range(33, 37)]
    assert_close(torch.cat(parts, 1), full, 1e-5, "cached logits")


@pytest.mark.parametrize("sampling", [dict(), dict(temperature=0.9, top_k=20), dict(temperature=1.2, top_p=0.8)])
def test_generate_cache_equals_recompute(seed, sampling):
    m = tiny()
    x = torch.randint(0, 259, (3, 11))
    a = m.generate(x, 20, generator=torch.Generator().manual_seed(1), **sampling)
    b = m.generate(x, 20, generator=torch.Generator().manual_seed(1), use_cache=False, **sampling)
    assert a.shape == (3, 31)
    assert torch.equal(a, b)
    assert torch.equal(a[:, :11], x)


def test_generate_stops_at_eos():
    m = tiny()
    m.lm_head = None
    with torch.no_grad():
        m.embed.weight.zero_()
        m.embed.weight[:, 0] = 1.0  # every position predicts the token with the largest embedding[:, 0]
        m.embed.weight[7, 0] = 5.0
    out = m.generate(torch.tensor([[1, 2]]), 10, eos_id=7)
    assert out.shape[1] < 12 and out[0, -1] == 7


def test_varlen_matches_separate(seed):
    m = tiny()
    lens = [5, 17, 9]
    seqs = [torch.randint(0, 259, (1, n)) for n in lens]
    cu = torch.tensor([0, 5, 22, 31], dtype=torch.int32)
    packed = m(torch.cat(seqs, 1), cu_seqlens=cu).logits
    sep = torch.cat([m(s).logits for s in seqs], 1)
    assert_close(packed, sep, 1e-5, "varlen logits")


def test_generate_bad_args():
    m = tiny()
    x = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="temperature"):
        m.generate(x, 2, temperature=-1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        m.generate(x, 1000)
    with pytest.raises(ValueError, match="input_ids"):
        m(torch.full((1, 3), 300))


def test_filter_logits():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)[0, :2]).all()
    assert torch.isfinite(filter_logits(logits, top_k=2)[0, 2:]).all()
    p = logits.softmax(-1)[0]  # 0.032, 0.087, 0.237, 0.644
    kept = torch.isfinite(filter_logits(logits, top_p=0.7)[0])
    assert kept.tolist() == [False, False, True, True]
    assert torch.isfinite(filter_logits(logits, top_p=float(p[3]) - 1e-3)[0]).sum() == 1
