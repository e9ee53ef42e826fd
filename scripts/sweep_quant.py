"""Time every tile config of the three group-wise quant kernels at all-reduce sizes (one GPU).

Usage (GPU):  PYTHONPATH=src python3 scripts/sweep_quant.py OUT_DIR [--baseline OLD_GROUPWISE_PY]
       (CPU):  SMALL=1 PYTHONPATH=src python3 scripts/sweep_quant.py OUT_DIR   (tiny sizes, interpreter)

For bf16 messages of 64 MB and 256 MB, group 128, bits 8 and 4, world 2 and 4, the kernels as
``flash_all_reduce``'s plan launches them (quantize: the message into W rows; reduce_requantize:
W rows of one chunk -> 1 row; dequantize: W gathered rows -> the bf16 message), each config of
``groupwise.TUNE_CONFIGS`` is launched directly (no autotuner), timed with
``triton.testing.do_bench`` (median; it flushes L2 before every run), and its output bytes are
compared with the first config's (must be equal) and the first config's with ``naive.py`` (codes
within one step at FMA ties, metadata equal). Prints ms, GB/s (bytes read + written), the fraction
of 4.8 TB/s, and marks the best correct config per (kernel, size, bits, world). ``--baseline``: a
copy of the old groupwise.py (e.g. ``git show main:src/catkit/ops/quant/groupwise.py``) timed
the same way as row ``config=baseline``. Then the autotuned launch once per kernel (its choice
and bytes) and the host time per call of a bound launcher, fixed vs autotuned-then-rebound.
Writes OUT_DIR/sweep-quant.json and OUT_DIR/sweep-quant.log. A config that fails is reported.
"""
import importlib.util
import json
import os
import sys
import time

import torch

SMALL = os.environ.get("SMALL", "0") not in ("", "0")
if SMALL and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any @triton.jit module is imported

from catkit.bench.registry import time_cuda  # noqa: E402
from catkit.ops.quant import groupwise as gw  # noqa: E402
from catkit.ops.quant import naive  # noqa: E402
from catkit.ops.quant.layout import QTensor, QuantLayout, row_length, unpack_int4  # noqa: E402

HBM_TBS = 4.8  # H200
G = 128
LOG = []


def say(*a):
    s = " ".join(str(v) for v in a)
    print(s, flush=True)
    LOG.append(s)


def bench(fn):
    # CUDA events (do_bench median) on a GPU; on the CPU (interpreter) a 1 + 2-call wall clock
    return time_cuda(fn, warmup=1, rep=2)


def same_as_naive(q: QTensor, ref: QTensor) -> tuple[bool, str]:
    """Fields equal (NaN where NaN); codes may differ by one step at FMA rounding ties (<= 1%)."""
    L = q.layout
    for f in ("codes", "scale", "min"):
        u, v = getattr(q, f), getattr(ref, f)
        if f == "codes" and L.bits == 4:
            u, v = unpack_int4(u), unpack_int4(v)
        u, v = u.float(), v.float()
        if not torch.equal(u.isnan(), v.isnan()):
            return False, f"{f}: NaN positions differ"
        d = (u - v).nan_to_num(0).abs()
        if f == "codes":
            frac = (d > 0).float().mean().item()
            if d.max() > 1 or frac > 1e-2:
                return False, f"codes: max diff {d.max().item()}, {frac:.2%} differ"
        elif not (d <= 1e-6 * v.nan_to_num(0).abs() + 1e-30).all():
            return False, f"{f}: max diff {d.max().item()}"
    return True, ""


def load_baseline(path):
    spec = importlib.util.spec_from_file_location("catkit_quant_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # Triton reads kernel sources through the module
    spec.loader.exec_module(mod)
    return mod


def cases():
    sizes = [(0.03, 3 * 128 * 40)] if SMALL else [(64, 32 << 20), (256, 128 << 20)]  # (MB, bf16 values)
    for mb, n in sizes:
        for bits in (8, 4):
            for world in (2, 4):
                yield mb, n, bits, world


def configs(baseline):
    out = [(f"{v}/{w}", (v, w)) for v, w in gw.TUNE_CONFIGS]
    return out + ([("baseline", None)] if baseline is not None else [])


def sweep_case(mb, N, bits, world, dev, baseline, rows):
    c = row_length(N, world, G)
    l1 = QuantLayout(c, bits, G)
    x = (torch.randn(N, device=dev) * 3 + 1).to(torch.bfloat16)
    ref_q = naive.quantize(x, bits, G, rows=world)
    # the chunk a rank owns: W quantized copies (here the message's W rows), summed and requantized
    ref_r = naive.quantize(naive.dequantize(ref_q, reduce_rows=True), bits, G, n_valid=c)
    kernels = {
        # quantize is the same launch whatever W (rows only move where a group's bytes go): W = 2 only
        **({"quantize": (N * 2, world * l1.row_bytes)} if world == 2 else {}),
        "reduce_requantize": (world * l1.row_bytes, l1.row_bytes),
        "dequantize": (world * l1.row_bytes, N * 2),
    }
    for kname, (rd, wr) in kernels.items():
        first, results = None, []
        for cname, cfg in configs(baseline):
            mod = baseline if cfg is None else gw
            kw = {} if cfg is None else {"config": cfg}
            try:
                if kname == "quantize":
                    out = QTensor(torch.zeros(world, l1.row_bytes, dtype=torch.uint8, device=dev), l1, N)
                    f = mod.quantize_launcher(l1, world, N, out, **kw)
                    fn, check = (lambda: f(x)), (lambda: same_as_naive(out, ref_q))
                    got = lambda: out.data  # noqa: E731
                elif kname == "reduce_requantize":
                    out = QTensor(torch.zeros(1, l1.row_bytes, dtype=torch.uint8, device=dev), l1, c)
                    fn = mod.reduce_requantize_launcher(ref_q, l1, c, out, **kw)
                    check, got = (lambda: same_as_naive(out, ref_r)), (lambda: out.data)
                else:
                    y = torch.zeros(N, dtype=torch.bfloat16, device=dev)
                    f = mod.dequantize_launcher(ref_q, **kw)
                    fn, got = (lambda: f(y)), (lambda: y.view(torch.uint8))

                    def check():
                        want = naive.dequantize(ref_q).to(torch.bfloat16).float()
                        ok = torch.allclose(y.float(), want, rtol=2**-7, atol=1e-5)
                        return ok, "" if ok else "decoded values differ from naive"
                fn()
                if dev == "cuda":
                    torch.cuda.synchronize()
                if first is None and cfg is not None:
                    ok, why = check()
                    first = got().clone()
                elif cfg is None:
                    ok, why = check()
                else:
                    ok = torch.equal(got(), first)
                    why = "" if ok else "bytes differ from the first config"
                ms = bench(fn)
                row = dict(kernel=kname, size_mb=mb, bits=bits, world=world, config=cname, ms=round(ms, 4),
                           gbps=round((rd + wr) / ms / 1e6, 1), frac_hbm=round((rd + wr) / ms / 1e9 / HBM_TBS, 3),
                           bytes=rd + wr, correct=bool(ok), note=why)
            except Exception as e:  # a config that does not compile or run is reported, not fatal
                row = dict(kernel=kname, size_mb=mb, bits=bits, world=world, config=cname, ms=None, correct=False,
                           note=f"{type(e).__name__}: {str(e)[:300]}")
            results.append(row)
        good = [r for r in results if r["correct"] and r["ms"] is not None and r["config"] != "baseline"]
        best = min(good, key=lambda r: r["ms"]) if good else None
        for r in results:
            r["best"] = r is best
            mark = "*" if r["best"] else " "
            if r["ms"] is None:
                say(f"{kname:18s} {mb:5g}MB int{bits} W{world} {r['config']:9s} FAILED {r['note']}")
            else:
                say(f"{kname:18s} {mb:5g}MB int{bits} W{world} {r['config']:9s} {r['ms']:8.4f} ms "
                    f"{r['gbps']:8.1f} GB/s {r['frac_hbm']:6.1%} of {HBM_TBS} TB/s {mark}"
                    f"{'' if r['correct'] else ' WRONG: ' + r['note']}")
        rows.extend(results)


def autotuned_and_host(dev, rows):
    """The autotuned launcher once per kernel (choice, bytes), and host time per call."""
    N, world, bits = (3 * 128 * 40 if SMALL else 32 << 20), 2, 8
    c = row_length(N, world, G)
    l1 = QuantLayout(c, bits, G)
    x = (torch.randn(N, device=dev) * 3).to(torch.bfloat16)
    out = QTensor(torch.zeros(world, l1.row_bytes, dtype=torch.uint8, device=dev), l1, N)
    fixed = QTensor(torch.zeros_like(out.data), l1, N)
    gw.quantize_launcher(l1, world, N, fixed, config=gw.TUNE_CONFIGS[0])(x)
    auto = gw.quantize_launcher(l1, world, N, out)
    auto(x)
    say(f"autotuned quantize {N * 2 / 2**20:g}MB int8 W2: chose {gw._quant_tuned.best_config}, "
        f"bytes equal to config {gw.TUNE_CONFIGS[0]}: {torch.equal(out.data, fixed.data)}")
    rows.append(dict(kernel="quantize", kind="autotuned", chosen=str(gw._quant_tuned.best_config),
                     correct=bool(torch.equal(out.data, fixed.data))))
    r1 = QTensor(torch.zeros(1, l1.row_bytes, dtype=torch.uint8, device=dev), l1, c)
    gw.reduce_requantize_launcher(out, l1, c, r1)()
    say(f"autotuned reduce_requantize: chose {gw._reduce_requant_tuned.best_config}")
    y = torch.empty(N, dtype=torch.bfloat16, device=dev)
    gw.dequantize_launcher(out)(y)
    say(f"autotuned dequantize: chose {gw._dequant_tuned.best_config}")
    # host time per call (small message so the GPU queue never fills): fixed vs autotuned-rebound
    n = 128 * 64
    ls = QuantLayout(row_length(n, world, G), bits, G)
    xs = torch.randn(n, device=dev).to(torch.bfloat16)
    qs = QTensor(torch.zeros(world, ls.row_bytes, dtype=torch.uint8, device=dev), ls, n)
    for name, f in (("fixed", gw.quantize_launcher(ls, world, n, qs, config=gw.TUNE_CONFIGS[0])),
                    ("autotuned", gw.quantize_launcher(ls, world, n, qs))):
        f(xs)
        if dev == "cuda":
            torch.cuda.synchronize()
        reps = 20 if SMALL else 500
        t = time.perf_counter()
        for _ in range(reps):
            f(xs)
        us = (time.perf_counter() - t) / reps * 1e6
        if dev == "cuda":
            torch.cuda.synchronize()
        say(f"host time per quantize launch ({name} launcher, bound once): {us:.1f} us")
        rows.append(dict(kernel="quantize", kind=f"host_{name}", host_us=round(us, 2), correct=True))


def main():
    args = sys.argv[1:]
    if not args:
        sys.exit(__doc__)
    out_dir = args[0]
    baseline = load_baseline(args[args.index("--baseline") + 1]) if "--baseline" in args else None
    os.makedirs(out_dir, exist_ok=True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    card = torch.cuda.get_device_name() if dev == "cuda" else "cpu (interpreter)"
    say(f"device: {card}; configs (values/warps): {gw.TUNE_CONFIGS}; group {G}; bf16 messages"
        + ("; SMALL: interpreter timings, meaningless" if SMALL else ""))
    t0 = time.time()
    torch.manual_seed(0)
    rows = []
    for case in cases():
        sweep_case(*case, dev, baseline, rows)
    say("\nbest correct tile per case (vs baseline where given):")
    for r in rows:
        if r.get("best"):
            base = [b for b in rows if b.get("config") == "baseline" and b.get("ms") and
                    all(b[k] == r[k] for k in ("kernel", "size_mb", "bits", "world"))]
            vs = f"  baseline {base[0]['ms']:.4f} ms -> {base[0]['ms'] / r['ms']:.2f}x" if base else ""
            say(f"  {r['kernel']:18s} {r['size_mb']:5g}MB int{r['bits']} W{r['world']}: {r['config']:7s} "
                f"{r['ms']:.4f} ms {r['frac_hbm']:6.1%} of HBM{vs}")
    try:
        autotuned_and_host(dev, rows)
    except Exception as e:
        say(f"autotuned launch FAILED: {type(e).__name__}: {str(e)[:300]}")
        rows.append(dict(kind="autotuned", correct=False, note=str(e)[:300]))
    say(f"total {time.time() - t0:.1f} s")
    with open(os.path.join(out_dir, "sweep-quant.json"), "w") as f:
        json.dump(dict(device=card, hbm_tbs=HBM_TBS, group_size=G, configs=gw.TUNE_CONFIGS, rows=rows), f, indent=1)
    with open(os.path.join(out_dir, "sweep-quant.log"), "w") as f:
        f.write("\n".join(LOG) + "\n")


if __name__ == "__main__":
    main()
