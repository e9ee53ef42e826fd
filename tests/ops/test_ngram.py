"""Hashed N-gram ids and the fused gather against the big-integer reference and naive.py."""

import pytest
import torch

from catkit.ops.ngram import NgramSpec, naive, next_context, ngram_embedding, ngram_hash_ids
from catkit.utils.testing import assert_close

KW = dict(vocab_size=50, max_n=4, n_splits=3, table_base=1000)


def _packed(T, V, eos, n_seq):
    tok = torch.randint(0, V, (T,))
    if eos is not None:
        tok[torch.randint(0, T, (T // 6,))] = eos  # some EOS, some back to back
    cut = torch.randint(1, T, (n_seq - 1,)).sort().values
    cu = torch.cat([torch.tensor([0]), cut, torch.tensor([T])]).to(torch.int32)
    return tok, cu


@pytest.mark.parametrize("eos", [None, 3])
@pytest.mark.parametrize("T", [63, 100])
def test_ids_equal_bigint_random(seed, T, eos):
    tok, cu = _packed(T, KW["vocab_size"], eos, 4)
    ctx = torch.randint(0, KW["vocab_size"], (4, KW["max_n"] - 1))
    for kw in (dict(cu_seqlens=cu), dict(cu_seqlens=cu, context=ctx), dict()):
        got = ngram_hash_ids(tok, eos_id=eos, **KW, **kw)
        assert got.dtype == torch.int64 and got.shape == (T, 9)
        assert torch.equal(got, naive.ngram_hash_ids_bigint(tok, eos_id=eos, **KW, **kw)), kw
    two_d = tok[:60].reshape(3, 20)
    assert torch.equal(ngram_hash_ids(two_d, eos_id=eos, **KW), naive.ngram_hash_ids_bigint(two_d, eos_id=eos, **KW))


def test_ids_boundaries_and_large_moduli(seed):
    # documented example, checked by hand: ids[1, 0] = (7 + 5 * 10) mod 41
    ids = ngram_hash_ids(torch.tensor([5, 7, 1, 9]), vocab_size=10, max_n=3, n_splits=2, table_base=40)
    assert ids.shape == (4, 4) and int(ids[1, 0]) == 57 % 41 and int(ids[0, 0]) == 5
    assert int(ids[3, 2]) == (9 + 1 * 10 + 7 * 100) % 45  # trigram, first split of order 3
    # sequence starts, empty and length-1 sequences, EOS first / last / back to back, ids 0 and V-1
    V = 100_003  # large vocabulary and moduli near 2^40: no int64 overflow, no float rounding
    kw = dict(vocab_size=V, max_n=4, n_splits=2, table_base=2**40)
    tok = torch.tensor([7, V - 1, V - 1, 0, 7, 7, 5, V - 1, 7, 1, 2, 3, 4, 7, V - 2, 0, 0, V - 1])
    cu = torch.tensor([0, 0, 1, 1, 5, 12, 18])
    for ctx in (None, torch.tensor([[V - 1, 7, 2]] * 6)):
        got = ngram_hash_ids(tok, cu_seqlens=cu, eos_id=7, context=ctx, **kw)
        assert torch.equal(got, naive.ngram_hash_ids_bigint(tok, cu_seqlens=cu, eos_id=7, context=ctx, **kw))
    # the rule itself: after an EOS only the EOS is context; an EOS still reads what it ends
    w = naive.context_windows(torch.tensor([4, 5, 7, 6, 8, 9]), max_n=4, eos_id=7)
    assert w[3].tolist() == [6, 7, 0, 0] and w[4].tolist() == [8, 6, 7, 0] and w[2].tolist() == [7, 5, 4, 0]


@pytest.mark.parametrize("d_e,T", [(20, 63), (32, 100)])
def test_fused_gather_forward_backward_duplicates(seed, d_e, T):
    spec = NgramSpec(**KW)
    tok, cu = _packed(T, 6, None, 3)  # six distinct ids: most n-grams repeat, so rows get many updates
    w = torch.randn(spec.num_rows, d_e, requires_grad=True)
    w_ref = w.detach().clone().requires_grad_()
    out = ngram_embedding(tok, w, cu_seqlens=cu, eos_id=2, **KW)
    ref = naive.ngram_embedding(tok, w_ref, cu_seqlens=cu, eos_id=2, **KW)
    assert out.shape == (T, spec.n_tables, d_e)
    assert_close(out, ref, 1e-7, "rows")
    g = torch.randn_like(out)
    (gw,) = torch.autograd.grad(out, w, g)
    (gw_ref,) = torch.autograd.grad(ref, w_ref, g)
    ids = naive.ngram_hash_ids(tok, cu_seqlens=cu, eos_id=2, **KW)
    assert ids.unique().numel() < ids.numel() // 2  # duplicates really happen
    assert_close(gw, gw_ref, 1e-6, "grad tables")
    # 2-D input with a decode context goes through the same kernel
    x = torch.randint(0, 6, (2, 17))
    ctx = torch.randint(0, 6, (2, KW["max_n"] - 1))
    assert_close(ngram_embedding(x, w, context=ctx, **KW), naive.ngram_embedding(x, w_ref, context=ctx, **KW), 1e-7, "2d")


@pytest.mark.parametrize("eos", [None, 4])
def test_decode_state_step_by_step_equals_full(seed, eos):
    V, N = KW["vocab_size"], KW["max_n"]
    x = torch.randint(0, 8, (3, 40))
    x[0, 5], x[1, 6:8], x[2, 38] = 4, 4, 4
    full = naive.ngram_hash_ids_bigint(x, eos_id=eos, **KW)
    ctx, pieces = None, []
    for a, b in [(0, 1), (1, 2), (2, 9), (9, 10), (10, 25)] + [(t, t + 1) for t in range(25, 40)]:
        pieces.append(ngram_hash_ids(x[:, a:b], eos_id=eos, context=ctx, **KW))
        ctx = next_context(x[:, a:b], ctx, max_n=N, eos_id=eos)
        assert ctx.shape == (3, N - 1) and int(ctx.max()) < V
    assert torch.equal(torch.cat(pieces, 1), full)


def _collision_rate(win, ids, n):
    """1 - distinct ids / distinct n-grams, and the rate a uniform random hash would give."""
    keys = torch.unique(win[:, :n], dim=0)
    s = keys.shape[0]
    return 1 - torch.unique(ids).numel() / s, s


def test_collision_rate_close_to_uniform_hash(seed):
    V, N, K, m = 5003, 4, 2, 8000  # n-gram space (25M+) far larger than a table: hash looks random
    tok = torch.randint(0, V, (12000,))
    ids = naive.ngram_hash_ids(tok, vocab_size=V, max_n=N, n_splits=K, table_base=m)
    assert torch.equal(ids[:500], ngram_hash_ids(tok[:500], vocab_size=V, max_n=N, n_splits=K, table_base=m))
    win = naive.context_windows(tok, max_n=N)
    for t, (M, n) in enumerate(zip(naive.table_sizes(V, N, K, m), naive.table_orders(N, K))):
        rate, s = _collision_rate(win[n - 1:], ids[n - 1:, t], n)
        expected = 1 - M * (1 - (1 - 1 / M) ** s) / s
        assert abs(rate - expected) < 0.015, (t, rate, expected)
    # splits of one order differ in modulus only: pairs colliding in one rarely collide in the other
    a, b = ids[1:, 0], ids[1:, 1]
    pair_a = (a[:, None] == a[None, :2000]).float().sum() - 2000
    both = ((a[:, None] == a[None, :2000]) & (b[:, None] == b[None, :2000])).float().sum() - 2000
    assert pair_a > 1000 and both <= 0.01 * pair_a


def test_table_sizes_near_vocab_multiples_collide_more(seed):
    """The spec's warning: sizes near k * V give collision peaks on structured (text-like) input."""
    V, lo, R = 1000, 100, 64  # tokens from a contiguous range, like letters of a byte vocabulary
    tok = torch.randint(lo, lo + R, (40000,))
    win = naive.context_windows(tok, max_n=2)[1:]
    s = (win[:, 0] + V * win[:, 1]).unique().numel()  # distinct bigrams

    def rate(table_base):
        ids = naive.ngram_hash_ids(tok, vocab_size=V, max_n=2, n_splits=1, table_base=table_base)[1:, 0]
        r = 1 - ids.unique().numel() / s
        M = table_base + 1
        return r, 1 - M * (1 - (1 - 1 / M) ** s) / s

    for near in (15998, 16000, 16002, 17000):  # M = k V + {-1, 1, 3}: structured collisions
        r, expected = rate(near)
        assert r > 4 * expected, (near, r, expected)
    for far in (16200, 16300, 16700):  # away from (half) multiples: at or below the uniform rate
        r, expected = rate(far)
        assert r <= expected, (far, r, expected)


def test_bad_input():
    tok = torch.randint(0, 50, (20,))
    with pytest.raises(ValueError, match="tokens"):
        ngram_hash_ids(torch.tensor([0, 50]), **KW)
    with pytest.raises(ValueError, match="tokens"):
        ngram_hash_ids(torch.tensor([-1, 3]), **KW)
    with pytest.raises(ValueError, match="tokens"):
        ngram_hash_ids(tok.float(), **KW)
    with pytest.raises(ValueError, match="max_n"):
        ngram_hash_ids(tok, **{**KW, "max_n": 1})
    with pytest.raises(ValueError, match="table_base"):
        ngram_hash_ids(tok, **{**KW, "table_base": 1001})  # odd base -> even table sizes
    with pytest.raises(ValueError, match="table_base"):
        ngram_hash_ids(tok, **{**KW, "table_base": 48})  # fewer rows than the vocabulary
    with pytest.raises(ValueError, match="table_base"):
        ngram_hash_ids(tok, **{**KW, "table_base": 2**62})  # int64 hashing would overflow
    for cu in ([0, 5, 19], [1, 5, 20], [0, 12, 5, 20]):
        with pytest.raises(ValueError, match="cu_seqlens"):
            ngram_hash_ids(tok, cu_seqlens=torch.tensor(cu), **KW)
    with pytest.raises(ValueError, match="cu_seqlens"):
        ngram_hash_ids(tok.reshape(4, 5), cu_seqlens=torch.tensor([0, 20]), **KW)
    with pytest.raises(ValueError, match="context"):
        ngram_hash_ids(tok, context=torch.zeros(1, 2, dtype=torch.long), **KW)
    with pytest.raises(ValueError, match="eos_id"):
        ngram_hash_ids(tok, eos_id=50, **KW)
    with pytest.raises(ValueError, match="weight"):
        ngram_embedding(tok, torch.zeros(10, 4), **KW)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_gather_gpu(seed, dtype):
    kw = dict(vocab_size=32000, max_n=4, n_splits=4, table_base=64000)
    spec = NgramSpec(**kw)
    tok = torch.randint(0, 200, (4096,), device="cuda")  # narrow range: many duplicate rows
    cu = torch.tensor([0, 1000, 1001, 3000, 4096], device="cuda", dtype=torch.int32)
    w = torch.randn(spec.num_rows, 96, device="cuda", dtype=dtype, requires_grad=True)
    w_ref = w.detach().float().clone().requires_grad_()
    ids = ngram_hash_ids(tok, cu_seqlens=cu, eos_id=3, **kw)
    assert torch.equal(ids.cpu(), naive.ngram_hash_ids_bigint(tok.cpu(), cu_seqlens=cu.cpu(), eos_id=3, **kw))
    out = ngram_embedding(tok, w, cu_seqlens=cu, eos_id=3, **kw)
    ref = naive.ngram_embedding(tok, w_ref, cu_seqlens=cu, eos_id=3, **kw)
    assert_close(out.float(), ref, 1e-7, "rows")
    g = torch.randn_like(out)
    (gw,) = torch.autograd.grad(out, w, g)
    (gw_ref,) = torch.autograd.grad(ref, w_ref, g.float())
    assert_close(gw.float(), gw_ref, 1e-6 if dtype == torch.float32 else 1e-2, "grad tables")


_COMPILE_SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.autotuner import Autotuner
import catkit.ops.ngram.fused as fz

PTR = {"tok_ptr": "*i64", "ctx_ptr": "*i64", "seq_ptr": "*i32", "cu_ptr": "*i64", "coef_ptr": "*i64",
       "mod_ptr": "*i64", "rowoff_ptr": "*i64", "w_ptr": "*bf16", "ids_ptr": "*i64", "out_ptr": "*bf16",
       "g_ptr": "*fp32", "gw_ptr": "*fp32"}

def build(kernel, constexprs, num_warps):
    fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
    sig = {n: ("constexpr" if n in constexprs else PTR.get(n, "i32")) for n in fn.arg_names}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n, v in sig.items() if v.startswith("*")}
    triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs),
                   target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})

build(fz._ids_kernel, {"MAX_N": 4, "HAS_CTX": True, "HAS_EOS": True, "BLOCK_T": 256}, 4)
build(fz._fwd_kernel, {"D": 256, "MAX_N": 4, "HAS_CTX": True, "HAS_EOS": True, "BLOCK_T": 64, "BLOCK_D": 128}, 8)
build(fz._bwd_kernel, {"D": 96, "BLOCK_T": 32, "BLOCK_D": 128}, 4)
print("compiled")
"""


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    """The kernels compile to sm_90 with this machine's Triton, no GPU needed (a separate process:
    under TRITON_INTERPRET=1 the kernels are interpreter objects)."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton.backends.compiler")
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    r = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "compiled" in r.stdout, r.stderr[-3000:]
