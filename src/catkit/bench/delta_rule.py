"""Benchmark suite ``delta_rule``: our GDN / KDA / FG2-GDN / FG2-GDN+ chunk kernels against fla-core
0.6.0 (``chunk_gated_delta_rule``, ``chunk_kda``) and SDPA flash attention at the same shape.

Shape: H = 16, d = 128, bf16, T in {2K, 8K, 32K} with B * T = 32K (``quick``: T = 2K only).
Modes: forward (no autograd graph) and forward + backward. Each row has ms, tokens/s, the ratio to
the matching fla kernel (``ratio_vs_fla`` = fla ms / ours ms, > 1 means we are faster), a FLOP/byte
lower bound and ``correct``: our bf16 kernel vs our fp32 kernel at the full shape, and our fp32
kernel vs the plain-PyTorch fp32 chunked reference on a slice, both measured in this process.
fla rows are checked against our fp32 kernel; when fla refuses (its gated backward on Hopper with
Triton < 3.7.1), the row records the message and no timing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from catkit.bench.registry import register, time_cuda
from catkit.utils.testing import rel_rms

H, D = 16, 128
TOKENS = 32768
TS = (2048, 8192, 32768)
CHUNK = 64
# (bf16 dense TFLOP/s, HBM TB/s) used for the lower bounds; matched on the device name.
_PEAKS = {"H200": (989e12, 4.8e12), "H100": (989e12, 3.35e12)}


def _dev():
    return "cuda" if torch.cuda.is_available() else "cpu"  # CPU only for a smoke run of the logic


def _peaks():
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    for key, val in _PEAKS.items():
        if key in name:
            return val
    return _PEAKS["H100"]


def _inputs(B, T, device=None, dtype=torch.bfloat16, seed=0):
    device = device or _dev()
    gen = torch.Generator(device=device).manual_seed(seed)
    r = lambda *s: torch.randn(*s, device=device, generator=gen)  # noqa: E731
    q = F.normalize(r(B, T, H, D), dim=-1).to(dtype)
    k = F.normalize(r(B, T, H, D), dim=-1).to(dtype)
    v = r(B, T, H, D).to(dtype)
    g = F.logsigmoid(r(B, T, H, D) + 3.0)  # fp32 log-decay, mean decay about 0.95 per step
    gs = g.mean(-1)
    beta = torch.sigmoid(r(B, T, H)).to(dtype)
    bk = torch.sigmoid(r(B, T, H, D)).to(dtype)
    bv = torch.sigmoid(r(B, T, H, D)).to(dtype)
    return dict(q=q, k=k, v=v, g=g, gs=gs, beta=beta, bk=bk, bv=bv)


def _ours():
    from catkit.ops.delta_rule import chunk_fg2_delta_rule, chunk_gated_delta_rule, chunk_kda

    return {
        "gdn": lambda x: chunk_gated_delta_rule(x["q"], x["k"], x["v"], x["gs"], x["beta"])[0],
        "kda": lambda x: chunk_kda(x["q"], x["k"], x["v"], x["g"], x["beta"])[0],
        "fg2": lambda x: chunk_fg2_delta_rule(x["q"], x["k"], x["v"], x["g"], x["bk"])[0],
        "fg2+": lambda x: chunk_fg2_delta_rule(x["q"], x["k"], x["v"], x["g"], x["bk"], x["bv"])[0],
    }


def _fla():
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_gdn
        from fla.ops.kda import chunk_kda as fla_kda
    except Exception as e:  # noqa: BLE001 - any import failure is recorded in the rows
        return None, f"{type(e).__name__}: {e}"
    return {
        "fla_gdn": lambda x: fla_gdn(x["q"], x["k"], x["v"], x["gs"], x["beta"])[0],
        "fla_kda": lambda x: fla_kda(x["q"], x["k"], x["v"], x["g"], x["beta"])[0],
    }, None


def _sdpa(x):
    q, k, v = (t.transpose(1, 2) for t in (x["q"], x["k"], x["v"]))
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)


_GRAD_KEYS = {"gdn": ("q", "k", "v", "gs", "beta"), "kda": ("q", "k", "v", "g", "beta"),
              "fg2": ("q", "k", "v", "g", "bk"), "fg2+": ("q", "k", "v", "g", "bk", "bv"),
              "fla_gdn": ("q", "k", "v", "gs", "beta"), "fla_kda": ("q", "k", "v", "g", "beta"),
              "sdpa": ("q", "k", "v")}
_MATCH = {"gdn": "fla_gdn", "kda": "fla_kda", "fg2": "fla_kda", "fg2+": "fla_kda"}


def _with_grad(x, keys):
    return {n: (t.detach().clone().requires_grad_() if n in keys else t) for n, t in x.items()}


def _run_fwdbwd(fn, x, keys, do):
    o = fn(x)
    grads = torch.autograd.grad(o, [x[n] for n in keys], do)
    return o, grads


def _limits(name, B, T, mode):
    """Lower bound in ms: max(FLOPs / peak, bytes / bandwidth) of the chunked algorithm."""
    flops_peak, bw = _peaks()
    n = B * T * H
    if name == "sdpa":
        f = 2 * 2 * B * H * T * T * D / 2
        byts = 4 * n * D * 2
        if mode == "fwd+bwd":
            f, byts = f * 3.5, byts * 2.5
    else:
        C = CHUNK  # per token: A, P, W (3 C K), T V, P Vn (2 C V), W S, Q S, state (3 K V)
        f = 2 * n * (3 * C * D + 2 * C * D + 3 * D * D)
        g_bytes = 4 * (1 if name.endswith("gdn") else D)
        byts = n * (4 * D * 2 + g_bytes)  # q, k, v, o in bf16 + g in fp32
        if name.startswith("fg2"):
            byts += n * D * 2 * (2 if name == "fg2+" else 1)
        if mode == "fwd+bwd":  # backward recomputes about 2x the forward work, reads/writes twice
            f, byts = f * 3, byts * 3
    return max(f / flops_peak, byts / bw) * 1e3


@register("delta_rule", "GDN/KDA/FG2-GDN/FG2-GDN+ chunk kernels vs fla-core 0.6.0 and SDPA", needs_gpu=True)
def bench_delta_rule(quick: bool) -> list[dict]:
    from catkit.ops.delta_rule.naive import chunked_reference_fg2

    ours = _ours()
    fla, fla_err = _fla()
    rows = []
    # One-off: our fp32 kernel against the fp32 PyTorch chunked reference on a slice (B=1, T=1024).
    xs = _inputs(1, min(1024, TOKENS), dtype=torch.float32, seed=1)
    ref_ok = {}
    for name, keys in (("fg2+", _GRAD_KEYS["fg2+"]), ("kda", _GRAD_KEYS["kda"]), ("gdn", _GRAD_KEYS["gdn"])):
        xa = _with_grad(xs, keys)
        do = torch.randn_like(xs["v"])
        oa, ga = _run_fwdbwd(ours[name], xa, keys, do)
        xr = _with_grad(xs, keys)
        if name == "fg2+":
            ref = lambda x: chunked_reference_fg2(x["q"], x["k"], x["v"], x["g"], x["bk"], x["bv"])[0]  # noqa: E731
        else:
            gkey = "gs" if name == "gdn" else "g"
            ref = lambda x, gkey=gkey: chunked_reference_fg2(  # noqa: E731
                x["q"], x["k"], x["v"], x[gkey], x["beta"][..., None].expand_as(x["k"]))[0]
        orf, grf = _run_fwdbwd(ref, xr, keys, do)
        errs = [rel_rms(oa, orf)] + [rel_rms(a, b) for a, b in zip(ga, grf)]
        ref_ok[name] = max(errs)
        print(f"[delta_rule] fp32 kernel {name} vs chunked fp32 reference: max rel RMS {max(errs):.2e}")
    ref_pass = {n: e < 2e-3 for n, e in ref_ok.items()}
    ref_pass["fg2"] = ref_pass["fg2+"]

    for T in (TS[:1] if quick else TS):
        B = TOKENS // T
        x = _inputs(B, T)
        x32 = {n: t.float() for n, t in x.items()}
        do = torch.randn(B, T, H, D, device=_dev(), dtype=torch.bfloat16)
        impls = dict(ours)
        if fla is not None:
            impls.update(fla)
        impls["sdpa"] = _sdpa
        ref_cache = {}
        times = {}
        for name, fn in impls.items():
            for mode in ("fwd", "fwd+bwd"):
                row = dict(impl=name, mode=mode, T=T, B=B, H=H, d=D)
                keys = _GRAD_KEYS[name]
                try:
                    # correctness first: ours and fla against our fp32 kernel on the same inputs
                    if name != "sdpa":
                        ref_name = {"fla_gdn": "gdn", "fla_kda": "kda"}.get(name, name)
                        if ref_name not in ref_cache:
                            xr = _with_grad(x32, keys)
                            ref_cache[ref_name] = _run_fwdbwd(ours[ref_name], xr, keys, do.float())
                        o_ref, g_ref = ref_cache[ref_name]
                        if mode == "fwd":
                            with torch.no_grad():
                                errs = [rel_rms(fn(x), o_ref)]
                        else:
                            o, gr = _run_fwdbwd(fn, _with_grad(x, keys), keys, do)
                            errs = [rel_rms(o, o_ref)] + [rel_rms(a, b) for a, b in zip(gr, g_ref)]
                        row["max_rel_rms"] = max(errs)
                        row["correct"] = bool(max(errs) < 5e-2 and ref_pass.get(ref_name, True))
                    else:
                        with torch.no_grad():
                            sl = {n: t[:1, :min(1024, T)] for n, t in x.items()}
                            o = _sdpa(sl)
                            qf, kf, vf = (sl[n].float().transpose(1, 2) for n in ("q", "k", "v"))
                            o_ref = F.scaled_dot_product_attention(qf, kf, vf, is_causal=True).transpose(1, 2)
                        row["max_rel_rms"] = rel_rms(o, o_ref)
                        row["correct"] = bool(row["max_rel_rms"] < 2e-2)
                    if mode == "fwd":
                        def call(fn=fn):
                            with torch.no_grad():
                                fn(x)
                    else:
                        xg = _with_grad(x, keys)

                        def call(fn=fn, xg=xg, keys=keys):
                            _run_fwdbwd(fn, xg, keys, do)
                    ms = time_cuda(call)
                    times[(name, mode)] = ms
                    row["ms"] = ms
                    row["tokens_per_s"] = B * T / ms * 1e3
                    row["limit_ms"] = _limits(name, B, T, mode)
                    row["frac_of_limit"] = row["limit_ms"] / ms
                except Exception as e:  # noqa: BLE001 - record refusals/compile errors as measured
                    row["correct"] = False if name in ours else row.get("correct", False)
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                rows.append(row)
                torch.cuda.empty_cache()
        if fla is None:
            rows.append(dict(impl="fla", T=T, B=B, error=fla_err, correct=False))
        for r in rows:
            if r.get("T") != T or "ms" not in r:
                continue
            other = _MATCH.get(r["impl"])
            if other and (other, r["mode"]) in times:
                r["ratio_vs_" + other] = times[(other, r["mode"])] / r["ms"]
            if r["impl"] in ours and ("fla_kda", r["mode"]) in times:
                r["ratio_vs_fla_kda"] = times[("fla_kda", r["mode"])] / r["ms"]
    return rows
