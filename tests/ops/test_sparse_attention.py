"""Block-sparse attention kernels (prefill forward/backward, paged decode) against naive.py."""

import math

import pytest
import torch

from catkit.ops.sparse_attention import naive
from catkit.ops.sparse_attention.prefill import block_sparse_attention, streaming_attention
from catkit.utils.testing import assert_close, rel_rms

# Small tiles keep the interpreter fast; block sizes below 64 are reachable only through the
# private flag, so the public 64/128 semantics get their own tests.
TINY = dict(fwd=(16, 16, 4, 1), dq=(16, 16, 4, 1), dkdv=(16, 16, 4, 1))
PACKED = dict(fwd=(16, 16, 4, 1, 2), dq=(16, 16, 4, 1, 2), dkdv=(16, 16, 4, 1))  # 2 heads of a group per program
TOL = 1e-5


def _inputs(B, T, H, Hkv, D, dtype=torch.float32, device="cpu"):
    mk = lambda h: torch.randn(B, T, h, D, dtype=dtype, device=device).requires_grad_()  # noqa: E731
    return mk(H), mk(Hkv), mk(Hkv)


def _grads(fn, q, k, v, do):
    for x in (q, k, v):
        x.grad = None
    o, lse = fn(q, k, v)
    o.backward(do)
    out = (o.detach(), lse.detach(), q.grad.clone(), k.grad.clone(), v.grad.clone())
    for x in (q, k, v):
        x.grad = None
    return out


def _compare(got, ref, tol=TOL):
    for name, a, b in zip(("o", "lse", "dq", "dk", "dv"), got, ref):
        if name == "lse":  # -inf rows must match exactly, the rest closely
            fin = torch.isfinite(b)
            assert torch.equal(fin, torch.isfinite(a)), "lse: -inf pattern differs"
            if fin.any():
                assert_close(a[fin], b[fin], tol, name)
        else:
            assert_close(a, b, tol, name)


def _random_indices(n_seq, hkv, nq, lens, bs, k_max, p=0.5):
    """Sorted lists of random key blocks (some above the diagonal, some empty), padded with -1."""
    idx = torch.full((n_seq, hkv, nq, k_max), -1, dtype=torch.int32)
    for n in range(n_seq):
        nk = (lens[n] + bs - 1) // bs
        for h in range(hkv):
            for i in range(nq):
                cand = [j for j in range(min(nk, i + 2)) if torch.rand(()) < p][:k_max]
                idx[n, h, i, :len(cand)] = torch.tensor(cand, dtype=torch.int32)
    return idx


@pytest.mark.parametrize("T,sink,recent,bs", [(63, 1, 2, 16), (100, 2, 1, 16), (128, 0, 3, 32), (100, 1, 0, 16)])
@pytest.mark.parametrize("H,Hkv", [(4, 2), (2, 2)])
def test_streaming_vs_naive(seed, T, sink, recent, bs, H, Hkv):
    q, k, v = _inputs(2, T, H, Hkv, 16)
    do = torch.randn_like(q)
    kw = dict(sink_blocks=sink, recent_blocks=recent, block_size=bs, return_lse=True)
    tiles = PACKED if H == 2 * Hkv else TINY
    got = _grads(lambda q, k, v: streaming_attention(q, k, v, **kw, _tiles=tiles, _any_block_size=True), q, k, v, do)
    ref = _grads(lambda q, k, v: naive.naive_streaming_attention(q, k, v, **kw), q, k, v, do)
    _compare(got, ref)


def test_streaming_public_block_size_64(seed):
    """Public block_size=64 with T=100: the second block is partial and reads the sink block."""
    q, k, v = _inputs(1, 100, 4, 1, 32)
    do = torch.randn_like(q)
    kw = dict(sink_blocks=1, recent_blocks=1, block_size=64, return_lse=True)
    tiles = dict(fwd=(32, 16, 4, 1), dq=(32, 16, 4, 1), dkdv=(16, 32, 4, 1))
    got = _grads(lambda q, k, v: streaming_attention(q, k, v, **kw, _tiles=tiles), q, k, v, do)
    ref = _grads(lambda q, k, v: naive.naive_streaming_attention(q, k, v, **kw), q, k, v, do)
    _compare(got, ref)
    # block_size is in tokens: with 64-token blocks and recent=1, token 70 must not see token 5..63
    # except through the sink, and token 63 sees all of block 0: compare with block_size=32 which differs.
    o32 = naive.naive_streaming_attention(q, k, v, sink_blocks=1, recent_blocks=1, block_size=32)
    assert rel_rms(got[0], o32) > 1e-3


def test_streaming_varlen(seed):
    lens = [37, 0, 64, 20]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    q, k, v = _inputs(1, sum(lens), 4, 2, 16)
    do = torch.randn_like(q)
    kw = dict(sink_blocks=1, recent_blocks=1, block_size=16, cu_seqlens=cu, return_lse=True)
    got = _grads(lambda q, k, v: streaming_attention(q, k, v, **kw, _tiles=PACKED, _any_block_size=True), q, k, v, do)
    ref = _grads(lambda q, k, v: naive.naive_streaming_attention(q, k, v, **kw), q, k, v, do)
    _compare(got, ref)
    # Blocks count from each sequence's start: the packed result equals running each sequence alone.
    s, e = 37, 37 + 64
    alone = naive.naive_streaming_attention(q[:, s:e], k[:, s:e], v[:, s:e], sink_blocks=1, recent_blocks=1,
                                            block_size=16)
    assert_close(got[0][:, s:e], alone, TOL, "o (sequence alone)")


@pytest.mark.parametrize("T,H,Hkv,bs", [(100, 4, 2, 16), (63, 2, 1, 16), (128, 2, 2, 32)])
def test_block_indices_vs_naive(seed, T, H, Hkv, bs):
    B = 2
    nq = (T + bs - 1) // bs
    idx = _random_indices(B, Hkv, nq, [T] * B, bs, k_max=4)
    q, k, v = _inputs(B, T, H, Hkv, 16)
    do = torch.randn_like(q)
    kw = dict(block_size=bs, return_lse=True)
    tiles = PACKED if H == 2 * Hkv else TINY
    got = _grads(lambda q, k, v: block_sparse_attention(q, k, v, idx, **kw, _tiles=tiles, _any_block_size=True),
                 q, k, v, do)
    ref = _grads(lambda q, k, v: naive.naive_block_sparse_attention(q, k, v, idx, **kw), q, k, v, do)
    _compare(got, ref)


def test_block_indices_varlen_int64(seed):
    lens = [50, 16, 33]
    cu = torch.tensor([0, 50, 66, 99], dtype=torch.int64)
    bs = 16
    idx = _random_indices(3, 2, 4, lens, bs, k_max=3, p=0.7).long()
    q, k, v = _inputs(1, 99, 4, 2, 32)
    do = torch.randn_like(q)
    kw = dict(block_size=bs, cu_seqlens=cu, return_lse=True)
    got = _grads(lambda q, k, v: block_sparse_attention(q, k, v, idx, **kw, _tiles=TINY, _any_block_size=True),
                 q, k, v, do)
    ref = _grads(lambda q, k, v: naive.naive_block_sparse_attention(q, k, v, idx, **kw), q, k, v, do)
    _compare(got, ref)


def test_forward_tma_tiles_vs_naive(seed):
    """The forward's tensor-descriptor path (TMA on Hopper) on varlen streaming and index lists.

    Descriptors are per sequence ([len, D]); lens 37 and 20 end mid-tile, so the diagonal tile reads
    past the end (zeros from the copy engine, masked by the causal rule).
    """
    lens = [37, 0, 64, 20]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    q, k, v = _inputs(1, sum(lens), 4, 2, 16)
    tiles = dict(fwd=(16, 16, 4, 1, 2, 1))
    kw = dict(sink_blocks=1, recent_blocks=2, block_size=16, cu_seqlens=cu, return_lse=True)
    o, lse = streaming_attention(q, k, v, **kw, _tiles=tiles, _any_block_size=True)
    ro, rlse = naive.naive_streaming_attention(q, k, v, **kw)
    assert_close(o, ro, TOL, "o (streaming, tma)")
    assert_close(lse, rlse, TOL, "lse (streaming, tma)")
    idx = _random_indices(4, 2, 4, lens, 16, k_max=3, p=0.7)
    kw = dict(block_size=16, cu_seqlens=cu)
    o = block_sparse_attention(q, k, v, idx, **kw, _tiles=dict(fwd=(16, 16, 4, 1, 1, 1)), _any_block_size=True)
    assert_close(o, naive.naive_block_sparse_attention(q, k, v, idx, **kw), TOL, "o (indices, tma)")


def test_streaming_equals_index_lists(seed):
    """The two ways of naming blocks agree when the lists spell out the streaming pattern."""
    T, bs, S, R = 100, 16, 1, 2
    nq = (T + bs - 1) // bs
    mask = naive.streaming_block_mask(nq, nq, S, R)
    idx = torch.full((1, 1, nq, nq), -1, dtype=torch.int32)
    for i in range(nq):
        js = mask[i].nonzero().flatten()
        idx[0, 0, i, :len(js)] = js.int()
    q, k, v = _inputs(1, T, 2, 1, 16)
    a = streaming_attention(q, k, v, sink_blocks=S, recent_blocks=R, block_size=bs, _tiles=TINY,
                            _any_block_size=True)
    b = block_sparse_attention(q, k, v, idx, block_size=bs, _tiles=TINY, _any_block_size=True)
    assert_close(a, b, TOL, "streaming vs index lists")


def test_empty_rows_zero_not_nan(seed):
    """sink = recent = 0 (and empty lists) leave rows without keys: o = 0, lse = -inf, grads 0."""
    q, k, v = _inputs(1, 40, 2, 1, 16)
    o, lse = streaming_attention(q, k, v, sink_blocks=0, recent_blocks=0, block_size=16, return_lse=True,
                                 _tiles=TINY, _any_block_size=True)
    assert torch.equal(o, torch.zeros_like(o)) and bool(torch.isneginf(lse).all())
    o.sum().backward()
    for x in (q, k, v):
        assert torch.equal(x.grad, torch.zeros_like(x.grad))
    idx = torch.tensor([[[[-1, -1], [0, 1], [-1, -1]]]], dtype=torch.int32)  # block 0 and 2: empty
    for x in (q, k, v):
        x.grad = None
    o, lse = block_sparse_attention(q, k, v, idx, block_size=16, return_lse=True, _tiles=TINY,
                                    _any_block_size=True)
    assert torch.isfinite(o).all()
    assert bool(torch.isneginf(lse[:, :16]).all()) and bool(torch.isfinite(lse[:, 16:32]).all())
    assert bool(torch.isneginf(lse[:, 32:]).all())
    o.square().sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))
    assert torch.equal(q.grad[:, :16], torch.zeros_like(q.grad[:, :16]))


@pytest.mark.parametrize("case", [
    "block_size", "sink", "recent", "head_dim", "gqa", "idx_range", "idx_unsorted", "idx_shape", "cu_seqlens",
    "cu_batch", "dtype"])
def test_bad_inputs(case):
    q, k, v = _inputs(1, 64, 4, 2, 16)
    idx = torch.tensor([[[[0]]] * 2], dtype=torch.int32)  # [1, 2, 1, 1]
    kw = dict(sink_blocks=1, recent_blocks=1, block_size=64)
    expect = {"block_size": "block_size", "sink": "sink_blocks", "recent": "recent_blocks", "head_dim": "k",
              "gqa": "k", "idx_range": "block_indices", "idx_unsorted": "block_indices",
              "idx_shape": "block_indices", "cu_seqlens": "cu_seqlens", "cu_batch": "cu_seqlens", "dtype": "k"}[case]
    with pytest.raises(ValueError, match=expect):
        if case == "block_size":
            streaming_attention(q, k, v, sink_blocks=1, recent_blocks=1, block_size=48)
        elif case == "sink":
            streaming_attention(q, k, v, sink_blocks=-1, recent_blocks=1, block_size=64)
        elif case == "recent":
            streaming_attention(q, k, v, sink_blocks=1, recent_blocks=-2, block_size=64)
        elif case == "head_dim":
            streaming_attention(q, k[..., :8], v[..., :8], **kw)
        elif case == "gqa":
            streaming_attention(q, k[:, :, :1].expand(1, 64, 3, 16), v[:, :, :1].expand(1, 64, 3, 16), **kw)
        elif case == "idx_range":
            block_sparse_attention(q, k, v, idx + 1, block_size=64)
        elif case == "idx_unsorted":
            bad = torch.tensor([[[[1, 0], [0, 1]]] * 2], dtype=torch.int32)
            block_sparse_attention(torch.randn(1, 128, 4, 16), torch.randn(1, 128, 2, 16),
                                   torch.randn(1, 128, 2, 16), bad, block_size=64)
        elif case == "idx_shape":
            block_sparse_attention(q, k, v, idx[:, :1], block_size=64)
        elif case == "cu_seqlens":
            streaming_attention(q, k, v, cu_seqlens=torch.tensor([0, 40, 30, 64]), **kw)
        elif case == "cu_batch":
            q2, k2, v2 = _inputs(2, 64, 4, 2, 16)
            streaming_attention(q2, k2, v2, cu_seqlens=torch.tensor([0, 64]), **kw)
        elif case == "dtype":
            streaming_attention(q, k.double(), v.double(), **kw)


# --------------------------------------------------------------------------------------------
# GPU: realistic sizes, bf16, against an fp32 reference on the same device
# --------------------------------------------------------------------------------------------
def _sdpa_reference(q, k, v, allowed, scale):
    """fp32 SDPA with a dense boolean mask [T, T] (or [H_kv, T, T]); GQA by repeating KV heads."""
    G = q.shape[2] // k.shape[2]
    qt, kt, vt = (x.float().transpose(1, 2) for x in (q, k, v))
    kt, vt = kt.repeat_interleave(G, 1), vt.repeat_interleave(G, 1)
    return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, attn_mask=allowed, scale=scale).transpose(1, 2)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["streaming", "indices"])
def test_gpu_prefill_bf16(seed, mode):
    dev = "cuda"
    T, H, Hkv, D, bs = 8192, 32, 8, 128, 128
    q, k, v = (torch.randn(1, T, h, D, device=dev, dtype=torch.bfloat16).requires_grad_() for h in (H, Hkv, Hkv))
    do = torch.randn_like(q)
    nb = T // bs
    if mode == "streaming":
        fn = lambda q, k, v: streaming_attention(q, k, v, sink_blocks=1, recent_blocks=8, block_size=bs)  # noqa
        bmask = naive.streaming_block_mask(nb, nb, 1, 8, device=dev)
    else:
        idx = _random_indices(1, Hkv, nb, [T], bs, k_max=12, p=0.15)
        ar = torch.arange(nb, dtype=torch.int32)
        idx = torch.where(idx >= ar[:, None], -1, idx)  # keep only blocks below the diagonal ...
        idx = torch.cat([idx, torch.full_like(idx[..., :1], -1)], -1)
        cnt = (idx >= 0).sum(-1, keepdim=True)
        idx.scatter_(-1, cnt.long(), ar[None, None, :, None].expand_as(cnt).int())  # ... then the diagonal
        idx = idx.to(dev)
        fn = lambda q, k, v: block_sparse_attention(q, k, v, idx, block_size=bs)  # noqa
        bmask = naive.indices_block_mask(idx, nb)[0]  # [H_kv, NQ, NK]
    pos = torch.arange(T, device=dev)
    allowed = bmask[..., pos[:, None] // bs, pos[None, :] // bs] & (pos[None, :] <= pos[:, None])
    if allowed.ndim == 3:
        allowed = allowed.repeat_interleave(H // Hkv, 0)
    # Rows without any key: SDPA returns NaN there; our convention is 0, so compare elsewhere.
    has_key = allowed.any(-1)  # [(H,) T]
    o = fn(q, k, v)
    o.backward(do)
    got = [o.detach()] + [x.grad.clone() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None
    qf, kf, vf = (x.detach().float().requires_grad_() for x in (q, k, v))
    ref = _sdpa_reference(qf, kf, vf, allowed, 1 / math.sqrt(D))
    ref = torch.nan_to_num(ref)
    ref.backward(do.float())
    refs = [ref.detach(), qf.grad, kf.grad, vf.grad]
    for name, a, b in zip(("o", "dq", "dk", "dv"), got, refs):
        err = rel_rms(a, b)
        print(f"[gpu {mode}] {name}: rel RMS {err:.2e}")
        assert err < 2e-2, name
    assert has_key.all()


# --------------------------------------------------------------------------------------------
# Paged decode
# --------------------------------------------------------------------------------------------
from catkit.ops.sparse_attention.decode import paged_decode_attention  # noqa: E402


def _paged(k, v, lens, page, extra_pages=3):
    """Scatter contiguous k/v [B, T, H_kv, D] into a shuffled page pool; return caches and table."""
    B, T, Hkv, D = k.shape
    max_pages = (T + page - 1) // page
    n_pages = B * max_pages + extra_pages
    perm = torch.randperm(n_pages)[: B * max_pages].view(B, max_pages)
    kc = torch.randn(n_pages, page, Hkv, D, dtype=k.dtype)  # garbage in unused slots must not leak in
    vc = torch.randn(n_pages, page, Hkv, D, dtype=k.dtype)
    for b in range(B):
        for t in range(lens[b]):
            kc[perm[b, t // page], t % page] = k[b, t]
            vc[perm[b, t // page], t % page] = v[b, t]
    return kc, vc, perm.int()


@pytest.mark.parametrize("pattern", ["dense", "streaming", "indices"])
@pytest.mark.parametrize("page", [16, 24])
def test_decode_vs_naive(seed, pattern, page):
    B, T, H, Hkv, D, bs = 4, 300, 8, 2, 32, 64
    lens = [300, 129, 1, 0]  # an empty sequence gets o = 0, lse = -inf
    q = torch.randn(B, H, D)
    k, v = torch.randn(B, T, Hkv, D), torch.randn(B, T, Hkv, D)
    kc, vc, bt = _paged(k, v, lens, page)
    sl = torch.tensor(lens, dtype=torch.int32)
    kw = dict(block_size=bs)
    if pattern == "streaming":
        kw.update(sink_blocks=1, recent_blocks=2)
    elif pattern == "indices":
        idx = torch.full((B, Hkv, 3), -1, dtype=torch.int32)  # batch 3 (empty sequence) keeps empty lists
        idx[0, 0, :3] = torch.tensor([0, 2, 4])
        idx[0, 1, :1] = 3
        idx[1, 0, :2] = torch.tensor([1, 2])  # the last list of batch 1 / head 1 stays empty
        idx[2, :, 0] = 0
        kw.update(block_indices=idx)
    # validate=False takes the hot path (cheap screen only); the result must not change.
    o, lse = paged_decode_attention(q, kc, vc, bt, sl, return_lse=True, num_splits=2, validate=(page == 16), **kw)
    ro, rl = naive.naive_paged_decode_attention(q, kc, vc, bt, sl, return_lse=True, **kw)
    assert_close(o, ro, TOL, "o")
    fin = torch.isfinite(rl)
    assert torch.equal(fin, torch.isfinite(lse))
    assert_close(lse[fin], rl[fin], TOL, "lse")
    if pattern == "indices":
        assert torch.equal(o[1, 4:], torch.zeros_like(o[1, 4:])) and bool(torch.isneginf(lse[1, 4:]).all())
    assert torch.equal(o[3], torch.zeros_like(o[3])) and bool(torch.isneginf(lse[3]).all())


def test_streaming_decode_equals_prefill_last_row(seed):
    """Decode of the token at position L-1 == last row of streaming prefill over the same L tokens."""
    T, H, Hkv, D, bs = 100, 4, 2, 16, 16
    q, k, v = (x.detach() for x in _inputs(1, T, H, Hkv, D))
    pre = streaming_attention(q, k, v, sink_blocks=1, recent_blocks=2, block_size=bs, _tiles=TINY,
                              _any_block_size=True)
    for L in (T, 47):  # position 46 is mid-block, so the window there is partial
        kc, vc, bt = _paged(k[:, :L], v[:, :L], [L], page=8)
        sl = torch.tensor([L], dtype=torch.int32)
        for splits in (1, 3):
            dec = paged_decode_attention(q[:, L - 1], kc, vc, bt, sl, sink_blocks=1, recent_blocks=2, block_size=bs,
                                         num_splits=splits, _any_block_size=True)
            ref = pre[:, L - 1] if L == T else streaming_attention(
                q[:, :L], k[:, :L], v[:, :L], sink_blocks=1, recent_blocks=2, block_size=bs, _tiles=TINY,
                _any_block_size=True)[:, L - 1]
            assert_close(dec, ref, TOL, f"decode vs prefill (L={L}, splits={splits})")


@pytest.mark.parametrize("case", ["pattern_half", "both", "seq_lens", "table", "idx_sorted", "block_size", "gqa"])
def test_decode_bad_inputs(case):
    B, H, Hkv, D, page = 2, 4, 2, 16, 16
    q = torch.randn(B, H, D)
    kc, vc = torch.randn(8, page, Hkv, D), torch.randn(8, page, Hkv, D)
    bt = torch.arange(8, dtype=torch.int32).view(2, 4)
    sl = torch.tensor([64, 30], dtype=torch.int32)
    idx = torch.tensor([[[0, 1]] * 2, [[1, 0]] * 2], dtype=torch.int32)
    kw = dict(block_size=64)
    expect = {"pattern_half": "sink_blocks", "both": "block_indices", "seq_lens": "seq_lens", "table": "block_table",
              "idx_sorted": "block_indices", "block_size": "block_size", "gqa": "k_cache"}[case]
    with pytest.raises(ValueError, match=expect):
        if case == "pattern_half":
            paged_decode_attention(q, kc, vc, bt, sl, sink_blocks=1, **kw)
        elif case == "both":
            paged_decode_attention(q, kc, vc, bt, sl, sink_blocks=1, recent_blocks=1, block_indices=idx, **kw)
        elif case == "seq_lens":
            paged_decode_attention(q, kc, vc, bt, torch.tensor([65, 300], dtype=torch.int32), **kw)
        elif case == "table":
            paged_decode_attention(q, kc, vc, bt + 5, sl, **kw)
        elif case == "idx_sorted":
            paged_decode_attention(q, kc, vc, bt, torch.tensor([64, 64], dtype=torch.int32), block_indices=idx,
                                   block_size=16, _any_block_size=True)
        elif case == "block_size":
            paged_decode_attention(q, kc, vc, bt, sl, block_size=100)
        elif case == "gqa":
            paged_decode_attention(q[:, :3], kc, vc, bt, sl, **kw)


@pytest.mark.gpu
def test_gpu_decode_bf16(seed):
    """Dense paged decode vs SDPA, streaming / index decode vs an fp32 gather reference (GPU, bf16)."""
    dev = "cuda"
    B, H, Hkv, D, page, bs = 4, 32, 8, 128, 16, 128
    lens = [8192, 5000, 129, 3333]
    T = max(lens)
    k, v = (torch.randn(B, T, Hkv, D, device=dev, dtype=torch.bfloat16) for _ in range(2))
    q = torch.randn(B, H, D, device=dev, dtype=torch.bfloat16)
    max_pages = T // page
    perm = torch.randperm(B * max_pages, device=dev)
    kc = torch.empty(B * max_pages, page, Hkv, D, device=dev, dtype=torch.bfloat16)
    vc = torch.empty_like(kc)
    kc[perm] = k.reshape(B * max_pages, page, Hkv, D)
    vc[perm] = v.reshape(B * max_pages, page, Hkv, D)
    bt, sl = perm.view(B, max_pages).int(), torch.tensor(lens, device=dev, dtype=torch.int32)
    idx = torch.full((B, Hkv, 6), -1, dtype=torch.int32, device=dev)
    for b, L in enumerate(lens):
        nb = (L + bs - 1) // bs
        for h in range(Hkv):
            sel = torch.randperm(nb)[:6].sort().values
            idx[b, h, :len(sel)] = sel.int().to(dev)
    pos = torch.arange(T, device=dev)
    cases = (("dense", {}), ("streaming", dict(sink_blocks=1, recent_blocks=8)), ("indices", dict(block_indices=idx)))
    for name, kw in cases:
        o = paged_decode_attention(q, kc, vc, bt, sl, block_size=bs, **kw)
        ref = torch.empty_like(o, dtype=torch.float32)
        for b, L in enumerate(lens):
            nb, qb = (L + bs - 1) // bs, (L - 1) // bs
            kb = pos[:L] // bs
            if name == "dense":
                keep = torch.ones(Hkv, L, dtype=torch.bool, device=dev)
            elif name == "streaming":
                keep = ((kb < 1) | (kb >= qb - 7))[None].expand(Hkv, L)
            else:
                keep = naive.indices_block_mask(idx[b][:, None, :], nb)[:, 0][:, kb]  # [H_kv, L]
            s = torch.einsum("hgd,htd->hgt", q[b].float().view(Hkv, H // Hkv, D), k[b, :L].float().transpose(0, 1))
            s = s / math.sqrt(D) + torch.where(keep, 0.0, float("-inf"))[:, None, :]
            ref[b] = torch.einsum("hgt,htd->hgd", s.softmax(-1), v[b, :L].float().transpose(0, 1)).reshape(H, D)
        err = rel_rms(o, ref)
        print(f"[gpu decode {name}] rel RMS {err:.2e}")
        assert err < 2e-2, name


def test_autotuners_are_kept_per_length_bucket(monkeypatch):
    import catkit.ops.sparse_attention.prefill_fwd as pf

    assert [pf.length_bucket(t) for t in (1, 4096, 8191, 16384, 32768, 65536, 131072, 1 << 20)] == [0, 0, 0, 1, 2, 3, 4, 4]
    made = []
    monkeypatch.setattr(pf, "tuned", lambda kernel, fwd=False: made.append(kernel) or object())
    tuner = pf.TunedByLength("kernel")
    a, b, c = tuner.for_tokens(4096), tuner.for_tokens(8000), tuner.for_tokens(131072)
    assert a is b and a is not c and made == ["kernel", "kernel"]
