"""Smoke test of the comm benchmark's logic on 2 gloo ranks at a tiny size (the GPU run is the lead's):
all-reduce rows, measured fallback, the per-stage breakdown and the TP prefill rows, in one spawn."""

from catkit.bench.comm import METHODS, run_comm


def test_comm_bench_cpu_smoke():
    rows = run_comm(quick=True, device="cpu", world=2, sizes=[8 << 10], parts=("comm", "tp"))
    flash = [m for m in METHODS if m != "nccl_bf16"]
    timed = [r for r in rows if r["size"] != "-" and "stage" not in r and not r["method"].startswith("tp_")]
    assert [r["method"] for r in timed] == list(METHODS) + [f"{m}_auto" for m in flash]
    for r in timed:
        assert r["correct"], r
        assert r["ms"] > 0 and r["host_ms"] > 0 and r["world"] == 2 and r["bw_ideal_ms"] > 0
    pass1 = [r for r in timed if r["method"] in flash]
    assert all(r["ideal_speedup"] > 1.5 for r in pass1)  # fewer wire bytes than bf16
    assert pass1[0]["rel_err"] < pass1[-1]["rel_err"]  # int8 more accurate than int4
    fallback = [r for r in rows if r["method"].startswith("fallback_")]
    assert len(fallback) == 3 and all(r["fallback_bytes_measured"] > 0 for r in fallback)
    # the *_auto rows ran with the measured thresholds
    thresholds = {r["method"].removeprefix("fallback_") + "_auto": r["fallback_bytes_measured"] for r in fallback}
    assert all(r["fallback_bytes"] == thresholds[r["method"]] for r in timed if r["method"].endswith("_auto"))
    # five stages + their sum per compressed method, each with its bytes
    stages = [r for r in rows if "stage" in r and not r["stage"].startswith("chunks=")]
    assert len(stages) == 6 * len(flash)
    for r in stages:
        assert r["ms"] > 0 and r["correct"]
        assert r["stage"] == "sum" or r["moved_MB"] > 0 and ("hbm_GBps" in r) != ("busbw_GBps" in r)
    # pipelined slices: bit-identical to one slice, timed
    chunked = [r for r in rows if r.get("stage", "").startswith("chunks=")]
    assert len(chunked) == 2 * len(flash)  # K = 1, 2 on CPU and all(r["correct"] and r["ms"] > 0 for r in chunked)
    # TP prefill: exact vs the unsharded model, compressed vs exact, int8 closest
    tp = {r["method"]: r for r in rows if r["method"].startswith("tp_")}
    assert list(tp) == ["tp_exact"] + [f"tp_{m}" for m in flash]
    assert all(r["correct"] and r["ttft_ms"] > 0 and r["ppl"] > 1 for r in tp.values()), tp
    assert tp["tp_exact"]["logit_rel_rms"] < 1e-4
    assert 0 < tp["tp_flash_int8"]["logit_rel_rms"] < tp["tp_flash_int4"]["logit_rel_rms"]
    assert "speedup_vs_exact" in tp["tp_flash_int8"]
