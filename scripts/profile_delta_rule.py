"""Per-kernel CUDA time of the delta-rule kernels (ours and fla's KDA), forward and forward+backward.

Usage (GPU; fla optional): PYTHONPATH=src python3 scripts/profile_delta_rule.py OUT_DIR [T,...] [names]
  T: sequence lengths with B*T = catkit.bench.delta_rule.TOKENS (default 2048,32768)
  names: comma-separated implementations of catkit.bench.delta_rule (default fg2,fla_kda)
Prints a do_bench median per case, the kernels above 0.02 ms (torch.profiler), the GPU's idle
time between kernels (largest gaps with the kernels around them), the host syncs one call makes
(torch.cuda sync debug mode), and register / spill counts of our compiled kernels; writes
OUT_DIR/profile-delta_rule.json.
"""
import json
import os
import sys
import tempfile
import warnings

import torch
from torch.profiler import ProfilerActivity, profile

import catkit.bench.delta_rule as bench
import catkit.ops.delta_rule.chunk_fwd as chunk_fwd


def kernel_table(prof, iters):
    table = {}
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", 0)
        if t > 0:
            table[e.key[:70]] = (t / 1e3 / iters, e.count // iters)
    return dict(sorted(table.items(), key=lambda kv: -kv[1][0]))


def idle_gaps(prof, iters):
    """GPU idle per call: (ms idle between kernels, [(gap ms, kernel before, kernel after)])."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.load(f)["traceEvents"]
    ks = sorted((e["ts"], e["ts"] + e["dur"], e["name"][:50]) for e in events
                if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))
    gaps, end = [], ks[0][1]
    for (t0, t1, name), prev in zip(ks[1:], ks):
        if t0 > end:
            gaps.append(((t0 - end) / 1e3, prev[2], name))
        end = max(end, t1)
    return sum(g for g, _, _ in gaps) / iters, sorted(gaps, reverse=True)[:6]


def host_syncs(call):
    """Source lines (ours, else the innermost frame) of the host syncs one call makes."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
            torch.cuda.synchronize()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    where = []
    for w in caught:
        if "synchroniz" in str(w.message):
            where.append(f"{os.path.basename(w.filename)}:{w.lineno}")
    return where


def main():
    out = sys.argv[1]
    lengths = [int(t) for t in (sys.argv[2] if len(sys.argv) > 2 else "2048,32768").split(",")]
    names = (sys.argv[3] if len(sys.argv) > 3 else "fg2,fla_kda").split(",")
    impls = dict(bench._ours())
    fla, _ = bench._fla()
    impls.update(fla or {})
    results = {}
    for T in lengths:
        B = bench.TOKENS // T
        x = bench._inputs(B, T)
        do = torch.randn_like(x["v"])
        for name in (n for n in names if n in impls):
            fn, keys = impls[name], bench._GRAD_KEYS[name]
            for mode in ("fwd", "fwd+bwd"):
                if mode == "fwd":
                    def call():
                        with torch.no_grad():
                            fn(x)
                else:
                    xg = bench._with_grad(x, keys)

                    def call():
                        bench._run_fwdbwd(fn, xg, keys, do)
                for _ in range(3):
                    call()
                torch.cuda.synchronize()
                ms = bench.time_cuda(call)
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(5):
                        call()
                    torch.cuda.synchronize()
                table = kernel_table(prof, 5)
                idle, gaps = idle_gaps(prof, 5)
                syncs = host_syncs(call)
                results[f"{name} {mode} T={T}"] = dict(ms=ms, kernels=table, idle_ms=idle, syncs=syncs)
                print(f"== {name} {mode} T={T} B={B}: {ms:.3f} ms (do_bench median)")
                for k, (t, c) in table.items():
                    if t > 0.02:
                        print(f"   {t:8.3f} ms  x{c}  {k}")
                print(f"   GPU idle between kernels: {idle:.3f} ms per call; largest gaps:")
                for g, before, after in gaps:
                    print(f"   {g:8.3f} ms  {before} -> {after}")
                print(f"   host syncs per call: {len(syncs)} {syncs}")
                for kname, kernel in getattr(chunk_fwd, "COMPILED", {}).items():
                    print(f"   regs {kname}: n_regs={kernel.n_regs} spills={kernel.n_spills} "
                          f"warps={kernel.metadata.num_warps}")
                torch.cuda.empty_cache()
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "profile-delta_rule.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
