"""The per-chunk variants of chunk_intra + chunk_tsolve (chunk_fwd_intra.py: FUSED 1 row-block
kernel, FUSED 2 whole-chunk kernel, each with DIAG 0 / DIAG 1): every one through the whole fg2
forward + backward against the token loop (fp32 / bf16 / fp16, packed odd lengths, mild and x30
decay), and on the intermediates A, P, T against the default pair chunk_intra + chunk_tsolve."""

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import catkit.ops.delta_rule.chunk_fwd as cf
import catkit.ops.delta_rule.chunk_fwd_intra as ci
import catkit.ops.delta_rule.fwd_sweep_options as fso
from catkit.ops.delta_rule import chunk_fg2_delta_rule
from catkit.ops.delta_rule.chunk import prepare_chunks
from catkit.ops.delta_rule.naive import naive_fg2_delta_rule
from catkit.utils.testing import rel_rms

from test_delta_fwd_variants import CASES, OUTS, _inputs, _plain_defaults, _run  # noqa: F401 (autouse fixture)

# a masked lane whose exp overflows would mean a kernel formed exp(G_i) * exp(-G_j) somewhere
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")


def _variants(K, per_form=False):
    """One sweep option per distinct computation (the interpreter ignores num_warps), or with
    ``per_form`` the first (most promising) per (FUSED, DIAG)."""
    keep = {}
    for o in fso.intra_sweep_options(max(16, triton.next_power_of_2(K)), K)[1:]:
        key = (o["FUSED"], o["DIAG"]) + (() if per_form else (o["BKS"], o.get("DBKS"), o.get("SOLVE_TF32", 0)))
        keep.setdefault(key, o)
    return list(keep.values())


def test_sweep_options_default_first_and_every_form():
    opts = fso.intra_sweep_options(128, 128)
    assert opts[0] == cf.intra_options(128, 128)[0] and not opts[0].get("FUSED")
    assert {(o.get("FUSED", 0), o.get("DIAG", 0)) for o in opts} == {(0, 0), (1, 0), (1, 1), (2, 0), (2, 1)}
    assert {(o.get("FUSED", 0), o.get("SOLVE_TF32", 0)) for o in opts} >= {(1, 1), (2, 1)}
    assert len(opts) == len({tuple(sorted(o.items())) for o in opts})
    # narrower K: no key block wider than the channels
    assert all(o["BKS"] <= 32 and o.get("DBKS", 0) <= 32 for o in fso.intra_sweep_options(32, 32))


def test_intra_best_hook_goes_first(monkeypatch):
    best = dict(fso.intra_sweep_options(128, 128)[-1])
    monkeypatch.setattr(cf, "INTRA_BEST", best)
    assert cf.intra_options(128, 128)[0] == best
    monkeypatch.setattr(cf, "INTRA_BEST", dict(best, BKS=64))
    assert cf.intra_options(32, 32)[0] != cf.INTRA_BEST  # wider than K = 32: defaults stay


@pytest.mark.parametrize("case", range(len(CASES)))
def test_intra_variants_match_naive(seed, monkeypatch, case):
    dtype, BT, lens, K, V, decay, tol, tol_g = CASES[case]
    x, cu = _inputs(lens, 2, K, V, dtype, decay)
    ref = _run(naive_fg2_delta_rule, x, cu)
    base = _run(chunk_fg2_delta_rule, x, cu, chunk_size=BT)
    # one option per (FUSED, DIAG), the key-block widths being covered by the intermediates' test
    opts = _variants(K, per_form=True)
    for opt in opts:
        with monkeypatch.context() as mp:
            mp.setattr(cf, "intra_options", lambda *a, o=opt: [o])
            got = _run(chunk_fg2_delta_rule, x, cu, chunk_size=BT)
        e_ref = {n: rel_rms(got[n].float(), ref[n].float()) for n in OUTS}
        for n, err in e_ref.items():
            assert err <= (tol_g if n == "g" else tol), f"{opt} {n}: {err:.2e} vs naive"
        # the same math in another order (the interpreter runs every product in fp32)
        e_base = {n: rel_rms(got[n].float(), base[n].float()) for n in OUTS}
        for n, err in e_base.items():
            assert err <= 1e-4, f"{opt} {n}: {err:.2e} vs the default"
        print(opt, f"vs naive {max(e_ref.values()):.1e}, vs default {max(e_base.values()):.1e}")


def _intermediates(q, k, g, meta, opt, store_a=True):
    """G (chunk_cumsum, as chunk_fwd makes it), then A, P, Tm from intra_solve with ``opt``."""
    NTOK, H, K = q.shape
    BT, NT = meta["BT"], meta["chunk_indices"].shape[0]
    ci_, cu = meta["chunk_indices"], meta["cu_seqlens"]
    G = torch.empty(NTOK, H, K, dtype=torch.float32)
    cf.chunk_cumsum_kernel[(NT, H)](g, G, ci_, cu, H=H, K=K, BT=BT, BK=max(16, triton.next_power_of_2(K)),
                                    G_SCALAR=False, num_warps=4, num_stages=1)
    A = torch.empty(NTOK, H, BT, dtype=torch.float32)
    Tm = torch.empty_like(A)
    P = torch.empty_like(A)
    ci.intra_solve((q, k, G, A, P, Tm, ci_, cu), NT, H, K, BT, cf.precisions(q.dtype), [opt],
                   cf.tsolve_options(), store_a=store_a)
    return A, P, Tm


def _masks(lens, H, BT):
    """Entries every path writes: A strict lower, P lower, T every column of the chunk."""
    n = sum(lens)
    m = {x: torch.zeros(n, H, BT, dtype=torch.bool) for x in ("A", "P", "Tm")}
    s0 = 0
    for L in lens:
        for s in range(s0, s0 + L, BT):
            c = min(BT, s0 + L - s)
            r = torch.arange(c)
            m["A"][s:s + c, :, :c] = (r[:, None] > r[None, :])[:, None, :]
            m["P"][s:s + c, :, :c] = (r[:, None] >= r[None, :])[:, None, :]
            m["Tm"][s:s + c, :, :c] = True
        s0 += L
    return m


def _case(dtype, BT, decay, lens=(70, 45, 13), K=48, H=2):
    n = sum(lens)
    q = F.normalize(torch.randn(n, H, K), dim=-1).to(dtype)
    k = F.normalize(torch.randn(n, H, K), dim=-1).to(dtype)
    g = F.logsigmoid(torch.randn(n, H, K) + 1.0) * decay
    meta = prepare_chunks(torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32), BT)
    BK = max(16, triton.next_power_of_2(K))
    return (q, k, g, meta), _intermediates(q, k, g, meta, cf.intra_options(BK, K)[0]), lens


def _check_intermediates(opt, case, bound=1e-5):
    """rel RMS of ``opt``'s A, P, T against the default's on the written entries (asserted)."""
    x, want, lens = case
    H, BT = x[0].shape[1], x[3]["BT"]
    got = _intermediates(*x, opt)
    errs = {}
    for i, (name, m) in enumerate(_masks(lens, H, BT).items()):
        a, b = got[i][m].double(), want[i][m].double()
        assert torch.isfinite(a).all(), f"{opt} {name}: unwritten or non-finite entries"
        errs[name] = rel_rms(a, b)
        assert errs[name] <= bound, f"{opt} {name} (BT {BT}): {errs[name]:.2e} vs the default"
    # T is lower triangular: its upper part must be stored as zeros (chunk_prep reads full rows)
    assert (got[2][upper_mask(lens, H, BT)] == 0).all(), f"{opt}: T not zero above the diagonal"
    return errs


def upper_mask(lens, H, BT):
    n = sum(lens)
    m = torch.zeros(n, H, BT, dtype=torch.bool)
    s0 = 0
    for L in lens:
        for s in range(s0, s0 + L, BT):
            c = min(BT, s0 + L - s)
            r = torch.arange(c)
            m[s:s + c, :, :c] = (r[:, None] < r[None, :])[:, None, :]
        s0 += L
    return m


@pytest.mark.parametrize("dtype, BT, decay", [(torch.float32, 64, 30.0), (torch.bfloat16, 32, 30.0),
                                              (torch.float32, 16, 1.0)])
def test_intermediates_match_default(seed, dtype, BT, decay):
    case = _case(dtype, BT, decay)
    opts = _variants(48, per_form=BT < 64)  # every key-block width at BT = 64
    if BT == 64:  # and the register caps (launch options; the interpreter must accept them)
        opts.append(next(o for o in fso.intra_sweep_options(64, 48) if o.get("DMAXNREG")))
    for opt in opts:
        errs = _check_intermediates(opt, case)
        print(opt, {n: f"{e:.1e}" for n, e in errs.items()})


@triton.jit
def _wrong_right(b_G, m, G_r, FAST_EXP: tl.constexpr):
    # an injected defect: the right factor 0.1% too large
    return tl.where(m, 1.001 * tl.exp(tl.where(m, b_G - G_r[None, :], 0.0)), 0.0)


def test_an_injected_error_fails(seed, monkeypatch):
    opt = next(o for o in _variants(48) if o["FUSED"] == 1 and o["DIAG"] == 1)
    case = _case(torch.float32, 64, 1.0)
    _check_intermediates(opt, case)  # passes as written
    monkeypatch.setattr(ci, "_right", _wrong_right)
    with pytest.raises(AssertionError, match="vs the default"):
        _check_intermediates(opt, case)
