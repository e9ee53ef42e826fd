"""Checks run inside spawned gloo ranks (imported by the children, so not a test module).

Spawning costs seconds, so each world size runs ONE job (``job``) that performs every check and
reports ``{check name: ("ok" | failure text, info)}``; tests/dist/test_*.py read that report.
Every rank generates every rank's input from a shared seed, so each computes the exact fp64 sum
itself. Collectives come before asserts so a failing check cannot leave the ranks out of step.
"""

import pytest
import torch
import torch.distributed as dist

from torch import nn

from catkit.dist import ColumnParallelLinear, CommConfig, RowParallelLinear, flash_all_reduce
from catkit.ops.quant.layout import row_length

CONFIGS = {  # name: (bits, gather_bits, group_size, numel, dtype)
    "int8_g32_n1000": (8, None, 32, 1000, torch.float32),
    "int8_g128_n4099": (8, None, 128, 4099, torch.float32),
    "int4_g32_n777": (4, None, 32, 777, torch.float32),
    "int4_g128_n3000": (4, None, 128, 3000, torch.float32),
    "int6_g64_n2047": (4, 8, 64, 2047, torch.float32),
    "int8to4_g32_n500": (8, 4, 32, 500, torch.float32),
    "int8_g32_bf16": (8, None, 32, 1000, torch.bfloat16),
    "int6_g128_fp16": (4, 8, 128, 1500, torch.float16),
    "int8_g1024_n5000": (8, None, 1024, 5000, torch.float32),
    "int4_g32_n7_tiny": (4, None, 32, 7, torch.float32),
}
OUT_ULP = {torch.float32: 0.0, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def _inputs(seed, world, numel, dtype, scale_by_rank=True):
    g = torch.Generator().manual_seed(seed)
    xs = []
    for r in range(world):
        s = (1.0 + r) if scale_by_rank else 1.0
        xs.append((torch.randn(numel, generator=g) * s + 0.3 * r).to(dtype))
    return xs


def _group_ranges(flat, world, G):
    """Per group (chunk-aligned, as the all-reduce lays it out): max - min over present values."""
    n = flat.numel()
    c = row_length(n, world, G)
    pad = world * c - n
    v = torch.cat([flat.double(), flat.new_full((pad,), float("nan")).double()]).view(-1, G)
    present = ~v.isnan()
    mx = torch.where(present, v, -float("inf")).amax(1)
    mn = torch.where(present, v, float("inf")).amin(1)
    return torch.where(present.any(1), mx - mn, 0.0), pad


def _bound(xs, exact, world, bits, gather_bits, G, dtype):
    """Per element: sum_r s1/2 + s2/2 (see flash_all_reduce's docstring) + rounding slack."""
    q1, q2 = 2**bits - 1, 2**gather_bits - 1
    e1 = sum(_group_ranges(x.reshape(-1), world, G)[0] for x in xs) / q1 / 2
    r_sum, pad = _group_ranges(exact, world, G)
    s2 = (r_sum + 2 * e1) / q2
    per_group = e1 + s2 / 2
    b = per_group.repeat_interleave(G)[: exact.numel()]
    return b * (1 + 1e-4) + 1e-5 * exact.abs().max() + OUT_ULP[dtype] * exact.abs()


def _same_on_all_ranks(y):
    parts = [torch.empty_like(y) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, y.contiguous())
    return all(torch.equal(p.nan_to_num(12345.0), parts[0].nan_to_num(12345.0)) for p in parts)


def _check_bound(rank, world, seed, bits, gather_bits, G, numel, dtype):
    xs = _inputs(seed, world, numel, dtype)
    y = flash_all_reduce(xs[rank], bits=bits, gather_bits=gather_bits, group_size=G)
    same = _same_on_all_ranks(y.float())  # collectives first, so a failed assert cannot desync ranks
    assert y.shape == xs[rank].shape and y.dtype == dtype
    exact = sum(x.double() for x in xs)
    err = (y.double() - exact).abs()
    bound = _bound(xs, exact, world, bits, gather_bits or bits, G, dtype)
    assert torch.isfinite(y).all(), "non-finite output for finite input"
    assert (err <= bound).all(), f"error {float((err - bound).max()):.3e} over the bound at {int((err - bound).argmax())}"
    assert same, "ranks disagree"
    return float(err.norm() / exact.norm())


def _check_zero_range(rank, world, seed):
    # each group of 32 holds one constant per rank: every step has zero range -> exact sums
    G, groups = 32, 9
    consts = [torch.arange(groups, dtype=torch.float32) * (r + 1) - 3.5 * r for r in range(world)]
    xs = [c.repeat_interleave(G)[: groups * G - 5] for c in consts]
    exact = sum(xs)
    for bits, gb in ((8, None), (4, None), (4, 8)):
        for spike in (False, True):
            y = flash_all_reduce(xs[rank], bits=bits, gather_bits=gb, group_size=G, spike_reserve=spike)
            torch.testing.assert_close(y, exact, rtol=1e-6, atol=1e-6)


def _check_outliers(rank, world, seed):
    # outlier channels at the same positions on every rank (as in LLM activations)
    g = torch.Generator().manual_seed(seed + 1)
    xs = [torch.randn(4096, generator=g) for _ in range(world)]
    for x in xs:
        x[5::128] += 500.0
        x[77::128] -= 400.0
    exact = sum(x.double() for x in xs)
    errs = {}
    for spike in (False, True):
        y = flash_all_reduce(xs[rank], bits=4, gather_bits=8, group_size=128, spike_reserve=spike)
        errs[spike] = float((y.double() - exact).abs().max())
        assert _same_on_all_ranks(y)
        if not spike:
            assert (((y.double() - exact).abs()) <= _bound(xs, exact, world, 4, 8, 128, torch.float32)).all()
    assert errs[True] * 10 < errs[False], errs
    return errs


def _check_nan_inf(rank, world, seed):
    for bad, where_rank in ((float("nan"), world - 1), (float("inf"), 0), (-float("inf"), world // 2)):
        xs = _inputs(seed, world, 1000, torch.float32)
        xs[where_rank][333] = bad  # group 333 // 32 = 10 -> values [320, 352)
        for bits, gb, spike in ((8, None, False), (4, 8, True)):
            y = flash_all_reduce(xs[rank], bits=bits, gather_bits=gb, group_size=32, spike_reserve=spike)
            assert y[320:352].isnan().all(), f"{bad} on rank {where_rank} must poison its group on rank {rank}"
            rest = torch.cat([y[:320], y[352:]])
            assert torch.isfinite(rest).all(), "NaN leaked out of its group"
            clean = [x.nan_to_num(0.0, 0.0, 0.0) for x in xs]  # the other groups' bound is unchanged
            exact = sum(x.double() for x in clean)
            bound = _bound(clean, exact, world, bits, gb or bits, 32, torch.float32)
            keep = torch.ones(1000, dtype=torch.bool)
            keep[320:352] = False
            excess = float(((y.double() - exact).abs() - bound)[keep].max())
            assert excess <= 0, f"error over the bound by {excess:.3e} outside the poisoned group"


def _check_fallback_and_special(rank, world, seed):
    xs = _inputs(seed, world, 300, torch.float32)
    # below min_bytes: the exact all-reduce (fp32 sum in some order)
    y = flash_all_reduce(xs[rank], min_bytes=1 << 30)
    torch.testing.assert_close(y, sum(xs), rtol=1e-6, atol=1e-6)
    # non-contiguous input is made contiguous: same answer as the contiguous copy
    x2 = [x.view(20, 15) for x in xs]
    y_nc = flash_all_reduce(x2[rank].t())
    y_c = flash_all_reduce(x2[rank].t().contiguous())
    assert y_nc.shape == (15, 20) and torch.equal(y_nc, y_c)
    # empty: a copy, no communication
    e = torch.empty(0, 4)
    assert flash_all_reduce(e).shape == (0, 4)
    # the input is not modified
    before = xs[rank].clone()
    y4 = flash_all_reduce(xs[rank], bits=4)
    assert torch.equal(before, xs[rank])
    # inplace: same numbers, written into x, on both the compressed and the fallback path
    buf = xs[rank].clone()
    assert flash_all_reduce(buf, bits=4, inplace=True) is buf and torch.equal(buf, y4)
    buf = xs[rank].clone()
    flash_all_reduce(buf, min_bytes=1 << 30, inplace=True)
    torch.testing.assert_close(buf, sum(xs), rtol=1e-6, atol=1e-6)


def _check_pipelined(rank, world, seed):
    # slices are whole multiples of world * group_size values, so the groups (and so every code,
    # scale and fp32 sum) are those of the unsliced message: bit-identical results
    for numel, G, bits, gb, chunks in ((5000, 32, 8, None, 3), (4099, 64, 4, 8, 2), (300, 32, 4, None, 7)):
        xs = _inputs(seed, world, numel, torch.float32)
        y1 = flash_all_reduce(xs[rank], bits=bits, gather_bits=gb, group_size=G, chunks=1)
        yk = flash_all_reduce(xs[rank], bits=bits, gather_bits=gb, group_size=G, chunks=chunks)
        buf = xs[rank].clone()
        flash_all_reduce(buf, bits=bits, gather_bits=gb, group_size=G, chunks=chunks, inplace=True)
        assert torch.equal(y1, yk) and torch.equal(y1, buf), f"chunks={chunks} changed the result (n={numel})"


def _check_bad_input(rank, world, seed):
    x = torch.randn(100)
    cases = [
        (dict(bits=3), "bits"), (dict(bits=4, gather_bits=6), "gather_bits"),
        (dict(group_size=100), "group_size"), (dict(group_size=16), "group_size"),
        (dict(group_size=2048), "group_size"), (dict(min_bytes=-1), "min_bytes"), (dict(chunks=0), "chunks"),
        (dict(meta_dtype=torch.bfloat16), "meta_dtype"),
    ]
    for kw, name in cases:
        with pytest.raises(ValueError, match=name):
            flash_all_reduce(x, **kw)
    with pytest.raises(ValueError, match="contiguous"):
        flash_all_reduce(torch.randn(10, 10).t(), inplace=True)
    with pytest.raises(ValueError, match="grad"):
        flash_all_reduce(torch.randn(10, requires_grad=True), inplace=True)
    for bad_x in (torch.arange(10), torch.randn(4, dtype=torch.float64), [1.0, 2.0]):
        with pytest.raises(ValueError, match="x"):
            flash_all_reduce(bad_x)


def _check_single_rank_group(rank, world, seed):
    solo = dist.new_group([0])  # every rank must call new_group; only rank 0 is a member
    if rank == 0:
        x = torch.randn(50)
        y = flash_all_reduce(x, solo)
        assert torch.equal(y, x) and y.data_ptr() != x.data_ptr(), "world size 1 returns a copy"


def _mlp_pair(seed, din=32, dh=64, dout=24):
    torch.manual_seed(seed)
    return nn.Linear(din, dh), nn.Linear(dh, dout), torch.randn(5, 7, din)


def _check_tp_exact(rank, world, seed):
    l1, l2, x = _mlp_pair(seed)
    col = ColumnParallelLinear.from_linear(l1)
    row = RowParallelLinear.from_linear(l2, comm=CommConfig(mode="exact"))
    y = row(torch.nn.functional.gelu(col(x)))
    ref = l2(torch.nn.functional.gelu(l1(x)))
    y.square().sum().backward()
    ref.square().sum().backward()
    gathered = ColumnParallelLinear.from_linear(l1, gather_output=True)(x)
    row_full_in = RowParallelLinear.from_linear(l2, input_is_parallel=False)(torch.nn.functional.gelu(l1(x)))
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gathered, l1(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(row_full_in, ref, rtol=1e-5, atol=1e-5)
    # weight gradients of each shard = the matching slice of the unsharded layer's gradients
    h, k = l1.out_features // world, l2.in_features // world
    torch.testing.assert_close(col.weight.grad, l1.weight.grad[rank * h:(rank + 1) * h], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(col.bias.grad, l1.bias.grad[rank * h:(rank + 1) * h], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(row.weight.grad, l2.weight.grad[:, rank * k:(rank + 1) * k], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(row.bias.grad, l2.bias.grad, rtol=1e-4, atol=1e-5)


def _check_tp_flash(rank, world, seed):
    from catkit.utils.testing import rel_rms

    l1, l2, x = _mlp_pair(seed)
    ref = l2(torch.nn.functional.gelu(l1(x)))
    col = ColumnParallelLinear.from_linear(l1)
    errs = {}
    for name, comm in (("int8", CommConfig("flash", bits=8, group_size=32)),
                       ("int6", CommConfig("flash", bits=4, gather_bits=8, group_size=32)),
                       ("int4", CommConfig("flash", bits=4, group_size=32))):
        row = RowParallelLinear.from_linear(l2, comm=comm)
        with torch.no_grad():
            y = row(torch.nn.functional.gelu(col(x)))
        same = _same_on_all_ranks(y)
        errs[name] = rel_rms(y, ref)
        assert same, f"{name}: ranks disagree"
    # 4-bit partials dominate both int6 and int4 (about 0.08 relative for Gaussian groups of 32)
    assert errs["int8"] < 0.01 and errs["int6"] < 0.12 and errs["int4"] < 0.2, errs
    assert errs["int8"] < errs["int6"] < errs["int4"], errs
    return errs


def _check_tp_bad(rank, world, seed):
    with pytest.raises(ValueError, match="out_features"):
        ColumnParallelLinear.from_linear(nn.Linear(8, 4 * world + 1))
    with pytest.raises(ValueError, match="in_features"):
        RowParallelLinear.from_linear(nn.Linear(4 * world + 1, 8))
    row = RowParallelLinear.from_linear(nn.Linear(8 * world, 8))
    with pytest.raises(ValueError, match="x"):
        row(torch.randn(3, 8 * world))  # full input given to an input_is_parallel layer
    with pytest.raises(ValueError, match="mode"):
        CommConfig(mode="fast")


def _tp_model_pair(seed, n_kv_heads):
    from catkit.models.config import ModelConfig
    from catkit.models.model import CatModel

    torch.manual_seed(seed)
    cfg = ModelConfig(d_model=64, n_heads=8, n_kv_heads=n_kv_heads, pattern="AA", ffn_hidden=96, max_seq_len=128,
                      init_std=0.05)
    return CatModel(cfg), torch.randint(0, cfg.vocab_size, (2, 45))


def _check_tp_model(rank, world, seed):
    from catkit.dist import tensor_parallel_model
    from catkit.utils.testing import rel_rms

    full, ids = _tp_model_pair(seed, n_kv_heads=4)  # GQA: 2 query heads per KV head
    with torch.no_grad():
        ref = full(ids).logits
        exact = tensor_parallel_model(full, comm=CommConfig("exact"))(ids).logits
        errs = {}
        for name, comm in (("int8", CommConfig("flash", bits=8, group_size=32, min_bytes=0)),
                           ("int6", CommConfig("flash", bits=4, gather_bits=8, group_size=32, min_bytes=0))):
            y = tensor_parallel_model(full, comm=comm)(ids).logits
            errs[name] = (rel_rms(y, ref), _same_on_all_ranks(y))
    # decode through the shard's own KV caches gives the prefill's logits
    tp = tensor_parallel_model(full)
    caches = tp.new_caches(2, 64)
    with torch.no_grad():
        tp(ids[:, :30], caches=caches)
        step = tp(ids[:, 30:31], caches=caches).logits
    torch.testing.assert_close(exact, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(step[:, 0], ref[:, 30], rtol=1e-4, atol=1e-5)
    assert all(same for _, same in errs.values()), "ranks disagree"
    # a compressed reduction changes the logits, but within the quantization error
    assert 1e-6 < errs["int8"][0] < 0.03 and errs["int8"][0] < errs["int6"][0] < 0.3, errs
    # the full model is untouched and the shard holds 1/W of the attention / FFN weights
    assert tp.blocks[0].mixer.n_heads == 8 // world and tp.blocks[0].ffn.down.weight.shape == (64, 96 // world)
    assert full.blocks[0].mixer.n_heads == 8
    return {k: v[0] for k, v in errs.items()}


def _check_tp_model_bad(rank, world, seed):
    from catkit.dist import tensor_parallel_model

    full, _ = _tp_model_pair(seed, n_kv_heads=1)  # one KV head cannot be split
    with pytest.raises(ValueError, match="n_kv_heads"):
        tensor_parallel_model(full)
    with pytest.raises(ValueError, match="model"):
        tensor_parallel_model(nn.Linear(4, 4))


CHECKS = {name: (lambda r, w, s, cfg=cfg: _check_bound(r, w, s, *cfg)) for name, cfg in CONFIGS.items()}
CHECKS.update(zero_range=_check_zero_range, outliers=_check_outliers, nan_inf=_check_nan_inf,
              fallback_and_special=_check_fallback_and_special,
              pipelined=_check_pipelined, bad_input=_check_bad_input,
              single_rank_group=_check_single_rank_group,
              tp_exact=_check_tp_exact, tp_flash=_check_tp_flash, tp_bad=_check_tp_bad,
              tp_model=_check_tp_model, tp_model_bad=_check_tp_model_bad)
WORLD8_CHECKS = ["int6_g64_n2047", "nan_inf", "tp_exact"]


def _poison_empty():
    """As tests/conftest.py's ``poison_empty``, for this spawned rank: an unwritten byte shows."""
    real = torch.empty, torch.empty_like, torch.Tensor.new_empty

    def fill(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype != torch.bool:
            t.fill_(-1)
        return t

    torch.empty = lambda *a, **k: fill(real[0](*a, **k))
    torch.empty_like = lambda *a, **k: fill(real[1](*a, **k))
    torch.Tensor.new_empty = lambda self, *a, **k: fill(real[2](self, *a, **k))


def job(rank, world, seed, names):
    """Run the named checks on this rank; ``{name: ("ok" | failure text, info)}``."""
    _poison_empty()
    report = {}
    for name in names:
        try:
            report[name] = ("ok", CHECKS[name](rank, world, seed))
        except Exception as e:  # noqa: BLE001 - reported per check
            report[name] = (f"{type(e).__name__}: {e}", None)
    return report


def assert_check(reports, check):
    for rank, report in enumerate(reports):
        status, _ = report[check]
        assert status == "ok", f"rank {rank}/{len(reports)}: {status}"
