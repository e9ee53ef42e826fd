"""The static-shape (CUDA-graph-ready) decode path against the model's own forward, on CPU.

The prefix attention runs the paged decode Triton kernel under the interpreter here.
"""

import pytest
import torch

from catkit.models import CatModel, ModelConfig
from catkit.serve.fast_decode import (SparseSpec, StaticKV, StepGraph, check_fast_model, fast_forward,
                                      first_divergence, greedy_decode, greedy_speculative, prefill,
                                      teacher_forced_nll)
from catkit.serve.sparse_verify import SparseVerifyConfig, select_block_ids
from catkit.utils.testing import rel_rms


def _model(seed, d=64, layers=2, heads=4, kv=2, max_len=512):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=37, d_model=d, pattern="A" * layers, n_heads=heads, n_kv_heads=kv,
                      max_seq_len=max_len, init_std=0.2)
    return CatModel(cfg).eval()


@torch.no_grad()
def test_forward_matches_model(seed):
    m = _model(seed)
    ids = torch.randint(0, 37, (2, 100))
    ref = m(ids).logits
    kv = StaticKV(m, 2, 128, page=64)
    prefill(m, ids[:, :71], kv)  # caches 70 tokens
    assert kv.pos.tolist() == [70, 70]
    out = fast_forward(m, ids[:, 70:75], kv)  # a verify-shaped chunk: 5 queries over a cached prefix
    assert rel_rms(out, ref[:, 70:75]) < 1e-4
    one = fast_forward(m, ids[:, 75:76], kv)  # a decode step
    assert rel_rms(one, ref[:, 75:76]) < 1e-4
    assert kv.pos.tolist() == [76, 76]


@torch.no_grad()
def test_sparse_keep_all_equals_dense_and_selection_matches_reference(seed):
    m = _model(seed)
    ids = torch.randint(0, 37, (2, 300))
    spec = SparseSpec(block_size=64, dense_below=64, rho=0.0)
    kv = StaticKV(m, 2, 320, page=64)
    prefill(m, ids[:, :281], kv)
    kv.init_sums(spec, 2, 280)
    dense = fast_forward(m, ids[:, 280:285], kv)
    kv.set_length(280)
    every = fast_forward(m, ids[:, 280:285], kv, sparse=spec, keep=5)  # 5 blocks >= ceil(280/64): all kept
    assert rel_rms(every, dense) < 1e-5
    kv.set_length(280)
    sparse = fast_forward(m, ids[:, 280:285], kv, sparse=spec, keep=2)  # sink + last block only
    assert rel_rms(sparse, dense) > 1e-3  # a selection that drops blocks must change the result
    # the selection itself equals the eager sparse verifier's rule (mean key scored by q0)
    from catkit.layers.rope import apply_rope, rope_cos_sin
    from catkit.serve.fast_decode import _select

    q = torch.randn(2, 4, 16)
    kv.set_length(280)
    sel = _select(q, kv, 0, 3, 64)
    ref = select_block_ids(q, kv.k[0][:, :280], SparseVerifyConfig(block_size=64, dense_below=64,
                                                                   rho=(3 * 64 - 64) / (280 - 64) - 1e-6))
    assert torch.equal(sel.long(), ref)
    # rows of different lengths select on their own prefixes (sums of the changed blocks re-summed)
    kv.set_length(torch.tensor([280, 200]))
    sel = _select(q, kv, 0, 3, 64)
    for r, n in enumerate((280, 200)):
        rho = (3 * 64 - 64) / (n - 64) - 1e-6
        cfg = SparseVerifyConfig(block_size=64, dense_below=64, rho=rho)
        ref = select_block_ids(q[r : r + 1], kv.k[0][r : r + 1, :n], cfg)
        assert torch.equal(sel[r : r + 1].long(), ref), (r, sel[r], ref)


@torch.no_grad()
def test_speculative_equals_plain_greedy(seed):
    target, draft = _model(seed, layers=2), _model(seed + 1, d=32, layers=1, heads=2, kv=1)
    prompt = torch.randint(0, 37, (2, 40))
    n, gamma = 16, 3
    tkv = StaticKV(target, 2, 40 + n + gamma + 2, page=64)
    dkv = StaticKV(draft, 2, 40 + n + gamma + 2, page=64)
    prefill(target, prompt, tkv)
    gaps = torch.zeros(2, n)
    plain = greedy_decode(StepGraph(target, tkv, 1), prompt[:, -1:], n, gaps)
    ref = target.generate(prompt, n)[:, 40:]
    ok, info = first_divergence(ref, plain, gaps, 1e-3)
    assert ok, info
    prefill(target, prompt, tkv)
    prefill(draft, prompt, dkv)
    steps = {1: StepGraph(draft, dkv, 1), 2: StepGraph(draft, dkv, 2)}
    res = greedy_speculative(steps, StepGraph(target, tkv, gamma + 1), tkv, dkv, prompt[:, -1:], n, gamma)
    assert torch.equal(res.tokens, plain)
    assert res.rounds <= n and 1 <= res.mean_acceptance_length <= gamma + 1
    # rows accept independently: their cache lengths may differ now
    assert int(tkv.pos.max()) >= int(tkv.pos.min())
    # the draft equal to the target accepts everything
    prefill(target, prompt, tkv)
    kv2 = StaticKV(target, 2, 40 + n + gamma + 2, page=64)
    prefill(target, prompt, kv2)
    same = {1: StepGraph(target, kv2, 1), 2: StepGraph(target, kv2, 2)}
    res = greedy_speculative(same, StepGraph(target, tkv, gamma + 1), tkv, kv2, prompt[:, -1:], n, gamma)
    assert torch.equal(res.tokens, plain)
    assert res.mean_acceptance_length > gamma  # every round but maybe the last accepts all


@torch.no_grad()
def test_teacher_forced_nll_matches_full_forward(seed):
    m = _model(seed)
    ids = torch.randint(0, 37, (1, 120))
    kv = StaticKV(m, 1, 128, page=64)
    prefill(m, ids[:, :101], kv)
    nll = teacher_forced_nll(StepGraph(m, kv, 4), ids[:, 100:], 4)
    logits = m(ids).logits[:, 100:116].float()
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 101:117].flatten()).item()
    assert abs(nll - ref) < 1e-4


def test_check_fast_model_refuses_other_layers():
    cfg = ModelConfig(vocab_size=37, d_model=64, pattern="AG", n_heads=4)
    with pytest.raises(ValueError, match="dense attention"):
        check_fast_model(CatModel(cfg))
    with pytest.raises(ValueError, match="block_size"):
        SparseSpec(block_size=32)


def test_first_divergence_tolerates_only_near_ties():
    ref = torch.tensor([[1, 2, 3, 4]])
    out = torch.tensor([[1, 2, 5, 4]])
    gaps = torch.tensor([[1.0, 1.0, 0.01, 1.0]])
    assert first_divergence(ref, out, gaps, 0.05)[0]
    assert not first_divergence(ref, out, gaps * 100, 0.05)[0]
    ok, info = first_divergence(ref, ref, gaps, 0.05)
    assert ok and info["rows_equal"] == 1
