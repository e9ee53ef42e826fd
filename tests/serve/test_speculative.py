"""Speculative decoding (catkit.serve.speculative) and sparse verification (catkit.serve.sparse_verify).

Tiny random models on CPU. Random init with a large ``init_std`` and untied embeddings so greedy
outputs vary token to token; the draft is a noisy copy of the target so rounds accept some but not
all drafts (both the accept and the reject/rollback paths run).
"""

from __future__ import annotations

import copy

import pytest
import torch

from catkit.models.config import ModelConfig
from catkit.models.model import CatModel
from catkit.models.sampling import filter_logits
from catkit.serve.sparse_verify import (SparseVerifyConfig, calibrate_anchor_layers, calibrate_moe_thresholds, select_prefix_blocks,
                                        sparse_verify_forward)
from catkit.serve.speculative import (SpeculativeDecoder, greedy_accept, rejection_accept, rollback,
                                      speculative_generate)


def make_target(vocab=48, n_experts=0, top_k=2, max_len=256, pattern="AAA", n_kv_heads=2, **kw):
    cfg = ModelConfig(vocab_size=vocab, d_model=32, n_heads=4, n_kv_heads=n_kv_heads, pattern=pattern, max_seq_len=max_len,
                      init_std=0.15, tie_embeddings=False, n_experts=n_experts, moe_top_k=top_k, **kw)
    return CatModel(cfg).eval()


def noisy_copy(model, noise):
    draft = copy.deepcopy(model)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(noise * p.std() * torch.randn_like(p))
    return draft


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit; cells with expected count < 5 are pooled into one."""
    n = counts.sum()
    exp = probs.double() * n
    big = exp >= 5
    obs_c = torch.cat([counts.double()[big], counts.double()[~big].sum()[None]])
    exp_c = torch.cat([exp[big], exp[~big].sum()[None]])
    if exp_c[-1] < 5:  # pooled cell still small (or empty): merge it into the last big one
        if obs_c[-1] > 0 and exp_c[-1] == 0:
            return 0.0  # a token with probability 0 was emitted
        obs_c, exp_c = obs_c[:-1].clone(), exp_c[:-1].clone()
        obs_c[-1] += counts.double()[~big].sum()
        exp_c[-1] += exp[~big].sum()
    stat = ((obs_c - exp_c) ** 2 / exp_c).sum()
    dof = obs_c.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2))


# ---------------------------------------------------------------- greedy: exactly the target's output


@pytest.mark.parametrize("gamma", [1, 3, 5])
def test_greedy_equals_target_generate(seed, gamma):
    target = make_target()
    draft = noisy_copy(target, 0.1)
    accepted = drafted = 0
    for prompt_len, new in ((1, 20), (13, 37), (40, 9), (5, 30)):
        prompt = torch.randint(0, 48, (1, prompt_len))
        ref = target.generate(prompt, new)
        ids, stats = speculative_generate(target, draft, prompt, new, gamma=gamma)
        assert torch.equal(ids, ref), (gamma, prompt_len)
        assert stats["generated"] == new and stats["target_calls"] == stats["steps"] + (prompt_len > 1)
        assert 1 <= stats["mean_acceptance_length"] <= gamma + 1
        accepted, drafted = accepted + stats["accepted"], drafted + stats["drafted"]
    assert 0 < accepted < drafted  # both the accept and the reject + rollback paths ran


def test_greedy_independent_draft_and_perfect_draft(seed):
    target = make_target()
    other = CatModel(ModelConfig(vocab_size=48, d_model=16, n_heads=2, pattern="A", init_std=0.3,
                                 tie_embeddings=False, max_seq_len=256)).eval()
    prompt = torch.randint(0, 48, (1, 11))
    ref = target.generate(prompt, 30)
    ids, _ = speculative_generate(target, other, prompt, 30, gamma=4)
    assert torch.equal(ids, ref)
    # the target drafting for itself: every draft accepted, 5 tokens per round
    ids, stats = speculative_generate(target, target, prompt, 30, gamma=4)
    assert torch.equal(ids, ref)
    assert stats["accepted"] == stats["drafted"] and stats["steps"] == 6


def test_greedy_batched_equals_target_generate(seed):
    target = make_target()
    draft = noisy_copy(target, 0.1)
    prompt = torch.randint(0, 48, (5, 8))
    ref = target.generate(prompt, 30)
    ids, stats = speculative_generate(target, draft, prompt, 30, gamma=3)
    assert torch.equal(ids, ref)
    assert stats["row_accepted"] >= stats["accepted"] * 5


def test_greedy_accept_rule():
    tgt = torch.tensor([[1, 2, 3, 4], [1, 9, 3, 4], [7, 2, 3, 4]])
    drafts = torch.tensor([[1, 2, 3], [1, 2, 3], [1, 2, 3]])
    n, nxt = greedy_accept(tgt, drafts)
    assert n.tolist() == [3, 1, 0] and nxt.tolist() == [4, 9, 7]


# ---------------------------------------------------------------- sampling: lossless in distribution


def _dists(gen, rows, positions, vocab, temp, top_k):
    logits = torch.randn(positions, vocab, generator=gen) * 1.5
    probs = filter_logits(logits / temp, top_k, None).softmax(-1)
    return probs[None].expand(rows, positions, vocab).contiguous()


def _first_two_tokens(n, nxt, drafts):
    first = torch.where(n >= 1, drafts[:, 0], nxt)
    second = torch.where(n >= 2, drafts[:, 1], nxt)  # meaningful where n >= 1
    return first, second


@pytest.mark.parametrize("top_k", [None, 5])
def test_rejection_sampling_matches_target_distribution(top_k):
    # Fixed seeds: a statistical test with fresh seeds would fail at its significance level.
    gen = torch.Generator().manual_seed(1234 + (top_k or 0))
    rows, gamma, vocab = 20000, 3, 12
    p = _dists(gen, rows, gamma + 1, vocab, 1.0, top_k)
    q = _dists(gen, rows, gamma, vocab, 1.3, None)  # the draft: a different, flatter distribution
    drafts = torch.multinomial(q.flatten(0, 1), 1, generator=gen).view(rows, gamma)
    n, nxt = rejection_accept(p, q, drafts, gen)
    first, second = _first_two_tokens(n, nxt, drafts)
    assert chi2_pvalue(torch.bincount(first, minlength=vocab), p[0, 0]) > 1e-4
    keep = n >= 1  # given the first draft was accepted, the second token must follow p at position 1
    assert chi2_pvalue(torch.bincount(second[keep], minlength=vocab), p[0, 1]) > 1e-4
    assert 0 < (n == gamma).float().mean() < 1 and (n == 0).any()
    # all accepted: the bonus token comes from p at the last position
    assert chi2_pvalue(torch.bincount(nxt[n == gamma], minlength=vocab), p[0, gamma]) > 1e-4


def test_wrong_acceptance_rules_are_caught():
    gen = torch.Generator().manual_seed(99)
    rows, gamma, vocab = 20000, 2, 12
    p = _dists(gen, rows, gamma + 1, vocab, 1.0, None)
    q = _dists(gen, rows, gamma, vocab, 1.3, None)
    drafts = torch.multinomial(q.flatten(0, 1), 1, generator=gen).view(rows, gamma)
    # always accept: the first token follows q, not p
    assert chi2_pvalue(torch.bincount(drafts[:, 0], minlength=vocab), p[0, 0]) < 1e-6
    # correct accept test but resample from p (not the residual) after a rejection: biased toward q
    u = torch.rand(rows, generator=gen)
    acc = u * q[:, 0].gather(-1, drafts[:, :1]).squeeze(-1) < p[:, 0].gather(-1, drafts[:, :1]).squeeze(-1)
    resample = torch.multinomial(p[:, 0], 1, generator=gen).squeeze(-1)
    wrong = torch.where(acc, drafts[:, 0], resample)
    assert chi2_pvalue(torch.bincount(wrong, minlength=vocab), p[0, 0]) < 1e-6


@pytest.mark.parametrize("temp,top_k,top_p", [(0.9, None, None), (1.2, 6, None), (1.0, None, 0.8)])
def test_sampled_batched_generation_token_distribution(temp, top_k, top_p):
    """Batched end to end: rows advance by the shortest accept, and tokens still follow the target."""
    torch.manual_seed(8)  # fixed: a statistical test with fresh seeds fails at its significance level
    vocab = 8
    target = make_target(vocab=vocab)
    draft = noisy_copy(target, 1.0)
    prompt = torch.tensor([[2, 7, 1, 6]]).expand(3000, 4)
    gen = torch.Generator().manual_seed(6)
    ids, stats = speculative_generate(target, draft, prompt, 3, gamma=2, temperature=temp, top_k=top_k,
                                      top_p=top_p, generator=gen)

    def target_probs(ctx):
        return filter_logits(target(ctx).logits[:, -1].detach().float() / temp, top_k, top_p).softmax(-1)[0]

    assert chi2_pvalue(torch.bincount(ids[:, 4], minlength=vocab), target_probs(prompt[:1])) > 1e-4
    # the second token given the most frequent first token
    tok = int(torch.bincount(ids[:, 4]).argmax())
    rows = ids[:, 4] == tok
    p1 = target_probs(torch.cat([prompt[:1], torch.tensor([[tok]])], 1))
    assert chi2_pvalue(torch.bincount(ids[rows, 5], minlength=vocab), p1) > 1e-4
    assert 0 < stats["row_accepted"] and stats["accepted"] < stats["drafted"]


# ---------------------------------------------------------------- rollback


def _cache_equal(caches, fresh, length):
    for c, f in zip(caches, fresh):
        assert c.length == f.length == length
        torch.testing.assert_close(c.k[:, :length], f.k[:, :length], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(c.v[:, :length], f.v[:, :length], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_rollback_leaves_caches_like_fresh_prefill(seed, temperature):
    target = make_target()
    prompt = torch.randint(0, 48, (2, 9))  # two rows: rollback to the shorter accept
    for noise in (0.1, 0.05, 0.2, 0.3):  # a draft that gets some, not all, tokens accepted
        draft = noisy_copy(target, noise)
        dec = SpeculativeDecoder(target, draft, gamma=4, temperature=temperature,
                                 generator=torch.Generator().manual_seed(seed))
        ids = dec.generate(prompt, 40)
        if 0 < dec.stats.accepted < dec.stats.drafted:
            break
    assert 0 < dec.stats.accepted < dec.stats.drafted  # rejections happened, so rollbacks did
    n = ids.shape[1] - 1
    fresh = target.new_caches(2, 64)
    target(ids[:, :n], caches=fresh)
    _cache_equal(dec.target_caches, fresh, n)
    m = dec.draft_caches[0].length
    # everything but the last token; one less after a fully accepted round, two if a final no-draft round followed
    assert n - 2 <= m <= n
    fresh_d = draft.new_caches(2, 64)
    draft(ids[:, :m], caches=fresh_d)
    _cache_equal(dec.draft_caches, fresh_d, m)
    # stale entries past `length` are never read: poison them and continue decoding
    for c in dec.target_caches:
        c.k[:, n:] = float("nan")
        c.v[:, n:] = float("nan")
    cont = target(ids[:, n:], caches=dec.target_caches).logits[:, -1]
    torch.testing.assert_close(cont, target(ids).logits[:, -1], rtol=1e-4, atol=1e-4)


def test_rollback_function(seed):
    target = make_target()
    ids = torch.randint(0, 48, (1, 20))
    caches = target.new_caches(1, 32)
    target(ids[:, :12], caches=caches)
    target(torch.randint(0, 48, (1, 5)), caches=caches)  # a rejected chunk
    rollback(caches, 12)
    out = target(ids[:, 12:], caches=caches).logits
    torch.testing.assert_close(out, target(ids).logits[:, 12:], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="length"):
        rollback(caches, 25)


# ---------------------------------------------------------------- sparse verification


def _pair(n_experts=0, top_k=2):
    target = make_target(n_experts=n_experts, top_k=top_k)
    return target, noisy_copy(target, 0.3)


@pytest.mark.parametrize("n_experts", [0, 4])
def test_sparse_verify_keep_all_equals_dense(seed, n_experts):
    target, draft = _pair(n_experts, top_k=3 if n_experts else 2)
    keep_all = SparseVerifyConfig(block_size=16, dense_below=0, rho=1.0, ffn_threshold=0.0, moe_max_skip=0,
                                  anchor_layers=(0, 2))
    prompt = torch.randint(0, 48, (1, 70))
    dense, _ = speculative_generate(target, draft, prompt, 25, gamma=3)
    sparse, stats = speculative_generate(target, draft, prompt, 25, gamma=3, verify="sparse",
                                         sparse_config=keep_all)
    assert torch.equal(sparse, dense)
    assert stats["sparse"]["attn_kept_tokens"] == stats["sparse"]["attn_prefix_tokens"] > 0
    # and the logits of one verify pass match the model's forward
    c1, c2 = target.new_caches(1, 100), target.new_caches(1, 100)
    target(prompt[:, :60], caches=c1)
    target(prompt[:, :60], caches=c2)
    ref = target(prompt[:, 60:65], caches=c1).logits
    out = sparse_verify_forward(target, prompt[:, 60:65], c2, keep_all)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert c2[0].length == 65


def _reference_selection(q0, k, cfg):
    """Independent block selection: python loops over blocks, ties impossible with random data."""
    b, p, hk, d = k.shape
    g = q0.shape[1] // hk
    bs = cfg.block_size
    nb = -(-p // bs)
    budget = max(-(-int(cfg.dense_below + cfg.rho * (p - cfg.dense_below)) // bs), 2)
    keep = torch.zeros(b, hk, p, dtype=torch.bool)
    for h in range(hk):
        scores = []
        for j in range(nb):
            mk = k[0, j * bs : (j + 1) * bs, h].float().mean(0)
            scores.append(float((q0[0, h * g : (h + 1) * g].float() @ mk).mean()))
        order = sorted(range(1, nb - 1), key=lambda j: -scores[j])[: budget - 2]
        for j in [0, nb - 1] + order:
            keep[0, h, j * bs : (j + 1) * bs] = True
    return keep


def test_block_selection(seed):
    cfg = SparseVerifyConfig(block_size=8, dense_below=16, rho=0.25)
    q0 = torch.randn(1, 4, 16)
    k = torch.randn(1, 100, 2, 16)  # 13 blocks, the last one partial
    sel = select_prefix_blocks(q0, k, cfg)
    assert torch.equal(sel, _reference_selection(q0, k, cfg))
    assert sel[..., :8].all() and sel[..., 96:].all()  # sink and last blocks
    assert select_prefix_blocks(q0, k[:, :16], cfg) is None  # dense below L0
    assert select_prefix_blocks(q0, k, SparseVerifyConfig(block_size=8, attention=False)) is None


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
def test_gathered_attention_equals_masked(seed, n_kv_heads):
    target = make_target(n_kv_heads=n_kv_heads)
    ids = torch.randint(0, 48, (2, 101))  # 97 prefix tokens: a partial last block
    outs = []
    for gather in (True, False):
        cfg = SparseVerifyConfig(block_size=8, dense_below=8, rho=0.25, anchor_layers=(0, 2), gather=gather)
        stats = {}
        outs.append(sparse_verify_forward(target, ids[:, 97:], _prefilled(target, ids[:, :97], rows=2), cfg, stats))
        assert 0 < stats["attn_kept_tokens"] < stats["attn_prefix_tokens"]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_cached_block_summaries_equal_recomputed(seed):
    target, draft = _pair()
    prompt = torch.randint(0, 48, (2, 45))
    outs = []
    for cached in (True, False):
        cfg = SparseVerifyConfig(block_size=8, dense_below=8, rho=0.3, cache_summaries=cached)
        stats = {"selections": []}
        dec = SpeculativeDecoder(target, draft, gamma=3, verify="sparse", sparse_config=cfg)
        dec.sparse_stats = stats
        outs.append((dec.generate(prompt, 40), stats["selections"]))
    assert torch.equal(outs[0][0], outs[1][0])
    assert len(outs[0][1]) == len(outs[1][1]) > 0
    for a, b in zip(outs[0][1], outs[1][1]):
        assert torch.equal(a, b)


def test_sparse_attention_reads_only_selected_blocks(seed):
    """Changing keys/values in dropped blocks leaves the verify output unchanged; kept blocks matter."""
    target = make_target()
    cfg = SparseVerifyConfig(block_size=8, dense_below=8, rho=0.2, anchor_layers=(0,))  # one selection for all
    ids = torch.randint(0, 48, (1, 84))
    caches = target.new_caches(1, 100)
    target(ids[:, :80], caches=caches)
    snap = [(c.k.clone(), c.v.clone()) for c in caches]
    out = sparse_verify_forward(target, ids[:, 80:], caches, cfg)
    # recover layer 0's selection from the chunk's first query
    mix = target.blocks[0].mixer
    from catkit.layers.rope import apply_rope, rope_cos_sin
    x = target.blocks[0].mixer_norm(target.embed(ids[:, 80:81]))
    q = mix.qkv(x).view(1, 1, -1, mix.head_dim)[:, :, : mix.n_heads]
    q = apply_rope(q, *rope_cos_sin(torch.tensor([[80]]), mix.head_dim, target.cfg.rope_theta))
    sel = select_prefix_blocks(q[:, 0], snap[0][0][:, :80], cfg)
    assert sel is not None and not sel.all()
    dropped = ~sel[0].any(0)  # positions no kv head reads
    assert dropped.any()
    for c, (k, v) in zip(caches, snap):
        c.k.copy_(k)
        c.v.copy_(v)
        c.v[:, :80][:, dropped] += 5.0  # garbage values where every head dropped (keys drive selection)
        c.length = 80
    torch.testing.assert_close(sparse_verify_forward(target, ids[:, 80:], caches, cfg), out, rtol=1e-5, atol=1e-5)
    for c in caches:
        c.length = 80
    dense = target(ids[:, 80:], caches=caches).logits  # the dense pass does read them
    assert (dense - out).abs().max() > 1e-3


def test_calibrate_anchor_layers(seed):
    target = make_target(pattern="AAAAA")
    ids = torch.randint(0, 48, (2, 90))
    cfg = SparseVerifyConfig(block_size=8, dense_below=8, rho=0.2)
    assert calibrate_anchor_layers(target, ids, cfg, min_jaccard=0.0) == (0,)
    assert calibrate_anchor_layers(target, ids, cfg, min_jaccard=1.01) == (0, 1, 2, 3, 4)
    mid = calibrate_anchor_layers(target, ids, cfg, min_jaccard=0.5)
    assert mid[0] == 0 and list(mid) == sorted(set(mid)) and mid[-1] < 5
    stats = {"selections": []}
    sparse_verify_forward(target, ids[:, 85:], _prefilled(target, ids[:, :85], rows=2), cfg, stats=stats)
    assert len(stats["selections"]) == 5  # every layer is an anchor by default
    stats = {"selections": []}
    anchored = SparseVerifyConfig(block_size=8, dense_below=8, rho=0.2, anchor_layers=mid)
    sparse_verify_forward(target, ids[:, 85:], _prefilled(target, ids[:, :85], rows=2), anchored, stats=stats)
    assert len(stats["selections"]) == len(mid)
    assert calibrate_anchor_layers(target, ids[:, :12], SparseVerifyConfig(dense_below=64)) == (0,)  # dense prefix
    with pytest.raises(ValueError, match="n_verify"):
        calibrate_anchor_layers(target, ids, cfg, n_verify=0)


def test_sparse_ffn_skips_small_channels(seed):
    target = make_target()
    cfg = SparseVerifyConfig(attention=False, ffn_threshold=0.05)
    ids = torch.randint(0, 48, (1, 30))
    stats = {}
    out = sparse_verify_forward(target, ids[:, 26:], _prefilled(target, ids[:, :26]), cfg, stats=stats)
    assert 0 < stats["ffn_kept"] < stats["ffn_channels"]
    # reference: every SwiGLU with the union-masked channels zeroed (hooks on down-projection input)
    hooks = []
    for blk in target.blocks:
        def pre(mod, args):
            h = args[0]
            keep = (h.abs() >= 0.05).flatten(0, -2).any(0)
            return (h * keep,)
        hooks.append(blk.ffn.down.register_forward_pre_hook(pre))
    try:
        ref = target(ids[:, 26:], caches=_prefilled(target, ids[:, :26])).logits
    finally:
        for h in hooks:
            h.remove()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def _prefilled(model, ids, rows=1):
    caches = model.new_caches(rows, 128)
    model(ids, caches=caches)
    return caches


def test_sparse_moe_skip_to_top1_equals_top1_model(seed):
    target = make_target(n_experts=4, top_k=3)
    ids = torch.randint(0, 48, (1, 24))
    th = calibrate_moe_thresholds(target, ids)
    assert len(th) == 3 and all(len(t) == 2 and 0 < t[1] <= t[0] <= 1 for t in th)
    stats = {}
    all_skip = SparseVerifyConfig(attention=False, moe_max_skip=2, moe_ratio_thresholds=1.01)
    out = sparse_verify_forward(target, ids[:, 20:], _prefilled(target, ids[:, :20]), all_skip, stats=stats)
    assert stats["moe_skipped"] == 2 * 4 * 3  # ranks 1, 2 of 4 tokens in 3 layers
    top1 = copy.deepcopy(target)
    for blk in top1.blocks:
        blk.ffn.top_k = 1
    ref = top1(ids[:, 20:], caches=_prefilled(target, ids[:, :20])).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # with calibrated (median) thresholds and m = 1 roughly half of the rank-2 experts go
    stats = {}
    sparse_verify_forward(target, ids[:, 20:], _prefilled(target, ids[:, :20]),
                          SparseVerifyConfig(attention=False, moe_max_skip=1, moe_ratio_thresholds=th), stats=stats)
    assert 0 < stats["moe_skipped"] < 4 * 3
    # skipping nothing through the kept-assignment path (thresholds below every ratio) == dense
    none_skip = SparseVerifyConfig(attention=False, moe_max_skip=2, moe_ratio_thresholds=0.0)
    stats = {}
    out = sparse_verify_forward(target, ids[:, 20:], _prefilled(target, ids[:, :20]), none_skip, stats=stats)
    assert stats["moe_skipped"] == 0
    ref = target(ids[:, 20:], caches=_prefilled(target, ids[:, :20])).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_sparse_generation_runs_and_reports(seed):
    target, draft = _pair()
    cfg = SparseVerifyConfig(block_size=8, dense_below=16, rho=0.3, ffn_threshold=0.02, anchor_layers=(0, 2))
    prompt = torch.randint(0, 48, (1, 60))
    ids, stats = speculative_generate(target, draft, prompt, 20, gamma=3, verify="sparse", sparse_config=cfg)
    assert ids.shape == (1, 80) and torch.equal(ids[:, :60], prompt)
    s = stats["sparse"]
    assert 0 < s["attn_kept_tokens"] < s["attn_prefix_tokens"]


# ---------------------------------------------------------------- bad inputs


def test_bad_inputs():
    target = make_target()
    prompt = torch.randint(0, 48, (1, 5))
    for g in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="gamma"):
            speculative_generate(target, target, prompt, 4, gamma=g)
    small_vocab = make_target(vocab=40)
    with pytest.raises(ValueError, match="draft"):
        speculative_generate(target, small_vocab, prompt, 4)
    gdn = CatModel(ModelConfig(vocab_size=48, d_model=32, n_heads=2, pattern="AG"))
    with pytest.raises(ValueError, match="draft.*'A'"):
        speculative_generate(target, gdn, prompt, 4)
    with pytest.raises(ValueError, match="target"):
        speculative_generate(gdn, target, prompt, 4)
    with pytest.raises(ValueError, match="verify"):
        speculative_generate(target, target, prompt, 4, verify="fast")
    with pytest.raises(ValueError, match="sparse_config"):
        speculative_generate(target, target, prompt, 4, sparse_config=SparseVerifyConfig())
    with pytest.raises(ValueError, match="rho"):
        speculative_generate(target, target, prompt, 4, verify="sparse", sparse_config=SparseVerifyConfig(rho=2))
    with pytest.raises(ValueError, match="temperature"):
        speculative_generate(target, target, prompt, 4, temperature=-1)
    with pytest.raises(ValueError, match="prompt_ids"):
        speculative_generate(target, target, prompt[0], 4)
    with pytest.raises(ValueError, match="prompt_ids"):
        speculative_generate(target, target, prompt + 100, 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        speculative_generate(target, target, prompt, 1000)
    with pytest.raises(ValueError, match="max_new_tokens"):
        speculative_generate(target, target, prompt, -1)
    ids, stats = speculative_generate(target, target, prompt, 0)
    assert torch.equal(ids, prompt) and stats["target_calls"] == 0
