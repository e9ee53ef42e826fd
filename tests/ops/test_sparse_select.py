"""Two-level block/token selection (select.py): summaries, scores, top-k, and use by the decode kernel."""

import pytest
import torch

from catkit.ops.sparse_attention import naive
from catkit.ops.sparse_attention.decode import paged_decode_attention
from catkit.ops.sparse_attention.select import (block_scores, block_summaries, paged_block_summaries, select_blocks,
                                                select_tokens)
from catkit.utils.testing import assert_close


def _paged(k, page):
    B, T, Hkv, D = k.shape
    mp = T // page
    perm = torch.randperm(B * mp)
    kc = torch.empty(B * mp, page, Hkv, D)
    kc[perm] = k.reshape(B * mp, page, Hkv, D)
    return kc, perm.view(B, mp).int()


def test_summaries_and_scores(seed):
    B, T, H, Hkv, D, bs = 2, 100, 4, 2, 16, 16
    k = torch.randn(B, T, Hkv, D)
    lens = torch.tensor([100, 37])
    kmean, kmin, kmax = block_summaries(k, block_size=bs, seq_lens=lens)
    assert kmean.shape == (B, 7, Hkv, D)
    # Block 2 of sequence 1 holds tokens 32..36 only.
    assert_close(kmean[1, 2], k[1, 32:37].mean(0), 1e-6, "mean")
    assert torch.equal(kmin[1, 2], k[1, 32:37].amin(0)) and torch.equal(kmax[1, 2], k[1, 32:37].amax(0))
    assert torch.equal(kmean[1, 3], torch.zeros_like(kmean[1, 3]))  # empty block
    q = torch.randn(B, H, D)
    quest = block_scores(q, kmin=kmin, kmax=kmax, scorer="quest")
    mean = block_scores(q, kmean=kmean, scorer="mean", group_reduce="mean")
    exact = torch.einsum("bhgd,bthd->bhgt", q.view(B, Hkv, 2, D), k) / 4.0  # scale 1/sqrt(16)
    for b, L in enumerate(lens.tolist()):
        for j in range((L + bs - 1) // bs):
            e = exact[b, :, :, j * bs:min((j + 1) * bs, L)]
            # Quest is an upper bound of every exact logit of the block, for every head of the group.
            assert bool((quest[b, :, j] >= e.amax(-1).amax(-1) - 1e-5).all())
            assert_close(mean[b, :, j], e.mean(-1).mean(-1), 1e-5, "mean score")
    # The paged cache gives the same summaries.
    kc, bt = _paged(k, 20)
    pm = paged_block_summaries(kc, bt, lens.int(), block_size=bs)
    for a, b in zip(pm, (kmean, kmin, kmax)):
        assert torch.equal(a, b)


def test_select_blocks_forced_sorted_topk(seed):
    B, Hkv, NB, bs = 2, 3, 10, 16
    scores = torch.randn(B, Hkv, NB)
    lens = torch.tensor([160, 70])  # 10 and 5 blocks
    idx = select_blocks(scores, lens, block_size=bs, top_blocks=2, sink_blocks=1, recent_blocks=2)
    assert idx.shape == (B, Hkv, 5) and idx.dtype == torch.int32
    for b, nblk in enumerate((10, 5)):
        for h in range(Hkv):
            row = [j for j in idx[b, h].tolist() if j >= 0]
            assert row == sorted(set(row)) and all(j < nblk for j in row)
            forced = {0, nblk - 2, nblk - 1}
            assert forced <= set(row)
            rest = [j for j in range(nblk) if j not in forced]
            best = sorted(rest, key=lambda j: -float(scores[b, h, j]))[:2]
            assert set(best) <= set(row)
    assert (idx[1] >= 0).sum(-1).tolist() == [5, 5, 5]  # 5 blocks exist: all kept


def test_two_level_pipeline_feeds_decode(seed):
    """Selected blocks drive paged decode; selected tokens with a full budget equal the block set."""
    B, T, H, Hkv, D, bs, page = 2, 256, 4, 2, 32, 64, 32
    k, v = torch.randn(B, T, Hkv, D), torch.randn(B, T, Hkv, D)
    q = torch.randn(B, H, D)
    kc, bt = _paged(k, page)
    vc = torch.empty_like(kc)
    vc[bt.flatten().long()] = v.reshape(-1, page, Hkv, D)
    lens = torch.tensor([256, 150], dtype=torch.int32)
    _, kmin, kmax = paged_block_summaries(kc, bt, lens, block_size=bs)
    idx = select_blocks(block_scores(q, kmin=kmin, kmax=kmax), lens, block_size=bs, top_blocks=1)
    o = paged_decode_attention(q, kc, vc, bt, lens, block_indices=idx, block_size=bs)
    ref = naive.naive_paged_decode_attention(q, kc, vc, bt, lens, block_indices=idx, block_size=bs)
    assert_close(o, ref, 1e-5, "decode over selected blocks")
    tok = select_tokens(q, kc, bt, lens, idx, block_size=bs, token_budget=10_000, sink_tokens=4, local_tokens=8)
    for b in range(B):
        for h in range(Hkv):
            want = [p for j in idx[b, h].tolist() if j >= 0 for p in range(j * bs, min((j + 1) * bs, int(lens[b])))]
            assert [p for p in tok[b, h].tolist() if p >= 0] == want
    small = select_tokens(q, kc, bt, lens, idx, block_size=bs, token_budget=24, sink_tokens=4, local_tokens=8)
    L = int(lens[1])
    kept = set(small[1, 0].tolist()) - {-1}
    assert set(range(4)) | set(range(L - 8, L)) <= kept and len(kept) == 24


@pytest.mark.parametrize("case", ["scorer", "reduce", "missing", "top", "budget", "seq_lens"])
def test_select_bad_inputs(case):
    q = torch.randn(1, 4, 16)
    kmean, kmin, kmax = block_summaries(torch.randn(1, 64, 2, 16), block_size=16)
    names = {"scorer": "scorer", "reduce": "group_reduce", "missing": "kmin", "top": "top_blocks",
             "budget": "token_budget", "seq_lens": "seq_lens"}
    with pytest.raises(ValueError, match=names[case]):
        if case == "scorer":
            block_scores(q, kmean, kmin, kmax, scorer="dot")
        elif case == "reduce":
            block_scores(q, kmean, kmin, kmax, group_reduce="sum")
        elif case == "missing":
            block_scores(q, kmean=kmean, scorer="quest")
        elif case == "top":
            select_blocks(torch.randn(1, 2, 4), torch.tensor([64]), block_size=16, top_blocks=-1)
        elif case == "budget":
            select_tokens(q, torch.randn(4, 16, 2, 16), torch.zeros(1, 4, dtype=torch.int32), torch.tensor([64]),
                          torch.zeros(1, 2, 1, dtype=torch.int32), block_size=16, token_budget=0)
        elif case == "seq_lens":
            select_blocks(torch.randn(1, 2, 4), torch.tensor([64, 3]), block_size=16, top_blocks=1)
