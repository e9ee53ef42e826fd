"""Smoke test of the comm benchmark's logic on 2 gloo ranks at a tiny size (the GPU run is the lead's)."""

from catkit.bench.comm import METHODS, run_comm


def test_comm_bench_cpu_smoke():
    rows = run_comm(quick=True, device="cpu", world=2, sizes=[8 << 10])
    timed = [r for r in rows if r["size"] != "-"]
    flash = [m for m in METHODS if m != "nccl_bf16"]
    assert [r["method"] for r in timed] == list(METHODS) + [f"{m}_auto" for m in flash]
    for r in timed:
        assert r["correct"], r
        assert r["ms"] > 0 and r["world"] == 2 and r["bw_ideal_ms"] > 0
    flash = [r for r in timed if r["method"] in METHODS and r["method"] != "nccl_bf16"]
    assert all(r["ideal_speedup"] > 1.5 for r in flash)  # fewer wire bytes than bf16
    assert flash[0]["rel_err"] < flash[-1]["rel_err"]  # int8 more accurate than int4
    fallback = [r for r in rows if r["method"].startswith("fallback_")]
    assert len(fallback) == 3 and all(r["fallback_bytes_measured"] > 0 for r in fallback)
    # the *_auto rows ran with the measured thresholds
    thresholds = {r["method"].removeprefix("fallback_") + "_auto": r["fallback_bytes_measured"] for r in fallback}
    assert all(r["fallback_bytes"] == thresholds[r["method"]] for r in timed if r["method"].endswith("_auto"))
