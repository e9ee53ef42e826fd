"""Checks every forward intermediate of the chunked delta rule against an fp64 PyTorch reference,
so a wrong result on the GPU names the kernel that produced it (not only ``o``).

Usage: PYTHONPATH=src python scripts/check_delta_fwd_kernels.py [OUT_DIR]
Runs chunk_fwd (save=True) on packed sequences of odd lengths (H = 4, K = V = 128, BT = 64, plus a
strong-decay case) in fp32, bf16 and fp16, and prints relative RMS per intermediate:
G (chunk_cumsum), A/P (chunk_intra), T (chunk_intra + chunk_tsolve), W/QG/KD (chunk_prep),
vn/h/final (chunk_fwd_state), o (chunk_fwd_o). Exit 1 when any exceeds its bound. Also runs on the
CPU interpreter (slowly; pass SMALL=1 for K = V = 32).
"""
import json
import os
import sys

import torch
import torch.nn.functional as F

from catkit.ops.delta_rule.chunk import prepare_chunks
from catkit.ops.delta_rule.chunk_fwd import chunk_fwd

BT = 64
# fp32 runs ieee products; 16-bit inputs run tf32 / bf16 products on 16-bit stored W/QG/KD/U
# (G is fp32 from the same inputs; P and T come from tf32 / tf32x3 products on fp32 operands)
BOUND = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}
TIGHT = {"G": 1e-5, "P": 5e-3, "T": 5e-3}


def reference(q, k, v, g, scale, h0, cu):
    """fp64 per-chunk intermediates on flattened [NTOK, H, D] inputs (g per channel)."""
    q, k, v, g = (x.double() for x in (q, k, v, g))
    NTOK, H, K = q.shape
    V = v.shape[-1]
    out = {n: torch.zeros(NTOK, H, BT, dtype=torch.float64, device=q.device) for n in ("A", "P", "Tm")}
    out.update({n: torch.zeros(NTOK, H, K, dtype=torch.float64, device=q.device)
                for n in ("G", "W", "QG", "KD")})
    out["vn"] = torch.zeros(NTOK, H, V, dtype=torch.float64, device=q.device)
    out["o"] = torch.zeros_like(out["vn"])
    hs, finals = [], []
    for n in range(len(cu) - 1):
        S = h0[n].double().clone()
        for s in range(cu[n], cu[n + 1], BT):
            e = min(s + BT, cu[n + 1])
            L = e - s
            G = g[s:e].cumsum(0)  # [L, H, K]
            E = torch.exp((G[:, None] - G[None, :]).clamp(max=0))  # [L, L, H, K], i >= j used
            A = torch.einsum("ihc,jhc,ijhc->hij", k[s:e], k[s:e], E).tril(-1)
            P = torch.einsum("ihc,jhc,ijhc->hij", q[s:e], k[s:e], E).tril(0)
            T = torch.linalg.inv(torch.eye(L, dtype=A.dtype, device=A.device) + A)
            eG = torch.exp(G)
            W = T @ (k[s:e] * eG).transpose(0, 1)  # [H, L, K]
            U = T @ v[s:e].transpose(0, 1)
            QG = q[s:e] * eG
            KD = k[s:e] * torch.exp(G[-1:] - G)
            hs.append(S.clone())
            vn = U - W @ S
            o = scale * (QG.transpose(0, 1) @ S + P @ vn)
            S = torch.exp(G[-1])[:, :, None] * S + KD.permute(1, 2, 0) @ vn
            for name, x in (("A", A), ("P", P), ("Tm", T)):
                out[name][s:e, :, :L] = x.transpose(0, 1)
            out["G"][s:e], out["W"][s:e], out["QG"][s:e], out["KD"][s:e] = G, W.transpose(0, 1), QG, KD
            out["vn"][s:e], out["o"][s:e] = vn.transpose(0, 1), o.transpose(0, 1)
        finals.append(S)
    out["h"] = torch.stack(hs)
    out["final"] = torch.stack(finals)
    return out


def rel(a, b, mask=None):
    a, b = a.double(), b.double()
    if mask is not None:
        a, b = a[mask], b[mask]
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30))


def main():
    out_dir = sys.argv[1] if len(sys.argv) > 1 else None
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    D = 32 if os.environ.get("SMALL") else 128
    lens = [300, 77, 1000] if dev == "cuda" else [70, 45]
    H = 4
    results, bad = {}, []
    for decay in (1.0, 30.0):
        gen = torch.Generator(device=dev).manual_seed(0)
        NTOK = sum(lens)
        r = lambda *s: torch.randn(*s, device=dev, generator=gen)  # noqa: E731
        q32 = F.normalize(r(NTOK, H, D), dim=-1)
        k32 = F.normalize(r(NTOK, H, D), dim=-1) * torch.sigmoid(r(NTOK, H, D)).sqrt()
        v32 = r(NTOK, H, D)
        g = F.logsigmoid(r(NTOK, H, D) + 3.0) * decay
        h0 = r(len(lens), H, D, D)
        cu = [0]
        for n in lens:
            cu.append(cu[-1] + n)
        meta = prepare_chunks(torch.tensor(cu, device=dev), BT)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            q, k, v = (x.to(dtype) for x in (q32, k32, v32))
            scale = D ** -0.5
            o, ht, saved = chunk_fwd(q, k, v, g, scale, h0, True, meta, save=True)
            ref = reference(q, k, v, g, scale, h0, cu)
            # lower-triangle masks per token row (column j <= row within its chunk, j < chunk length)
            within = torch.cat([torch.arange(min(BT, e - s), device=dev)
                                for a, b in zip(cu, cu[1:]) for s in range(a, b, BT)
                                for e in [min(s + BT, b)]])
            cols = torch.arange(BT, device=dev)
            lo = (cols[None, :] <= within[:, None])[:, None, :].expand(-1, H, -1)
            errs = dict(G=rel(saved["G"], ref["G"]), A=None, P=rel(saved["P"], ref["P"], lo),
                        T=rel(saved["Tm"], ref["Tm"], lo), W=rel(saved["W"], ref["W"]),
                        QG=rel(saved["QG"], ref["QG"]), KD=rel(saved["KD"], ref["KD"]),
                        vn=rel(saved["vn"], ref["vn"]), h=rel(saved["h"], ref["h"]),
                        final=rel(ht, ref["final"]), o=rel(o, ref["o"]))
            del errs["A"]  # A itself is not saved; T = (I + A)^-1 carries it
            key = f"decay={decay} {str(dtype).split('.')[-1]}"
            results[key] = errs
            worst = [n for n, e in errs.items() if not e <= min(BOUND[dtype], TIGHT.get(n, 1.0))]
            bad += [f"{key} {n}" for n in worst]
            print(key, " ".join(f"{n}={e:.1e}" for n, e in errs.items()),
                  "FAIL: " + ",".join(worst) if worst else "ok", flush=True)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "check-delta-fwd-kernels.json"), "w") as f:
            json.dump(results, f, indent=1)
    print("check_delta_fwd_kernels:", "FAILED " + "; ".join(bad) if bad else "all ok")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
