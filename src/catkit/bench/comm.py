"""Benchmark suite ``comm``: NCCL bf16 all-reduce vs Flash Communication (int8, int6, int4).

One run on every visible GPU (>= 2; the suite spawns one process per GPU itself, so plain
``catkit bench comm`` works without torchrun). For each message size (bf16 bytes, 64 KB to
256 MB) it times, in the same processes, on the same inputs:

* ``nccl_bf16``: ``dist.all_reduce`` of the bf16 tensor (the anchor),
* ``flash_int8`` / ``flash_int6`` (int4 reduce-scatter + int8 all-gather) / ``flash_int4``:
  :func:`catkit.dist.flash_all_reduce` with the size fallback OFF (``min_bytes=0``) so the
  compressed path itself is timed,

and reports per row: time (max over ranks of the mean of a fixed number of back-to-back calls,
CUDA events), bus bandwidth, the bytes-limited ideal (NCCL's time at that size scaled by the
wire bytes of our two steps over NCCL's, ``ideal_ms``; and ``bw_ideal_ms``, those wire bytes at
the best link rate NCCL reached at any size), the speedup over NCCL, and the relative
RMS error against the exact fp32 all-reduce of the same inputs. ``correct`` requires finite output,
identical results on every rank and an error under the bit width's tolerance. Summary rows
``fallback_<method>`` give the measured crossover (``fallback_bytes_measured``: the smallest
size from which the method beats NCCL at every larger size) and ``recommended_fallback_bytes``
(the largest over methods) for ``catkit.dist.flash_all_reduce.FALLBACK_BYTES["nccl"]``. A second
pass times ``flash_<bits>_auto`` (the library call with that measured threshold, i.e. what a user
gets: NCCL below it, compression above), each again next to a fresh NCCL time.

Smoke test without a GPU: ``python -m catkit.bench.comm --device cpu`` (gloo, tiny sizes).
GPU: ``python -m catkit.bench.comm --out DIR [--quick]`` or ``catkit bench comm`` (spawns one
process per visible GPU), or under ``torchrun --nproc-per-node N -m catkit.bench.comm --out DIR``
(uses torchrun's ranks; every rank writes the same JSON).
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.distributed as dist

from catkit.bench.registry import SUITES, format_table, register, run_suite

METHODS = {  # name: (bits, gather_bits); None = the NCCL anchor
    "nccl_bf16": None,
    "flash_int8": (8, 8),
    "flash_int6": (4, 8),
    "flash_int4": (4, 4),
}
# relative RMS error allowed vs the exact fp32 sum on Gaussian data (measured on CPU: ~0.006 for
# int8, ~0.1 for int6/int4 at group 128); generous so only a real bug turns a row red
TOLERANCE = {"nccl_bf16": 0.01, "flash_int8": 0.03, "flash_int6": 0.2, "flash_int4": 0.25}
GROUP_SIZE = 128


def _sizes(quick: bool, device: str) -> list[int]:
    if device == "cpu":
        return [64 << 10, 256 << 10]
    step = 4 if quick else 2
    sizes, s = [], 64 << 10
    while s <= 256 << 20:
        sizes.append(s)
        s *= step
    return sizes


def _fmt_bytes(b: int) -> str:
    return f"{b >> 20}MB" if b >= 1 << 20 else f"{b >> 10}KB"


def _wire_bytes(numel: int, world: int, method: str) -> float:
    """Bytes each rank sends: ring all-reduce 2 (W-1)/W of the bf16 size; ours (W-1)/W of each step."""
    from catkit.ops.quant.layout import QuantLayout, row_length

    if METHODS[method] is None:
        return 2.0 * (world - 1) / world * numel * 2
    bits, gbits = METHODS[method]
    c = row_length(numel, world, GROUP_SIZE)
    rb1 = QuantLayout(c, bits, GROUP_SIZE).row_bytes
    rb2 = QuantLayout(c, gbits, GROUP_SIZE).row_bytes
    return (world - 1) * (rb1 + rb2)


def _timed(fn, iters: int, warmup: int, cuda: bool) -> float:
    """Mean ms per call over ``iters`` back-to-back calls, max over ranks (same count everywhere,
    so no rank waits in a collective the others never issue)."""
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    dist.barrier()
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        ms = start.elapsed_time(end) / iters
    else:
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        ms = (time.perf_counter() - t0) * 1e3 / iters
    t = torch.tensor([ms], device="cuda" if cuda else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _same_everywhere(y: torch.Tensor) -> bool:
    s = y.float().double().sum().float()
    w = (y.float() * torch.linspace(0.5, 1.5, y.numel(), device=y.device)).double().sum().float()
    t = torch.stack([s, w, -s, -w]).to(y.device)
    hi = t.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return bool(torch.equal(hi.nan_to_num(1e30), t.nan_to_num(1e30)))  # max == mine for +v and -v


def _measure(size: int, world: int, methods: dict, min_bytes: dict, quick: bool, dev, card: str, g) -> list[dict]:
    """Time and check every method at one size; ``methods`` maps name -> (bits, gather_bits) | None."""
    from catkit.dist import flash_all_reduce
    from catkit.utils.testing import rel_rms

    cuda = dev.type == "cuda"
    numel = size // 2
    # rotate buffers so large messages are not served from L2 (50 MB on H100/H200)
    nbuf = max(2, min(8, math.ceil((128 << 20) / size)))
    xs = [torch.randn(numel, generator=g, device=dev).to(torch.bfloat16) for _ in range(nbuf)]
    exact = xs[0].float()
    dist.all_reduce(exact)
    iters = 10 if quick or not cuda else (20 if size >= 64 << 20 else 50)
    warmup = 3 if not cuda else 5
    rows, times = [], {}
    for method, spec in methods.items():
        it = iter(range(1 << 30))
        if spec is None:
            scratch = [x.clone() for x in xs]
            y = xs[0].clone()
            dist.all_reduce(y)
            # in place on scratch copies: values grow each call, speed does not depend on them
            fn = lambda: dist.all_reduce(scratch[next(it) % nbuf])  # noqa: E731
        else:
            kw = dict(bits=spec[0], gather_bits=spec[1], group_size=GROUP_SIZE, min_bytes=min_bytes.get(method, 0))
            y = flash_all_reduce(xs[0], **kw)
            scratch = [x.clone() for x in xs]
            # in place like the NCCL call (no output allocation), on the same kind of scratch copies
            fn = lambda kw=kw: flash_all_reduce(scratch[next(it) % nbuf], inplace=True, **kw)  # noqa: E731
        same = _same_everywhere(y)
        err = rel_rms(y.float(), exact)
        ms = _timed(fn, iters, warmup, cuda)
        times[method] = ms
        base = method.removesuffix("_auto")
        wire = _wire_bytes(numel, world, base)
        if spec is not None and size < min_bytes.get(method, 0):
            wire = _wire_bytes(numel, world, "nccl_bf16")  # the fallback sends bf16
        row = {
            "size": _fmt_bytes(size), "bytes": size, "method": method, "world": world, "card": card,
            "ms": ms, "nccl_ms": times["nccl_bf16"],
            "busbw_GBps": 2.0 * (world - 1) / world * size / (ms * 1e-3) / 1e9,
            "wire_MB": wire / 2**20,
            "ideal_ms": times["nccl_bf16"] * wire / _wire_bytes(numel, world, "nccl_bf16"),
            "rel_err": err,
            "correct": bool(math.isfinite(err) and same and err <= TOLERANCE[base]),
        }
        if spec is not None:
            row["speedup_vs_nccl"] = times["nccl_bf16"] / ms
            row["ideal_speedup"] = times["nccl_bf16"] / row["ideal_ms"]
        rows.append(row)
    return rows


def _rank_job(rank: int, world: int, sizes: list[int], quick: bool, device: str) -> list[dict]:
    """Pass 1: every method with the fallback off. Pass 2: the same with each method's measured
    threshold (``*_auto``: what a user gets), to show no size is slower than NCCL after it.
    Times are max-reduced over ranks, so every rank derives the same thresholds."""
    cuda = device == "cuda"
    dev = torch.device("cuda", rank) if cuda else torch.device("cpu")
    card = torch.cuda.get_device_name(dev) if cuda else "CPU"
    g = torch.Generator(device=dev).manual_seed(1234 + rank)
    rows = []
    for size in sizes:
        rows += _measure(size, world, METHODS, {}, quick, dev, card, g)
        if cuda:
            torch.cuda.empty_cache()
    thresholds = {f"{r['method'].removeprefix('fallback_')}_auto": r["fallback_bytes_measured"]
                  for r in _fallback_rows(rows)}
    auto = {"nccl_bf16": None, **{m: METHODS[m.removesuffix("_auto")] for m in thresholds}}
    for size in sizes:
        for r in _measure(size, world, auto, thresholds, quick, dev, card, g):
            if r["method"] != "nccl_bf16":
                r["fallback_bytes"] = thresholds[r["method"]]
                rows.append(r)
        if cuda:
            torch.cuda.empty_cache()
    return rows  # identical on every rank: times are max-reduced, errors computed from identical y


def _fallback_rows(rows: list[dict]) -> list[dict]:
    """Measured crossover per method: smallest size from which it beats NCCL at every larger size."""
    out, worst = [], 0
    for method in (m for m in METHODS if METHODS[m] is not None):  # pass-1 rows only
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["bytes"])
        threshold = None
        for r in reversed(mine):
            if r["correct"] and r["ms"] < r["nccl_ms"]:
                threshold = r["bytes"]
            else:
                break
        if threshold is None:
            threshold = 2 * mine[-1]["bytes"] if mine else 0  # never wins in the measured range
        worst = max(worst, threshold)
        out.append({"size": "-", "method": f"fallback_{method}", "fallback_bytes_measured": threshold,
                    "correct": all(r["correct"] for r in mine)})
    for r in out:
        r["recommended_fallback_bytes"] = worst
    return out


def _finish(rows: list[dict]) -> list[dict]:
    """Add ``bw_ideal_ms``: the row's wire bytes at the best link rate any NCCL row reached in this
    run (the physical bytes limit), then the fallback summary rows."""
    nccl = [r for r in rows if r["method"] == "nccl_bf16"]
    best = max((r["wire_MB"] / r["ms"] for r in nccl), default=0.0)
    for r in rows:
        if best > 0:
            r["bw_ideal_ms"] = r["wire_MB"] / best
    return rows + _fallback_rows(rows)


def run_comm(quick: bool = False, device: str = "cuda", world: int | None = None,
             sizes: list[int] | None = None) -> list[dict]:
    """Spawn one rank per GPU (or ``world`` gloo ranks on CPU) and return the rows.

    ``sizes``: message sizes in bf16 bytes (default: 64 KB .. 256 MB, or two tiny ones on CPU).
    Under ``torchrun`` (WORLD_SIZE > 1) nothing is spawned: this process is one of the ranks,
    and every rank returns the same rows.
    """
    from catkit import env
    from catkit.dist.launch import run_local

    if device not in ("cuda", "cpu"):
        raise ValueError(f"device: expected 'cuda' or 'cpu', got {device!r}")
    sizes = sizes or _sizes(quick, device)
    rank, local_rank, env_world = env.distributed_rank()
    if env_world > 1:
        if device == "cuda":
            torch.cuda.set_device(local_rank)
        created = not dist.is_initialized()
        if created:
            dist.init_process_group("nccl" if device == "cuda" else "gloo")
        try:
            rows = _rank_job(rank, env_world, sizes, quick, device)
        finally:
            if created:
                dist.destroy_process_group()
        return _finish(rows)
    if device == "cuda":
        world = world or torch.cuda.device_count()
        if world < 2:
            raise RuntimeError(f"comm benchmark needs >= 2 GPUs, {torch.cuda.device_count()} visible")
        backend = "nccl"
    else:
        world, backend = world or 2, "gloo"
    results = run_local(_rank_job, world, sizes, quick, device, backend=backend, timeout_s=560)
    return _finish(results[0])


def comm_suite(quick: bool) -> list[dict]:
    return run_comm(quick, device="cuda")


# Guarded: ``python -m catkit.bench.comm`` runs this file as __main__ and the harness may import
# it again as catkit.bench.comm; one registration is enough.
if "comm" not in SUITES:
    register("comm", "Flash Communication all-reduce (int8/int6/int4) vs NCCL bf16, 64 KB-256 MB, all GPUs",
             needs_gpu=True)(comm_suite)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--out", default=None, help="directory for the JSON record (GPU runs)")
    a = p.parse_args(argv)
    if a.device == "cpu":
        print(format_table(run_comm(a.quick, device="cpu")))
    else:
        run_suite("comm", quick=a.quick, out_dir=a.out)


if __name__ == "__main__":
    main()
