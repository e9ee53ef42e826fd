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
(the largest over methods) for ``catkit.dist.flash_all_reduce.FALLBACK_BYTES[("nccl", world)]``. A second
pass times ``flash_<bits>_auto`` (the library call with that measured threshold, i.e. what a user
gets: NCCL below it, compression above), each again next to a fresh NCCL time, in three
interleaved rounds (median reported).

Every timed row also has ``host_ms``: the wall time of issuing the calls, per call; near ``ms``
means host bound (Python / launches), far below means the GPU or the link is the limit. Then,
at the smallest size and at 64 / 256 MB, each compressed method's five steps are timed alone
(rows ``flash_<bits>:<stage>`` with the bytes each moves: ``hbm_GBps`` / ``hbm_frac`` of the
card's peak for kernels, ``busbw_GBps`` for the two collectives; ``:sum_of_stages`` next to the
full call) and the pipelined path is swept (rows ``flash_<bits>:chunks=K``, K = 1, 2, 4, 8) to
set ``PIPELINE_CHUNKS``. The run prints the measured ``FALLBACK_BYTES[("nccl", world)]``.

Suite ``comm_tp`` (same module; ``python -m catkit.bench.comm`` runs both, two JSON records):
time-to-first-token of a TP = #GPUs prefill of a ~1B-parameter dense ``CatModel`` (random
weights, 8K tokens of built-in corpus text, bf16) with exact vs int8 / int6 / int4 all-reduce,
the logit change (relative RMS, top-1 agreement vs exact TP; exact TP vs the unsharded model)
and the perplexity of the prompt text under each.

Smoke test without a GPU: ``python -m catkit.bench.comm --device cpu`` (gloo, tiny sizes, TP rows too).
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
# Interleaved timing rounds per size in the second pass (the ``*_auto`` rows, which must show no
# size slower than NCCL: a claim about a few microseconds at small sizes, where single passes
# drifted by more than that).
AUTO_ROUNDS = 3
TOLERANCE = {"nccl_bf16": 0.01, "flash_int8": 0.03, "flash_int6": 0.2, "flash_int4": 0.25}
GROUP_SIZE = 128
CHUNK_SWEEP = (1, 2, 4, 8)  # pipelined slices timed at the stage sizes
HBM_PEAK_GBPS = {"H200": 4800.0, "H100": 3350.0}  # by card name; a stage row's hbm_frac uses it


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


def _timed(fn, iters: int, warmup: int, cuda: bool) -> tuple[float, float]:
    """(mean ms per call of ``iters`` back-to-back calls, host ms per call), max over ranks (same
    count everywhere, so no rank waits in a collective the others never issue).

    Host ms is the wall time of issuing the calls (no synchronization inside the loop): when it
    is close to the first number the method is host bound (Python / launch overhead), when it is
    far below, the GPU work or the link is the limit."""
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    dist.barrier()
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        host = time.perf_counter() - t0
        end.record()
        torch.cuda.synchronize()
        ms = start.elapsed_time(end) / iters
    else:
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        host = time.perf_counter() - t0
        ms = host * 1e3 / iters
    t = torch.tensor([ms, host * 1e3 / iters], device="cuda" if cuda else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t[0].item()), float(t[1].item())


def _same_everywhere(y: torch.Tensor) -> bool:
    y = y.reshape(-1)
    s = y.float().double().sum().float()
    w = (y.float() * torch.linspace(0.5, 1.5, y.numel(), device=y.device)).double().sum().float()
    t = torch.stack([s, w, -s, -w]).to(y.device)
    hi = t.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return bool(torch.equal(hi.nan_to_num(1e30), t.nan_to_num(1e30)))  # max == mine for +v and -v


def _measure(size: int, world: int, methods: dict, min_bytes: dict, quick: bool, dev, card: str, g,
             rounds: int = 1) -> list[dict]:
    """Time and check every method at one size; ``methods`` maps name -> (bits, gather_bits) | None;
    ``rounds`` interleaved timing rounds (median reported)."""
    from catkit.dist import flash_all_reduce
    from catkit.utils.testing import rel_rms

    cuda = dev.type == "cuda"
    numel = size // 2
    # rotate buffers so large messages are not served from L2 (50 MB on H100/H200)
    nbuf = max(2, min(8, math.ceil((128 << 20) / size)))
    xs = [torch.randn(numel, generator=g, device=dev).to(torch.bfloat16) for _ in range(nbuf)]
    exact = xs[0].float()
    dist.all_reduce(exact)
    iters = 3 if not cuda else 10 if quick else (20 if size >= 64 << 20 else 50)
    warmup = 1 if not cuda else 5
    fns, checks = {}, {}
    for method, spec in methods.items():
        it = iter(range(1 << 30))
        if spec is None:
            scratch = [x.clone() for x in xs]
            y = xs[0].clone()
            dist.all_reduce(y)
            # in place on scratch copies: values grow each call, speed does not depend on them
            fns[method] = lambda it=it, scratch=scratch: dist.all_reduce(scratch[next(it) % nbuf])  # noqa: E731
        else:
            kw = dict(bits=spec[0], gather_bits=spec[1], group_size=GROUP_SIZE, min_bytes=min_bytes.get(method, 0))
            y = flash_all_reduce(xs[0], **kw)
            scratch = [x.clone() for x in xs]
            # in place like the NCCL call (no output allocation), on the same kind of scratch copies
            fns[method] = lambda kw=kw, it=it, scratch=scratch: flash_all_reduce(  # noqa: E731
                scratch[next(it) % nbuf], inplace=True, **kw)
        checks[method] = (_same_everywhere(y), rel_rms(y.float(), exact))
    # Interleaved rounds: every round times each method once, in turn, so drift of the machine
    # (clocks, the peer's timing, NCCL's own jitter, up to 2x at one size between two passes in
    # one run) falls on all methods alike; each method reports its median round.
    per_round = {m: [] for m in fns}
    for _ in range(rounds if cuda else 1):
        for method, fn in fns.items():
            per_round[method].append(_timed(fn, iters, warmup, cuda))
    times = {m: sorted(r)[len(r) // 2] for m, r in per_round.items()}
    nccl_ms = times["nccl_bf16"][0]
    rows = []
    for method, spec in methods.items():
        (ms, host_ms), (same, err) = times[method], checks[method]
        base = method.removesuffix("_auto")
        wire = _wire_bytes(numel, world, base)
        if spec is not None and size < min_bytes.get(method, 0):
            wire = _wire_bytes(numel, world, "nccl_bf16")  # the fallback sends bf16
        row = {
            "size": _fmt_bytes(size), "bytes": size, "method": method, "world": world, "card": card,
            "ms": ms, "host_ms": host_ms, "nccl_ms": nccl_ms, "rounds_ms": [r[0] for r in per_round[method]],
            "busbw_GBps": 2.0 * (world - 1) / world * size / (ms * 1e-3) / 1e9,
            "wire_MB": wire / 2**20,
            "ideal_ms": nccl_ms * wire / _wire_bytes(numel, world, "nccl_bf16"),
            "rel_err": err,
            "correct": bool(math.isfinite(err) and same and err <= TOLERANCE[base]),
        }
        if spec is not None:
            row["speedup_vs_nccl"] = nccl_ms / ms
            row["ideal_speedup"] = nccl_ms / row["ideal_ms"]
        rows.append(row)
    return rows


def _free(cuda: bool) -> None:
    from catkit.dist import clear_plan_cache

    clear_plan_cache()  # the plans' persistent buffers of the last size
    if cuda:
        torch.cuda.empty_cache()


def _stage_sizes(sizes: list[int]) -> list[int]:
    """Where the per-stage breakdown is measured: the smallest size (latency) and 64 / 256 MB (bandwidth)."""
    return sorted({sizes[0], *(s for s in sizes if s in (64 << 20, 256 << 20))})


def _stage_rows(size: int, world: int, dev, card: str, g, ok: dict, quick: bool) -> list[dict]:
    """Each of the five steps of every compressed method timed alone, with its bytes.

    Kernels: HBM bytes read + written (``hbm_GBps``, ``hbm_frac`` of the card's peak: a kernel
    near 0.8 is bandwidth bound, far below it is latency or launch bound). Collectives: wire
    bytes per rank (``busbw_GBps``). The sum of the stage times next to the full call's time
    shows how much is lost between steps; ``host_ms`` shows launch cost per step."""
    from catkit.dist import clear_plan_cache, flash_all_reduce
    from catkit.dist.flash_all_reduce import get_plan
    from catkit.utils.testing import rel_rms

    cuda = dev.type == "cuda"
    numel = size // 2
    x = torch.randn(numel, generator=g, device=dev).to(torch.bfloat16)
    peak = next((v for k, v in HBM_PEAK_GBPS.items() if k in card), None)
    # CPU (smoke test): Triton interprets every launch, so as few calls as still exercise the code
    iters, warmup = (20, 3) if cuda and not quick else (10, 3) if cuda else (2, 1)
    rows = []
    for method, spec in METHODS.items():
        if spec is None:
            continue
        plan = get_plan(x, None, spec[0], spec[1], GROUP_SIZE, False, torch.float32)
        W, rb1, rb2, elt = world, plan.l1.row_bytes, plan.l2.row_bytes, x.element_size()
        moved = {  # (bytes, kind): HBM read + write for kernels, bytes sent per rank for collectives
            "quantize": (numel * elt + W * rb1, "hbm"),
            "all_to_all": ((W - 1) * rb1, "wire"),
            "reduce_requantize": (W * rb1 + rb2, "hbm"),
            "all_gather": ((W - 1) * rb2, "wire"),
            "dequantize": (W * rb2 + numel * elt, "hbm"),
        }
        total = 0.0
        for stage, fn in plan.stages(x).items():
            ms, host_ms = _timed(fn, iters, warmup, cuda)
            total += ms
            nbytes, kind = moved[stage]
            gbps = nbytes / (ms * 1e-3) / 1e9
            row = {"size": _fmt_bytes(size), "bytes": size, "method": f"{method}:{stage}", "world": world,
                   "card": card, "stage": stage, "ms": ms, "host_ms": host_ms, "moved_MB": nbytes / 2**20,
                   "correct": ok[method]}
            if kind == "hbm":
                row["hbm_GBps"] = gbps
                if peak:
                    row["hbm_frac"] = gbps / peak
            else:
                row["busbw_GBps"] = gbps
            rows.append(row)
        rows.append({"size": _fmt_bytes(size), "bytes": size, "method": f"{method}:sum_of_stages", "world": world,
                     "card": card, "stage": "sum", "ms": total, "full_call_ms": ok[method + "_ms"],
                     "correct": ok[method]})
        # the pipelined path: the same call cut into K slices (K = 1 is the plain plan); the
        # fastest K per size is what catkit.dist.flash_all_reduce.PIPELINE_CHUNKS should say
        ref = flash_all_reduce(x, bits=spec[0], gather_bits=spec[1], group_size=GROUP_SIZE, min_bytes=0, chunks=1)
        for k in CHUNK_SWEEP if cuda else CHUNK_SWEEP[:2]:
            kw = dict(bits=spec[0], gather_bits=spec[1], group_size=GROUP_SIZE, min_bytes=0, chunks=k)
            # slicing keeps every group, so the result is the same up to how the compiler contracts
            # a differently specialized kernel (FMA ties): 1e-3 is far below one int8 step
            same = rel_rms(flash_all_reduce(x, **kw).float(), ref.float()) < 1e-3
            buf = x.clone()
            ms, host_ms = _timed(lambda kw=kw: flash_all_reduce(buf, inplace=True, **kw), iters, warmup, cuda)
            rows.append({"size": _fmt_bytes(size), "bytes": size, "method": f"{method}:chunks={k}", "world": world,
                         "card": card, "stage": f"chunks={k}", "ms": ms, "host_ms": host_ms,
                         "nccl_ms": ok["nccl_bf16_ms"], "correct": bool(ok[method] and same)})
            clear_plan_cache()
    return rows


def _rank_job(rank: int, world: int, sizes: list[int], quick: bool, device: str,
              parts: tuple = ("comm",)) -> list[dict]:
    """``parts``: "comm" (all-reduce rows) and / or "tp" (TP=W prefill rows, see ``_tp_rows``).

    comm pass 1: every method with the fallback off. Pass 2: the same with each method's measured
    threshold (``*_auto``: what a user gets), to show no size is slower than NCCL after it.
    Then the per-stage breakdown at a few sizes. Times are max-reduced over ranks, so every rank
    derives the same thresholds."""
    cuda = device == "cuda"
    dev = torch.device("cuda", rank) if cuda else torch.device("cpu")
    card = torch.cuda.get_device_name(dev) if cuda else "CPU"
    g = torch.Generator(device=dev).manual_seed(1234 + rank)
    rows = []
    if "comm" in parts:
        rows += _comm_rows(world, sizes, quick, dev, card, g)
    if "tp" in parts:
        rows += _tp_rows(rank, world, quick, dev, card)
    return rows  # identical on every rank: times are max-reduced, errors computed from identical y


def _comm_rows(world: int, sizes: list[int], quick: bool, dev, card: str, g) -> list[dict]:
    cuda = dev.type == "cuda"
    rows = []
    for size in sizes:
        rows += _measure(size, world, METHODS, {}, quick, dev, card, g)
        _free(cuda)
    thresholds = {f"{r['method'].removeprefix('fallback_')}_auto": r["fallback_bytes_measured"]
                  for r in _fallback_rows(rows)}
    auto = {"nccl_bf16": None, **{m: METHODS[m.removesuffix("_auto")] for m in thresholds}}
    for size in sizes:
        for r in _measure(size, world, auto, thresholds, quick, dev, card, g, rounds=1 if quick else AUTO_ROUNDS):
            if r["method"] != "nccl_bf16":
                r["fallback_bytes"] = thresholds[r["method"]]
                rows.append(r)
        _free(cuda)
    for size in _stage_sizes(sizes):
        mine = {r["method"]: r for r in rows if r["bytes"] == size and r["method"] in METHODS}
        ok = {m: r["correct"] for m, r in mine.items()}
        ok.update({m + "_ms": r["ms"] for m, r in mine.items()})
        rows += _stage_rows(size, world, dev, card, g, ok, quick)
        _free(cuda)
    return rows


# TP=W prefill: a ~1B-parameter-shaped dense model (22 layers of d_model 2048, 16 query / 8 KV
# heads of 128, SwiGLU 5632; byte vocabulary), random weights, one 8K-token prompt of built-in
# corpus text, bf16. Each layer all-reduces [1, 8192, 2048] bf16 = 32 MB twice.
TP_CONFIG = dict(d_model=2048, n_heads=16, n_kv_heads=8, head_dim=128, pattern="A" * 22, ffn_hidden=5632,
                 max_seq_len=8192, init_std=0.02)
TP_PROMPT = 8192
TP_CPU = (dict(d_model=64, n_heads=4, n_kv_heads=2, pattern="AA", ffn_hidden=128, max_seq_len=128), 96)
# relative RMS change of the logits allowed vs the exact TP run (exact: vs the unsharded model)
TP_TOLERANCE = {"tp_exact": 0.1, "tp_flash_int8": 0.1, "tp_flash_int6": 0.5, "tp_flash_int4": 0.6}


def _prompt_ids(n: int, dev) -> torch.Tensor:
    """``n + 1`` byte ids of built-in corpus text (validation split), repeated if it is short."""
    from pathlib import Path

    from catkit.data.corpus import load_corpus

    try:
        text = b"\n".join(load_corpus("val", max_bytes=max(4 * n, 1 << 16)))
    except ValueError:  # an install without the stdlib's .py sources: this file is text too
        text = Path(__file__).read_bytes()
    while len(text) < n + 1:
        text = text + text
    return torch.tensor(list(text[: n + 1]), dtype=torch.long, device=dev)[None]


def _tp_rows(rank: int, world: int, quick: bool, dev, card: str) -> list[dict]:
    """Time-to-first-token of a TP=W prefill with exact vs compressed all-reduce, and what the
    compression does to the logits (relative RMS and top-1 agreement vs the exact TP logits)
    and to the perplexity of the prompt text. The exact TP logits are checked against the
    unsharded model's on this GPU."""
    import torch.nn.functional as F

    from catkit.dist import CommConfig, tensor_parallel_model
    from catkit.dist.tp_model import set_comm
    from catkit.models.config import ModelConfig
    from catkit.models.model import CatModel
    from catkit.utils.testing import rel_rms

    cuda = dev.type == "cuda"
    opts, T = (TP_CONFIG, TP_PROMPT) if cuda else TP_CPU
    dtype = torch.bfloat16 if cuda else torch.float32
    cfg = ModelConfig(**opts)
    torch.manual_seed(0)
    with torch.device(dev):
        full = CatModel(cfg).to(dtype).eval()
    for p in full.parameters():  # one set of weights on every rank, whatever each RNG did
        dist.broadcast(p.data, 0)
    ids = _prompt_ids(T, dev)
    inp, tgt = ids[:, :T], ids[:, 1:]
    with torch.no_grad():
        ref_full = full(inp).logits.float()
    tp = tensor_parallel_model(full, comm=CommConfig("exact")).eval()
    n_params = full.num_params()
    del full
    _free(cuda)
    # compression forced on (min_bytes=0) over the faster transport where it exists: symmetric
    # memory on CUDA (2..8 ranks), else NCCL / gloo
    transport = "symm" if cuda and world <= 8 and _symm_ok() else "nccl"
    methods = {"tp_exact": CommConfig("exact"),
               **{f"tp_{m}": CommConfig("flash", bits=spec[0], gather_bits=spec[1], group_size=GROUP_SIZE, min_bytes=0,
                                        transport=transport)
                  for m, spec in METHODS.items() if spec is not None}}
    iters, warmup = (3, 1) if quick or not cuda else (5, 2)
    rows, ref = [], None
    for name, comm in methods.items():
        set_comm(tp, comm)
        with torch.no_grad():
            logits = tp(inp).logits.float()
            ms, host_ms = _timed(lambda: tp(inp), iters, warmup, cuda)
        same = _same_everywhere(logits)
        if ref is None:
            ref, ref_ms = logits, ms
        base = ref_full if name == "tp_exact" else ref
        err = rel_rms(logits, base)
        ppl = math.exp(float(F.cross_entropy(logits.flatten(0, 1), tgt.flatten())))
        row = {"size": f"T={T}", "bytes": T * cfg.d_model * 2, "method": name, "world": world, "card": card,
               "ttft_ms": ms, "host_ms": host_ms, "params_M": n_params / 1e6,
               "allreduces": 2 * cfg.n_layers, "allreduce_MB": T * cfg.d_model * 2 / 2**20,
               "logit_rel_rms": err, "top1_agree": float((logits.argmax(-1) == base.argmax(-1)).float().mean()),
               "ppl": ppl, "correct": bool(math.isfinite(err) and same and err <= TP_TOLERANCE[name])}
        if name != "tp_exact":
            row["transport"] = transport
            row["ppl_exact"] = rows[0]["ppl"]
            row["speedup_vs_exact"] = ref_ms / ms
        rows.append(row)
    del tp
    _free(cuda)
    return rows


def _symm_ok() -> bool:
    from catkit.dist.symm_all_reduce import symm_available

    return symm_available() is None


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


def _finish(rows: list[dict], report: bool = True) -> list[dict]:
    """Add ``bw_ideal_ms``: the row's wire bytes at the best link rate any NCCL row reached in this
    run (the physical bytes limit), then the fallback summary rows, and print the thresholds to
    paste into ``FALLBACK_BYTES``."""
    nccl = [r for r in rows if r["method"] == "nccl_bf16"]
    best = max((r["wire_MB"] / r["ms"] for r in nccl), default=0.0)
    for r in rows:
        if best > 0 and "wire_MB" in r:
            r["bw_ideal_ms"] = r["wire_MB"] / best
    if not nccl:  # TP rows only
        return rows
    fb = _fallback_rows(rows)
    if report:
        per = ", ".join(f"{r['method'].removeprefix('fallback_')}: {r['fallback_bytes_measured']}" for r in fb)
        world = nccl[0]["world"]
        print(f"[comm] measured fallback bytes ({per}); set FALLBACK_BYTES[(\"nccl\", {world})] = "
              f"{fb[0]['recommended_fallback_bytes']} in catkit/dist/flash_all_reduce.py (or per "
              f"reduce-scatter width: FALLBACK_BYTES[(\"nccl\", {world}, bits)])", flush=True)
    return rows + fb


def run_comm(quick: bool = False, device: str = "cuda", world: int | None = None,
             sizes: list[int] | None = None, parts: tuple = ("comm",)) -> list[dict]:
    """Spawn one rank per GPU (or ``world`` gloo ranks on CPU) and return the rows.

    ``sizes``: message sizes in bf16 bytes (default: 64 KB .. 256 MB, or two tiny ones on CPU).
    ``parts``: ``("comm",)`` all-reduce rows, ``("tp",)`` TP prefill rows, or both (one spawn).
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
            rows = _rank_job(rank, env_world, sizes, quick, device, parts)
            dist.barrier()  # no rank tears its connections down while a peer still uses them
        finally:
            if created:
                dist.destroy_process_group()
        return _finish(rows, report=rank == 0)
    if device == "cuda":
        world = world or torch.cuda.device_count()
        if world < 2:
            raise RuntimeError(f"comm benchmark needs >= 2 GPUs, {torch.cuda.device_count()} visible")
        backend = "nccl"
    else:
        world, backend = world or 2, "gloo"
    results = run_local(_rank_job, world, sizes, quick, device, parts, backend=backend, timeout_s=560)
    return _finish(results[0])


def comm_suite(quick: bool) -> list[dict]:
    return run_comm(quick, device="cuda")


def comm_tp_suite(quick: bool) -> list[dict]:
    return run_comm(quick, device="cuda", parts=("tp",))


# Guarded: ``python -m catkit.bench.comm`` runs this file as __main__ and the harness may import
# it again as catkit.bench.comm; one registration is enough.
if "comm" not in SUITES:
    register("comm", "Flash Communication all-reduce (int8/int6/int4) vs NCCL bf16, 64 KB-256 MB, all GPUs",
             needs_gpu=True)(comm_suite)
if "comm_tp" not in SUITES:
    register("comm_tp", "TP=#GPUs prefill of a ~1B dense CatModel (8K tokens, bf16): time-to-first-token and "
             "logit / perplexity change, exact vs Flash Communication all-reduce", needs_gpu=True)(comm_tp_suite)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--out", default=None, help="directory for the JSON record (GPU runs)")
    a = p.parse_args(argv)
    if a.device == "cpu":
        print(format_table(run_comm(a.quick, device="cpu", parts=("comm", "tp"))))
    else:
        # two records, so a failure in the TP part cannot lose the all-reduce rows
        run_suite("comm", quick=a.quick, out_dir=a.out)
        run_suite("comm_tp", quick=a.quick, out_dir=a.out)


if __name__ == "__main__":
    main()
