"""Every variant of the forward kernels (chunk_fwd_state: STATE_BF16 x KSPLIT x PREFETCH x H_BF16 x
BV; chunk_prep: NSB x PREP_BF16 x BKS; chunk_fwd_o: BV; chunk_tsolve: warps) through the whole fg2
forward + backward against the token-loop ground truth: o, the final state and every gradient (the
backward reads the forward's saved h, W, KD, ...), on packed odd-length sequences in fp32, bf16 and
fp16, mild and x30 decay."""

import pytest
import torch
import torch.nn.functional as F

import catkit.ops.delta_rule.chunk_fwd as cf
import catkit.ops.delta_rule.chunk_fwd_state as cs
import catkit.ops.delta_rule.fwd_sweep_options as fso
from catkit.ops.delta_rule import chunk_fg2_delta_rule
from catkit.ops.delta_rule.chunk import prepare_chunks
from catkit.ops.delta_rule.naive import naive_fg2_delta_rule
from catkit.utils.testing import rel_rms

from delta_variant_cases import OUTS, fwd_bwd as _run, make_inputs as _inputs

# a masked lane whose exp overflows would mean a kernel formed exp(G_i) * exp(-G_j) somewhere
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")


@pytest.fixture(autouse=True)
def _plain_defaults(monkeypatch):
    """Each variant is checked against the plain defaults: the measured *_BEST hooks (each picks one
    of these variants first) are off here; test_delta_rule runs the kernels as shipped."""
    for mod, name in ((cs, "STATE_BEST"), (cs, "STATE_BEST_FEW"), (cf, "PREP_BEST"), (cf, "O_BEST"),
                      (cf, "TSOLVE_BEST"), (cf, "INTRA_BEST")):
        monkeypatch.setattr(mod, name, None)


# (dtype, BT, lens, K, V, decay, tolerance vs the token loop, dg's)
CASES = [
    (torch.float32, 64, [70, 45, 13], 48, 32, 1.0, 1e-4, 1e-3),
    (torch.bfloat16, 64, [100, 29], 32, 32, 30.0, 2e-2, 3e-2),
    (torch.bfloat16, 32, [63, 37], 32, 16, 1.0, 2e-2, 3e-2),
    (torch.float16, 32, [63], 32, 16, 30.0, 3e-3, 1e-2),
]
# (option, tolerance vs the default options' run: same fp32 math / bf16-rounded operands)
STATE = [dict(BV=16, num_warps=4, num_stages=1, PREFETCH=False, STATE_BF16=0, KSPLIT=2, H_BF16=0),
         dict(BV=32, num_warps=4, num_stages=1, PREFETCH=True, STATE_BF16=0, KSPLIT=2, H_BF16=0),
         dict(BV=16, num_warps=4, num_stages=1, PREFETCH=True, STATE_BF16=1, KSPLIT=1, H_BF16=0),
         dict(BV=32, num_warps=4, num_stages=1, PREFETCH=False, STATE_BF16=1, KSPLIT=2, H_BF16=1),
         dict(BV=16, num_warps=4, num_stages=1, PREFETCH=True, STATE_BF16=0, KSPLIT=1, H_BF16=1)]
PREP = [dict(BKS=16, num_warps=4, num_stages=1, NSB=2, PREP_BF16=0),
        dict(BKS=16, num_warps=4, num_stages=1, NSB=1, PREP_BF16=1),
        dict(BKS=32, num_warps=4, num_stages=1, NSB=1, PREP_BF16=1),
        dict(BKS=16, num_warps=4, num_stages=1, NSB=4, PREP_BF16=1)]
O = [dict(BV=32, num_warps=4, num_stages=1), dict(BV=16, num_warps=8, num_stages=1)]


def _rounds(opt):
    return bool(opt.get("STATE_BF16") or opt.get("PREP_BF16") or opt.get("H_BF16"))


@pytest.mark.parametrize("case", range(len(CASES)))
def test_fwd_variants_match_naive(seed, monkeypatch, case):
    dtype, BT, lens, K, V, decay, tol, tol_g = CASES[case]
    x, cu = _inputs(lens, 2, K, V, dtype, decay)
    ref = _run(naive_fg2_delta_rule, x, cu)
    base = _run(chunk_fg2_delta_rule, x, cu, chunk_size=BT)
    bf16 = dtype == torch.bfloat16
    runs = [("state", o) for o in STATE if bf16 or not _rounds(o)]
    runs += [("prep", o) for o in PREP if bf16 or not _rounds(o)]
    runs += [("o", o) for o in O] if case < 2 else []
    runs += [("tsolve", dict(num_warps=8, num_stages=1))] if case == 0 else []
    for which, opt in runs:
        with monkeypatch.context() as mp:
            mp.setattr(cf, f"{which}_options", lambda *a, o=opt: [o])
            got = _run(chunk_fg2_delta_rule, x, cu, chunk_size=BT)
        e_ref = {n: rel_rms(got[n].float(), ref[n].float()) for n in OUTS}
        for n, err in e_ref.items():
            assert err <= (tol_g if n == "g" else tol), f"{which} {opt} {n}: {err:.2e} vs naive"
        # structural variants repeat the default's fp32 math in another order (16-bit outputs: a
        # reordered sum can flip the last bit of a few elements, ~1e-4 relative RMS); the rounding
        # ones (bf16 operands / bf16 h) stay within bf16's precision of it
        e_base = {n: rel_rms(got[n].float(), base[n].float()) for n in OUTS}
        same = 1e-5 if dtype == torch.float32 else 1e-3
        for n, err in e_base.items():
            assert err <= (1e-2 if _rounds(opt) else same), f"{which} {opt} {n}: {err:.2e} vs the default"
        print(which, opt, f"vs naive {max(e_ref.values()):.1e}, vs default {max(e_base.values()):.1e}")


def test_h_bf16_stores_bf16_states_for_bf16_inputs_only(seed, monkeypatch):
    # H_BF16 must change what the backward reads (else the gradient checks above prove nothing)
    monkeypatch.setattr(cf, "state_options", lambda *a: [dict(STATE[3])])
    meta = prepare_chunks(torch.tensor([0, 40, 77], dtype=torch.int32), 32)
    for dtype, want in ((torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32)):
        q, k = (F.normalize(torch.randn(77, 2, 32), dim=-1).to(dtype) for _ in range(2))
        v = torch.randn(77, 2, 16).to(dtype)
        g = F.logsigmoid(torch.randn(77, 2, 32) + 1.0)
        o, ht, saved = cf.chunk_fwd(q, k, v, g, 0.3, None, True, meta, save=True)
        assert saved["h"].dtype == want and torch.isfinite(o.float()).all() and torch.isfinite(ht).all()


def test_sweep_options_carry_the_default_first():
    dev = torch.device("cpu")
    st = fso.state_sweep_options(128, [256, 16], dev)
    assert st[0] == cs.state_options(128, 256, dev)[0]
    assert {(o.get("STATE_BF16", 0), o.get("KSPLIT", 1), o.get("H_BF16", 0)) for o in st} >= {
        (0, 1, 0), (1, 1, 1), (1, 2, 1), (0, 2, 1), (1, 1, 0)}
    assert not any(o["BV"] == 16 and o["num_warps"] == 8 for o in st[1:])  # see state_options
    pr = fso.prep_sweep_options(128, 128)
    assert pr[0] == cf.prep_options(128, 128)[0] and {(o.get("NSB", 1), o.get("PREP_BF16", 0)) for o in pr} >= {
        (1, 0), (4, 1), (4, 0), (1, 1)}
    ob = fso.o_sweep_options(128)
    assert ob[0] == cf.o_options(128)[0] and fso.tsolve_sweep_options()[0] == cf.tsolve_options()[0]
    for opts in (st, pr, ob):
        assert len(opts) == len({tuple(sorted(o.items())) for o in opts})


def test_best_hooks_go_first(monkeypatch):
    best = dict(BKS=32, num_warps=4, num_stages=1, NSB=4, PREP_BF16=1)
    monkeypatch.setattr(cf, "PREP_BEST", best)
    assert cf.prep_options(128, 128)[0] == best
    monkeypatch.setattr(cs, "STATE_BEST", dict(STATE[3]))
    assert cs.state_options(128, 256, torch.device("cpu"))[0] == STATE[3]
    # wider than this call's columns: masked work only, the defaults stay
    assert cf.prep_options(16, 16)[0] != best
