"""chunk_intra (delta-rule forward: A, P and the diagonal-block inverses) for each key-block width
against fp64 PyTorch, on packed odd-length sequences, with mild and strong decay."""

import pytest
import torch
import torch.nn.functional as F
import triton

import catkit.ops.delta_rule.chunk_fwd as cf
from catkit.ops.delta_rule.chunk import prepare_chunks
from catkit.utils.testing import rel_rms

# a masked lane whose exp overflows would mean a kernel formed exp(G_i) * exp(-G_j) somewhere
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")
BT, BC = 64, 16


def run_intra(q, k, g, meta, opt):
    """G from chunk_cumsum (as chunk_fwd makes it), then chunk_intra with the one option ``opt``."""
    NTOK, H, K = q.shape
    NT = meta["chunk_indices"].shape[0]
    BK = max(16, triton.next_power_of_2(K))
    ci, cu = meta["chunk_indices"], meta["cu_seqlens"]
    G = torch.empty(NTOK, H, K, dtype=torch.float32)
    cf.chunk_cumsum_kernel[(NT, H)](g, G, ci, cu, H=H, K=K, BT=BT, BK=BK, G_SCALAR=False,
                                    num_warps=4, num_stages=1)
    A = torch.empty(NTOK, H, BT, dtype=torch.float32)
    Tm, P = torch.empty_like(A), torch.empty_like(A)
    pr = cf.precisions(q.dtype)
    cf.chunk_intra_kernel[(NT, H, BT // BC)](q, k, G, A, P, Tm, ci, cu, H=H, K=K, BT=BT, BC=BC,
                                             DOT_PREC=pr["DOT_PREC"], INV_PREC=pr["INV_PREC"], **opt)
    return A, P, Tm


def reference(q, k, g, cu):
    """fp64 A (strict lower), P (lower), diagonal-block inverses and the written-entry masks."""
    q, k, g = q.double(), k.double(), g.double()
    NTOK, H, _ = q.shape
    out = {n: torch.zeros(NTOK, H, BT, dtype=torch.float64) for n in ("A", "P", "Tm")}
    mask = {n: torch.zeros(NTOK, H, BT, dtype=torch.bool) for n in ("A", "P", "Tm")}
    for s0, s1 in zip(cu[:-1], cu[1:]):
        for s in range(s0, s1, BT):
            e = min(s + BT, s1)
            L = e - s
            G = g[s:e].cumsum(0)
            E = torch.exp((G[:, None] - G[None, :]).clamp(max=0))  # [L, L, H, K], i >= j used
            A = torch.einsum("ihc,jhc,ijhc->hij", k[s:e], k[s:e], E).tril(-1)
            P = torch.einsum("ihc,jhc,ijhc->hij", q[s:e], k[s:e], E).tril(0)
            out["A"][s:e, :, :L] = A.transpose(0, 1)
            out["P"][s:e, :, :L] = P.transpose(0, 1)
            r = torch.arange(L)
            lo = r[:, None] >= r[None, :]
            mask["P"][s:e, :, :L] = lo[:, None, :]
            # chunk_intra writes A's diagonal block in full (zeros above the diagonal)
            mask["A"][s:e, :, :L] = (r[None, :] < (r[:, None] // BC + 1) * BC)[:, None, :]
            for b in range(0, L, BC):
                be = min(b + BC, L)
                Ab = A[:, b:be, b:be]
                out["Tm"][s + b:s + be, :, b:be] = torch.linalg.inv(
                    torch.eye(be - b, dtype=torch.float64) + Ab).transpose(0, 1)
                mask["Tm"][s + b:s + be, :, b:be] = True
    return out, mask


def _case(decay, K=48, H=2, lens=(70, 45)):
    gen = torch.Generator().manual_seed(torch.initial_seed() % (2 ** 31))
    NTOK = sum(lens)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    q = F.normalize(r(NTOK, H, K), dim=-1)
    k = F.normalize(r(NTOK, H, K), dim=-1) * torch.sigmoid(r(NTOK, H, K)).sqrt()
    g = F.logsigmoid(r(NTOK, H, K) + 3.0) * decay
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    return q, k, g, cu, prepare_chunks(torch.tensor(cu), BT)


OPTIONS = [dict(BKS=b, num_warps=4, num_stages=1) for b in (16, 32)]


def test_intra_options_run_both_key_block_widths():
    assert {o["BKS"] for o in cf.intra_options(128, 128)} == {16, 32}


@pytest.mark.parametrize("opt", OPTIONS, ids=lambda o: f"BKS{o['BKS']}")
def test_chunk_intra_matches_fp64(seed, opt):
    for decay in (1.0, 30.0):  # 30: strong decay, exp(G_i - G_j) spans far below fp32's range
        q, k, g, cu, meta = _case(decay)
        K = q.shape[-1]
        full = dict(opt, NK=-(-K // opt["BKS"]), FAST_EXP=False)  # PTX: not interpreted
        A, P, Tm = run_intra(q, k, g, meta, full)
        ref, mask = reference(q, k, g, cu)
        for name, got in (("A", A), ("P", P), ("Tm", Tm)):
            m = mask[name]
            assert torch.isfinite(got[m]).all(), f"{name}: unwritten or non-finite entries"
            err = rel_rms(got[m].double(), ref[name][m])
            print(f"BKS={opt['BKS']} decay={decay} {name}: {err:.2e}")
            assert err < 1e-5, f"{name} (BKS={opt['BKS']}, decay={decay}): rel RMS {err:.2e}"
