"""Paged KV cache: allocation, freeing, admission control, and attention equal to a contiguous cache."""

import pytest
import torch
import torch.nn.functional as F

from catkit.layers.kv_cache import KVCache
from catkit.models import CatModel, ModelConfig
from catkit.serve.paged_cache import OutOfBlocks, PagedKVCache, check_model_supported
from catkit.utils.testing import rel_rms


def test_alloc_free_and_out_of_blocks():
    c = PagedKVCache(1, num_blocks=4, block_size=4, n_kv_heads=1, head_dim=2)
    c.ensure(0, 5)  # 2 blocks
    assert len(c.tables[0]) == 2 and c.num_free == 2
    c.ensure(0, 8)  # still 2 blocks
    assert c.num_free == 2
    with pytest.raises(OutOfBlocks):
        c.ensure(1, 9)  # 3 blocks, only 2 free
    assert c.num_free == 2 and not c.tables.get(1)  # nothing taken by the failed call
    c.free(0)
    assert c.num_free == 4 and 0 not in c.tables
    c.free(123)  # unknown: no-op


def test_admission_promises_blocks():
    c = PagedKVCache(1, num_blocks=4, block_size=4, n_kv_heads=1, head_dim=2)
    assert c.admit(0, 12)  # promised 3 blocks, none allocated yet
    assert not c.can_admit(8) and not c.admit(1, 8)
    assert c.admit(1, 4)
    c.ensure(0, 12)
    with pytest.raises(OutOfBlocks):  # request 2 may not take the block promised to request 1
        c.ensure(2, 1)
    c.ensure(1, 4)
    assert c.num_free == 0
    c.free(0)
    assert c.num_free == 3 and c.admit(2, 12)


def test_paged_attention_matches_contiguous(seed):
    """Write ragged sequences token-chunk by chunk into scattered blocks; gather == contiguous KVCache."""
    h, d, bs = 2, 8, 4
    c = PagedKVCache(2, num_blocks=32, block_size=bs, n_kv_heads=h, head_dim=d)
    lens = [13, 5, 9]
    seqs = [(torch.randn(1, n, h, d), torch.randn(1, n, h, d)) for n in lens]
    # interleave growth so blocks of different requests alternate in the pool
    written = [0, 0, 0]
    while written != lens:
        for r, n in enumerate(lens):
            t = min(3, n - written[r])
            if t:
                c.ensure(r, written[r] + t)
                k, v = seqs[r]
                c.write(1, [r], [written[r]], k[:, written[r]:written[r] + t], v[:, written[r]:written[r] + t])
                written[r] += t
                c.set_length(r, written[r])
    assert len(set(sum(c.tables.values(), []))) == sum(len(t) for t in c.tables.values())  # no shared block
    index, valid = c.gather_index([0, 1, 2], lens)
    kk, vv = c.gather(1, index)
    q = torch.randn(3, 1, h, d)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2),
                                       attn_mask=valid[:, None, None, :]).transpose(1, 2)
    for r, n in enumerate(lens):
        ref = KVCache(1, 16, h, d, "cpu", torch.float32)
        kr, vr = ref.append(*seqs[r])
        assert torch.equal(kk[r, :n], kr[0]) and torch.equal(vv[r, :n], vr[0])
        o_ref = F.scaled_dot_product_attention(q[r:r + 1].transpose(1, 2), kr.transpose(1, 2), vr.transpose(1, 2))
        assert rel_rms(o[r:r + 1], o_ref.transpose(1, 2)) < 1e-6
    bt = c.block_table([0, 1])
    assert bt.dtype == torch.int32 and bt[0].tolist()[: len(c.tables[0])] == c.tables[0]


def test_refuses_other_layers():
    with pytest.raises(ValueError, match="dense attention"):
        check_model_supported(CatModel(ModelConfig(d_model=32, n_heads=2, pattern="AG")))
    with pytest.raises(ValueError, match="num_blocks"):
        PagedKVCache(1, num_blocks=0, block_size=4, n_kv_heads=1, head_dim=2)
