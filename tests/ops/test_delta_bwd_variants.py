"""Every variant of chunk_bwd_dqkg_inter (SPLIT x AP_BF16, and key-block widths) through the whole
fg2 forward + backward against the token-loop ground truth (dq, dk, dv, dg, dbk, dbv, ds0), on
packed odd-length sequences with x30 decay, in fp32, bf16 and fp16, at chunk sizes 64 (four
sub-chunks), 32 (two) and 16 (none)."""

import pytest
import torch

import catkit.ops.delta_rule.chunk_bwd as cb
from catkit.ops.delta_rule import chunk_fg2_delta_rule
from catkit.ops.delta_rule.naive import naive_fg2_delta_rule
from catkit.utils.testing import rel_rms
from catkit.utils.triton_utils import interpreted

from delta_variant_cases import NAMES, fwd_bwd as _fwd_bwd, make_inputs as _inputs

# a masked lane whose exp overflows would mean a kernel formed exp(G_i) * exp(-G_j) somewhere
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")
VARIANTS = [(s, a) for s in (0, 1) for a in (0, 1, 2)]


def _run_variant(monkeypatch, x, cu, BT, opt):
    monkeypatch.setattr(cb, "dqkg_inter_options", lambda *a: [opt])
    return _fwd_bwd(chunk_fg2_delta_rule, x, cu, chunk_size=BT)


# (dtype, BT, lens, K, V, decay, tolerance vs the token loop, dg's)
CASES = [
    (torch.float32, 64, [70, 45, 13], 48, 32, 30.0, 1e-4, 1e-3),
    (torch.float32, 32, [63, 37], 32, 16, 1.0, 1e-4, 1e-3),
    (torch.bfloat16, 64, [100, 29], 32, 32, 30.0, 2e-2, 3e-2),
    (torch.float16, 32, [63], 16, 16, 30.0, 3e-3, 1e-2),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_dqkg_inter_variants_match_naive(seed, monkeypatch, case):
    dtype, BT, lens, K, V, decay, tol, tol_g = CASES[case]
    x, cu = _inputs(lens, 2, K, V, dtype, decay)
    ref = _fwd_bwd(naive_fg2_delta_rule, x, cu)
    bks = min(32, max(16, 1 << (K - 1).bit_length()))
    variants = VARIANTS if dtype == torch.bfloat16 else [(0, 0), (1, 0)]
    # a second key-block width where it masks channels (K = 48: blocks of 32 and 16)
    widths = (bks, 16) if K % bks else (bks,)
    base = None
    for split, ap in variants:
        for w in widths if ap == 0 else widths[:1]:
            opt = dict(BKS=w, BV=16, SPLIT=split, AP_BF16=ap, num_warps=4, num_stages=1)
            got = _run_variant(monkeypatch, x, cu, BT, opt)
            e_ref = {n: rel_rms(got[n].float(), ref[n].float()) for n in NAMES}
            for n, err in e_ref.items():
                assert err <= (tol_g if n == "g" else tol), f"{opt} d{n}: {err:.2e} vs naive"
            # the same fp32 math as the first variant, up to the bf16 rounding of AP_BF16's operands
            base = base or got
            e_base = {n: rel_rms(got[n].float(), base[n].float()) for n in NAMES}
            for n, err in e_base.items():
                assert err <= (1e-5 if ap == 0 else 3e-3), f"{opt} d{n}: {err:.2e} vs the first variant"
            print(opt, f"vs naive {max(e_ref.values()):.1e}, vs the first {max(e_base.values()):.1e}")


@pytest.mark.parametrize("case", [0, 2, 3])
def test_dqkg_intra_diag_matches_naive(seed, monkeypatch, case):
    # DIAG 1 / 2: the diagonal 16x16 blocks on tensor cores (recursive reference rows)
    dtype, BT, lens, K, V, decay, tol, tol_g = CASES[case]
    x, cu = _inputs(lens, 2, K, V, dtype, decay)
    ref = _fwd_bwd(naive_fg2_delta_rule, x, cu)
    base = None
    for diag in (0, 1, 2):
        opt = dict(BKS=16, DIAG=diag, num_warps=4, num_stages=1)
        monkeypatch.setattr(cb, "dqkg_intra_options", lambda *a, o=opt: [o])
        got = _fwd_bwd(chunk_fg2_delta_rule, x, cu, chunk_size=BT)
        for n in NAMES:
            err = rel_rms(got[n].float(), ref[n].float())
            assert err <= (tol_g if n == "g" else tol), f"DIAG {diag} d{n}: {err:.2e} vs naive"
        base = base or got
        for n in NAMES:  # tf32 products on the bf16 / fp16 paths (exact fp32 under the interpreter)
            err = rel_rms(got[n].float(), base[n].float())
            assert err <= (1e-4 if interpreted() else 3e-3), f"DIAG {diag} d{n}: {err:.2e} vs DIAG 0"


def test_chunk_size_16_has_no_subchunk_part(seed, monkeypatch):
    # BT = 16: a single sub-chunk, the A/P loop is skipped whatever the variant
    x, cu = _inputs([37, 20], 2, 16, 16, torch.float32, 5.0)
    ref = _fwd_bwd(naive_fg2_delta_rule, x, cu)
    got = _run_variant(monkeypatch, x, cu, 16, dict(BKS=16, BV=16, SPLIT=1, AP_BF16=2, num_warps=4, num_stages=1))
    for n in NAMES:
        assert rel_rms(got[n], ref[n]) <= (1e-3 if n == "g" else 1e-4), n


def test_sweep_options_carry_the_default_first():
    opts = cb.dqkg_inter_sweep_options(128, 128, 128)
    assert opts[0] == cb.dqkg_inter_options(128, 128, 128)[0]
    assert {(o["SPLIT"], o["AP_BF16"]) for o in opts} == {(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)}
    intra = cb.dqkg_intra_sweep_options(128, 128)
    assert intra[0] == cb.dqkg_intra_options(128, 128)[0] and {o["DIAG"] for o in intra} == {0, 1, 2}
    assert len(opts) == len({tuple(sorted(o.items())) for o in opts})
