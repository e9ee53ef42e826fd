"""Benchmark suite ``comm_symm``: Flash Communication over torch symmetric memory vs the NCCL path.

One process per GPU (>= 2; spawned here, or under ``torchrun``). For each message size (bf16
bytes, 64 KB .. 256 MB) it times, on the same inputs in the same processes:

* ``nccl_bf16``: ``dist.all_reduce`` of the bf16 tensor (the anchor);
* ``flash_<w>``: :func:`catkit.dist.flash_all_reduce` with ``transport="nccl"`` (kernels + two
  NCCL collectives), size fallback off (``min_bytes=0``);
* ``symm_<w>``: the same call with ``transport="symm"`` (kernels that store into the peers'
  symmetric buffers, two symm_mem barriers, no NCCL);

for w = int8, int6 (int4 reduce-scatter + int8 all-gather), int4; and, up to
``symm_exact.MAX_BYTES``, ``symm_exact``: the EXACT bf16 sum in one symmetric-memory kernel
(:mod:`catkit.dist.symm_exact`, torch's one-shot all-reduce), the candidate for the small-message
fallback. Each row: time (max over ranks
of the mean of back-to-back calls, CUDA events), host time per call, speedups over NCCL and, for
``symm_*``, over ``flash_*`` of the same width. ``correct``: finite, identical on every rank,
error vs the exact fp32 sum under the width's tolerance, and for ``symm_*`` BIT-IDENTICAL to
``flash_*`` on the same input. At the smallest and largest size ``symm_int8`` is also split into
its steps (``symm_int8:<step>`` rows). Summary rows ``symm_faster_<w>`` list the sizes where
symm beat both NCCL bf16 and flash_<w>, and the run prints the ``SYMM_FASTER`` entry for
``catkit/dist/flash_all_reduce.py`` (the ranges ``transport="auto"`` may use); the
``symm_exact_faster`` row likewise gives ``SYMM_EXACT_FASTER[world]`` (where the exact one-shot
kernel beat NCCL bf16; its rows are correct when identical on every rank and within bf16
rounding of the fp32 sum, and say whether they are bit for bit NCCL's).

Tiles: by default every quantization kernel of both transports runs one fixed tile (4096
values / 4 warps, the best or near-best in benchmarks/results/quant-kernels-NVIDIA_H200), which
keeps compilation short (the 2-GPU check must finish in 3 minutes); ``--tune`` autotunes as the
library does by default.

GPU: ``python -m catkit.bench.comm_symm --out DIR [--quick] [--tune]`` or
``scripts/gpu_comm.sh DIR`` (the GPU tests first, then this, then ``catkit bench comm``).
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.distributed as dist

from catkit.bench.registry import SUITES, register, run_suite

WIDTHS = {"int8": (8, 8), "int6": (4, 8), "int4": (4, 4)}
TOLERANCE = {"nccl_bf16": 0.01, "int8": 0.03, "int6": 0.2, "int4": 0.25}  # as catkit.bench.comm
GROUP_SIZE = 128
FIXED_TILE = (4096, 4)


def methods() -> dict:
    """name -> None (NCCL anchor) or (bits, gather_bits, transport)."""
    out = {"nccl_bf16": None}
    for w, (b, gb) in WIDTHS.items():
        out[f"flash_{w}"] = (b, gb, "nccl")
        out[f"symm_{w}"] = (b, gb, "symm")
    out["symm_exact"] = "exact"
    return out


def sizes_for(quick: bool) -> list[int]:
    step = 4 if quick else 2
    out, s = [], 8 << 10  # from 8 KB: the exact one-shot path is for latency-bound messages
    while s <= 256 << 20:
        out.append(s)
        s *= step
    return out


def pin_tiles(tile) -> None:
    """Every tuned quantization kernel (both transports) keeps only ``tile`` = (values, warps)."""
    from catkit.dist import symm_all_reduce as symm
    from catkit.ops.quant import groupwise

    for t in (groupwise._quant_tuned, groupwise._dequant_tuned, groupwise._reduce_requant_tuned,
              symm._symm_quant_tuned, symm._symm_reduce_tuned):
        t.configs = [groupwise._config(*tile)]


def _fmt(b: int) -> str:
    return f"{b >> 20}MB" if b >= 1 << 20 else f"{b >> 10}KB"


def _measure(size: int, world: int, dev, card: str, g, quick: bool, tiles: str) -> list[dict]:
    from catkit.bench.comm import _same_everywhere, _timed
    from catkit.dist import flash_all_reduce
    from catkit.utils.testing import rel_rms

    numel = size // 2
    nbuf = max(2, min(8, math.ceil((128 << 20) / size)))  # rotate past the 50 MB L2
    xs = [torch.randn(numel, generator=g, device=dev).to(torch.bfloat16) for _ in range(nbuf)]
    exact = xs[0].float()
    dist.all_reduce(exact)
    iters = 10 if quick else (20 if size >= 64 << 20 else 50)
    rows, times, results = [], {}, {}
    for name, spec in methods().items():
        it = iter(range(1 << 30))
        scratch = [x.clone() for x in xs]
        if spec is None:
            y = xs[0].clone()
            dist.all_reduce(y)
            fn = lambda: dist.all_reduce(scratch[next(it) % nbuf])  # noqa: E731
        elif spec == "exact":
            from catkit.dist import symm_exact

            if not symm_exact.usable(xs[0], world):
                continue  # above its buffer, or no symmetric memory here
            try:
                y = symm_exact.symm_exact_all_reduce(xs[0])
            except Exception as e:  # noqa: BLE001 - e.g. this torch lacks the op's form: a red row
                rows.append({"size": _fmt(size), "bytes": size, "method": name, "world": world, "card": card,
                             "error": f"{type(e).__name__}: {e}"[:300], "correct": False})
                print(f"[comm_symm] {name} at {_fmt(size)} failed: {type(e).__name__}: {e}", flush=True)
                continue
            fn = lambda: symm_exact.symm_exact_all_reduce(scratch[next(it) % nbuf], inplace=True)  # noqa: E731
        else:
            kw = dict(bits=spec[0], gather_bits=spec[1], group_size=GROUP_SIZE, min_bytes=0, transport=spec[2])
            try:
                y = flash_all_reduce(xs[0], **kw)
            except Exception as e:  # noqa: BLE001 - e.g. no symmetric memory: a red row, not a lost run
                rows.append({"size": _fmt(size), "bytes": size, "method": name, "world": world, "card": card,
                             "error": f"{type(e).__name__}: {e}"[:300], "correct": False})
                print(f"[comm_symm] {name} at {_fmt(size)} failed: {type(e).__name__}: {e}", flush=True)
                continue
            fn = lambda kw=kw: flash_all_reduce(scratch[next(it) % nbuf], inplace=True, **kw)  # noqa: E731
        results[name] = y
        same = _same_everywhere(y)
        err = rel_rms(y.float(), exact)
        ms, host_ms = _timed(fn, iters, 5, True)
        times[name] = ms
        width = name.split("_", 1)[1] if spec not in (None, "exact") else None
        ok = math.isfinite(err) and same and err <= TOLERANCE[width or "nccl_bf16"]
        row = {"size": _fmt(size), "bytes": size, "method": name, "world": world, "card": card, "tiles": tiles,
               "ms": ms, "host_ms": host_ms, "nccl_ms": times["nccl_bf16"],
               "busbw_GBps": 2.0 * (world - 1) / world * size / (ms * 1e-3) / 1e9, "rel_err": err}
        if spec is not None:
            row["speedup_vs_nccl"] = times["nccl_bf16"] / ms
        if spec == "exact":
            row["bit_identical_to_nccl"] = bool(torch.equal(y, results["nccl_bf16"]))
        elif spec is not None and spec[2] == "symm" and f"flash_{width}" in results:
            ref = results[f"flash_{width}"]
            bitwise = bool(torch.equal(y.nan_to_num(1e30), ref.nan_to_num(1e30)))
            t = torch.tensor([0.0 if bitwise else 1.0], device=dev)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)  # every rank reports the same verdict
            bitwise = float(t.item()) == 0.0
            row.update(flash_ms=times[f"flash_{width}"], speedup_vs_flash=times[f"flash_{width}"] / ms,
                       bit_identical_to_flash=bitwise,
                       max_abs_diff_vs_flash=float((y.float() - ref.float()).abs().max()))
            ok = ok and bitwise
        elif spec is not None and spec[2] == "symm":
            ok = False
        row["correct"] = bool(ok)
        rows.append(row)
    return rows


def _step_rows(size: int, world: int, dev, card: str, g, tiles: str, ok: bool) -> list[dict]:
    """``symm_int8`` split into its steps, each timed alone (step 1 alone writes the peers'
    recv rows back to back, which is safe: nobody reads them until a barrier)."""
    from catkit.bench.comm import _timed
    from catkit.dist.symm_all_reduce import get_symm_plan

    x = torch.randn(size // 2, generator=g, device=dev).to(torch.bfloat16)
    plan = get_symm_plan(x, None, 8, 8, GROUP_SIZE, False, torch.float32)
    plan.run(x, x.clone())  # binds (and, with --tune, tunes) every launch first
    out = torch.empty_like(x)
    steps = {"quantize_scatter": lambda: plan.step1(x), "barrier": lambda: plan.barrier(0),
             "reduce_broadcast": plan.step2, "dequantize": lambda: plan.step3(out)}
    rows, total = [], 0.0
    for name, fn in steps.items():
        ms, host_ms = _timed(fn, 20, 3, True)
        total += ms
        rows.append({"size": _fmt(size), "bytes": size, "method": f"symm_int8:{name}", "world": world,
                     "card": card, "tiles": tiles, "stage": name, "ms": ms, "host_ms": host_ms, "correct": ok})
    rows.append({"size": _fmt(size), "bytes": size, "method": "symm_int8:sum_of_steps", "world": world,
                 "card": card, "tiles": tiles, "stage": "sum", "ms": total + rows[1]["ms"], "correct": ok})
    return rows


def _ranges(wins: list[int], measured: list[int], from_zero: bool = False) -> list[tuple[int, int]]:
    """Runs of winning sizes as [lo, hi) byte ranges (hi: the next measured size, or twice the
    largest); ``from_zero`` starts a run at 0 when the smallest measured size wins."""
    ranges = []
    for s in wins:
        nxt = next((m for m in measured if m > s), 2 * s)
        if ranges and ranges[-1][1] == s:
            ranges[-1] = (ranges[-1][0], nxt)
        else:
            ranges.append((0 if from_zero and s == measured[0] else s, nxt))
    return ranges


def symm_faster_rows(rows: list[dict]) -> list[dict]:
    """Per width: the measured sizes where ``symm_<w>`` was correct and faster than both NCCL bf16
    and ``flash_<w>``, and the [lo, hi) byte ranges built from runs of such sizes (hi: the next
    measured size, or twice the largest); what ``SYMM_FASTER[(world, bits, gather_bits)]`` takes."""
    out = []
    measured = sorted({r["bytes"] for r in rows if r["method"] == "nccl_bf16"})
    for w, (b, gb) in WIDTHS.items():
        mine = {r["bytes"]: r for r in rows if r["method"] == f"symm_{w}"}
        wins = [s for s in measured if s in mine and mine[s]["correct"]
                and mine[s]["ms"] < min(mine[s]["nccl_ms"], mine[s].get("flash_ms", 0.0))]
        ranges = _ranges(wins, measured)
        world = next((r["world"] for r in rows), 0)
        out.append({"size": "-", "method": f"symm_faster_{w}", "world": world, "key": [world, b, gb],
                    "wins_bytes": wins, "ranges": [list(r) for r in ranges],
                    "correct": all(r["correct"] for r in mine.values())})
    return out


def symm_exact_faster_rows(rows: list[dict]) -> list[dict]:
    """The sizes where ``symm_exact`` was correct and faster than NCCL bf16, as [lo, hi) ranges
    for ``SYMM_EXACT_FASTER[world]`` (hi: the next measured size; lo 0 when the smallest measured
    size wins: below it both are pure latency, the same one-block kernel against the same call)."""
    measured = sorted({r["bytes"] for r in rows if r["method"] == "nccl_bf16"})
    mine = {r["bytes"]: r for r in rows if r["method"] == "symm_exact"}
    wins = [s for s in measured if s in mine and mine[s]["correct"] and mine[s]["ms"] < mine[s]["nccl_ms"]]
    ranges = _ranges(wins, measured, from_zero=True)
    world = next((r["world"] for r in rows), 0)
    return [{"size": "-", "method": "symm_exact_faster", "world": world, "key": world, "wins_bytes": wins,
             "ranges": [list(r) for r in ranges], "correct": all(r["correct"] for r in mine.values())}]


def _rank_job(rank: int, world: int, sizes: list[int], quick: bool, tune: bool) -> list[dict]:
    from catkit.dist import clear_plan_cache

    dev = torch.device("cuda", rank)
    card = torch.cuda.get_device_name(dev)
    tiles = "autotuned" if tune else f"{FIXED_TILE[0]}/{FIXED_TILE[1]}"
    if not tune:
        pin_tiles(FIXED_TILE)
    g = torch.Generator(device=dev).manual_seed(4321 + rank)
    rows = []
    for size in sizes:
        rows += _measure(size, world, dev, card, g, quick, tiles)
        clear_plan_cache()
        torch.cuda.empty_cache()
    ok = all(r["correct"] for r in rows if r["method"] == "symm_int8")
    for size in sorted({sizes[0], sizes[-1]}) if ok else ():  # a broken transport has no steps to time
        rows += _step_rows(size, world, dev, card, g, tiles, ok)
        clear_plan_cache()
        torch.cuda.empty_cache()
    return rows


def run_comm_symm(quick: bool = False, sizes: list[int] | None = None, tune: bool = False) -> list[dict]:
    """Spawn one rank per visible GPU (or join torchrun's group) and return the rows."""
    from catkit import env
    from catkit.dist.launch import run_local

    sizes = sizes or sizes_for(quick)
    rank, local_rank, env_world = env.distributed_rank()
    if env_world > 1:
        torch.cuda.set_device(local_rank)
        created = not dist.is_initialized()
        if created:
            dist.init_process_group("nccl")
        try:
            rows = _rank_job(rank, env_world, sizes, quick, tune)
            dist.barrier()
        finally:
            if created:
                dist.destroy_process_group()
    else:
        world = torch.cuda.device_count()
        if world < 2:
            raise RuntimeError(f"comm_symm benchmark needs >= 2 GPUs, {world} visible")
        rows = run_local(_rank_job, world, sizes, quick, tune, backend="nccl", timeout_s=560)[0]
    summary = symm_faster_rows(rows)
    exact = symm_exact_faster_rows(rows)
    if rank == 0:
        for r in summary:
            print(f"[comm_symm] {r['method']}: symm faster than NCCL bf16 and flash at {r['wins_bytes']}; "
                  f"SYMM_FASTER[{tuple(r['key'])}] = {[tuple(x) for x in r['ranges']]}", flush=True)
        for r in exact:
            print(f"[comm_symm] symm_exact_faster: one-shot exact faster than NCCL bf16 at {r['wins_bytes']}; "
                  f"SYMM_EXACT_FASTER[{r['key']}] = {[tuple(x) for x in r['ranges']]}", flush=True)
    return rows + summary + exact


def comm_symm_suite(quick: bool) -> list[dict]:
    return run_comm_symm(quick)


if "comm_symm" not in SUITES:
    register("comm_symm", "Flash Communication over symmetric memory vs its NCCL path vs NCCL bf16, 8 KB-256 MB",
             needs_gpu=True)(comm_symm_suite)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="sizes x4 apart (7 sizes) and fewer iterations")
    p.add_argument("--tune", action="store_true", help="autotune the kernels (slower to start) instead of one tile")
    p.add_argument("--out", default=None, help="directory for the JSON record")
    a = p.parse_args(argv)
    if a.tune:
        SUITES["comm_symm"].fn = lambda quick: run_comm_symm(quick, tune=True)
    run_suite("comm_symm", quick=a.quick, out_dir=a.out)


if __name__ == "__main__":
    main()
