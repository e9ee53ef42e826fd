"""Benchmark suite ``serve``: plain vs speculative (dense verify) vs sparse-verify decoding.

One process: train a target (about 700M parameters: d 2048, 16 layers, 16 query / 4 KV heads of
128) and a draft (d 256, 4 layers) on the built-in corpus for a fixed wall-clock budget (bf16
autocast, context 2048), then decode greedily from held-out corpus text at contexts 1K, 8K and
32K (RoPE beyond the training context: a speed measurement; acceptance there is what these
models do out of their trained range), batch 1 and 8, ``new_tokens`` each.

Modes (all greedy, static shapes, CUDA graphs via ``catkit.serve.fast_decode.StepGraph``):
- ``eager_plain``: the model's own eager forward with its ``KVCache`` (SDPA), one token per step: the plain
  path, for scale (its first ``eager_tokens`` tokens).
- ``plain``: one target step per token (graph).
- ``spec_dense``: chain drafting of ``gamma`` tokens + one dense target verify (lossless).
- ``spec_dense_g<N>``: the same with ``gamma = N`` for each N in ``extra_gammas`` (acceptance at
  gamma 4 was 3.94 of 4 at 1K on an H200, so longer drafts may pay; the draft step is cheap).
- ``spec_sparse``: same with the sparse verifier (prefix blocks chosen by the first draft
  position's query at calibrated anchor layers; sink + last block kept; dense below L0).
- ``spec_sparse_a4``: the same, selecting only at every 4th layer (less selection work).
Prefix attention of every graph mode runs ``paged_decode_attention`` (split-KV Triton kernel;
dense, or only the selected blocks); prefill runs SDPA (flash).

``correct``: plain == the eager loop, spec_dense == plain, and for sparse the keep-everything
setting (every block selected) == plain, each up to bf16 near-ties (a row may differ only from a
position where the reference's top-2 logit gap < ``TIE_TOL``; first divergences and gaps are
reported). Quality of sparse verify: token agreement with dense-verify output, mean acceptance
length, teacher-forced NLL of the verifier on held-out continuation (verify-shaped chunks) next to
the dense target's. ``floor_tok_s``: the HBM bound (weights + KV bytes read per step over the
card's bandwidth).
"""

from __future__ import annotations

import math
import time
from dataclasses import replace

import torch

from catkit.bench.registry import register, time_cuda

TIE_TOL = 0.5  # logits; bf16 rounding of ~20-magnitude logits is ~0.1, summation order adds more

FULL = dict(
    target=dict(d_model=2048, pattern="A" * 16, n_heads=16, n_kv_heads=4, max_seq_len=40960),
    draft=dict(d_model=256, pattern="A" * 4, n_heads=4, n_kv_heads=2, max_seq_len=40960),
    train_seq=2048, train_batch=8, train_seconds=120.0, lr_target=6e-4, lr_draft=2e-3,
    contexts=(1024, 8192, 32768), batches=(1, 8), new_tokens=128, gamma=4, extra_gammas=(6, 8), eager_tokens=32,
    sparse=dict(block_size=128, dense_below=2048, rho=0.1), page=128, deadline=430.0,
)
QUICK = dict(
    target=dict(d_model=64, pattern="AA", n_heads=4, n_kv_heads=2, max_seq_len=1024),
    draft=dict(d_model=32, pattern="A", n_heads=2, n_kv_heads=1, max_seq_len=1024),
    train_seq=64, train_batch=4, train_seconds=3.0, lr_target=3e-3, lr_draft=3e-3,
    contexts=(100, 200), batches=(1, 2), new_tokens=8, gamma=3, extra_gammas=(4,), eager_tokens=6,
    sparse=dict(block_size=64, dense_below=64, rho=0.25), page=64, deadline=1e9,
)


def _bandwidth(name: str) -> float:
    return 4.8e12 if "H200" in name else 3.35e12


def _streams(device, quick):
    from catkit.data import load_corpus

    eos = 257
    out = []
    for split, cap in (("train", 300_000 if quick else None), ("val", 100_000 if quick else None)):
        docs = load_corpus(split, max_bytes=cap)
        joined = bytearray()
        for d in docs:
            joined += d + bytes([0])
        t = torch.frombuffer(joined, dtype=torch.uint8).to(torch.int64)
        t[t == 0] = eos  # NUL never occurs in source text: it marks the document ends
        out.append(t.to(device))
    return out


def _train(models, lrs, stream, seq, batch, seconds, log):
    """Train ``models`` side by side on the same random windows for ``seconds`` of wall clock."""
    dev = stream.device
    opts = [torch.optim.AdamW(m.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1,
                              fused=dev.type == "cuda") for m, lr in zip(models, lrs)]
    ar = torch.arange(seq + 1, device=dev)
    t0 = time.perf_counter()
    step = 0
    losses = [float("nan")] * len(models)
    while True:
        frac = (time.perf_counter() - t0) / seconds
        if frac >= 1:
            break
        idx = torch.randint(0, stream.numel() - seq - 2, (batch, 1), device=dev) + ar
        w = stream[idx]
        x, y = w[:, :-1], w[:, 1:]
        scale = min(1.0, (step + 1) / 50) * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))
        for i, (m, opt, lr) in enumerate(zip(models, opts, lrs)):
            for g in opt.param_groups:
                g["lr"] = lr * scale
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                loss, _ = m.loss(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step % 100 == 0:
                losses[i] = loss.item()
        if step % 100 == 0:
            log(f"train step {step} t={time.perf_counter() - t0:.0f}s losses {[round(v, 3) for v in losses]}")
        step += 1
    return step, time.perf_counter() - t0


@torch.no_grad()
def _val_loss(model, stream, seq, n=8):
    g = torch.Generator(device="cpu").manual_seed(0)
    idx = torch.randint(0, stream.numel() - seq - 2, (n, 1), generator=g).to(stream.device)
    w = stream[idx + torch.arange(seq + 1, device=stream.device)]
    with torch.autocast(stream.device.type, dtype=torch.bfloat16, enabled=stream.is_cuda):
        return float(model.loss(w[:, :-1], w[:, 1:])[1]["lm_loss"])


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, dev):
    _sync(dev)
    t0 = time.perf_counter()
    out = fn()
    _sync(dev)
    return out, time.perf_counter() - t0


def _kv_bytes(cfg, ctx):
    return cfg.n_layers * ctx * cfg.kv_heads * cfg.dim_head * 2 * 2  # K and V, bf16


@torch.no_grad()
def run(quick: bool = False, device=None, log=print, **overrides) -> list[dict]:
    from catkit.bench.registry import device_name
    from catkit.models import CatModel, ModelConfig
    from catkit.serve import fast_decode as fd
    from catkit.serve.sparse_verify import SparseVerifyConfig, calibrate_anchor_layers

    P = {**(QUICK if quick else FULL), **overrides}
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    t_start = time.perf_counter()
    torch.manual_seed(0)
    train, val = _streams(dev, quick)
    log(f"corpus: train {train.numel()} val {val.numel()} tokens")
    target = CatModel(ModelConfig(**P["target"])).to(dev)
    draft = CatModel(ModelConfig(**P["draft"])).to(dev)
    fd.check_fast_model(target, "target")
    fd.check_fast_model(draft, "draft")
    n_t, n_d = target.num_params(), draft.num_params()
    log(f"target {n_t / 1e6:.1f}M params, draft {n_d / 1e6:.2f}M params")
    with torch.enable_grad():
        steps, secs = _train([target, draft], [P["lr_target"], P["lr_draft"]], train, P["train_seq"],
                             P["train_batch"], P["train_seconds"], log)
    target.eval()
    draft.eval()
    vl_t, vl_d = _val_loss(target, val, P["train_seq"]), _val_loss(draft, val, P["train_seq"])
    log(f"trained {steps} steps in {secs:.0f}s ({steps * P['train_seq'] * P['train_batch'] / secs:.0f} tok/s); "
        f"val loss target {vl_t:.3f} draft {vl_d:.3f} nats/byte")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    target.to(dtype)
    draft.to(dtype)
    w_t = sum(p.numel() * p.element_size() for p in target.parameters())
    w_d = sum(p.numel() * p.element_size() for p in draft.parameters())
    card = device_name()
    bw = _bandwidth(card)
    gamma, n_new = P["gamma"], P["new_tokens"]
    t_len = gamma + 1
    n_chunks = n_new // t_len
    # anchors: where the Jaccard overlap of block selections between layers drops (paper's rule)
    cal_len = min(max(P["contexts"]), 8192 if not quick else 200)
    sv = SparseVerifyConfig(block_size=P["sparse"]["block_size"], dense_below=P["sparse"]["dense_below"],
                            rho=P["sparse"]["rho"])
    anchors = calibrate_anchor_layers(target, val[None, :cal_len], sv, n_verify=t_len)
    spec = fd.SparseSpec(**P["sparse"], anchor_layers=anchors)
    log(f"anchor layers {anchors}")
    common = {"card": card, "target_params_M": round(n_t / 1e6, 1), "draft_params_M": round(n_d / 1e6, 2),
              "gamma": gamma, "train_steps": steps, "val_loss_target": round(vl_t, 4), "val_loss_draft": round(vl_d, 4)}
    rows = []
    for ctx in P["contexts"]:
        for b in P["batches"]:
            if time.perf_counter() - t_start > P["deadline"]:
                log(f"skip ctx {ctx} batch {b}: past the time budget")
                continue
            rows += _one(target, draft, val, ctx, b, P, spec, dev, common, w_t, w_d, bw, n_chunks, log)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    fails = fd.compiled_fns().failed if dev.type == "cuda" else {}
    if fails:  # those pieces ran eagerly inside the graphs: say so in every row
        for r in rows:
            r["compile_failed"] = fails
    return rows


def _one(target, draft, val, ctx, b, P, spec, dev, common, w_t, w_d, bw, n_chunks, log):
    from catkit.serve import fast_decode as fd

    gamma, n_new, page = P["gamma"], P["new_tokens"], P["page"]
    t_len = gamma + 1
    span = ctx + n_chunks * t_len + 1
    starts = [(i * 7919 * 13) % max(1, val.numel() - span) for i in range(b)]
    full = torch.stack([val[s : s + span] for s in starts])
    prompt = full[:, :ctx]
    first = prompt[:, -1:]
    max_len = ctx + n_new + 2 * max((gamma, *P["extra_gammas"])) + 8
    base_t = fd.StaticKV(target, b, max_len, page=page)
    base_d = fd.StaticKV(draft, b, max_len, page=page)
    (_, pre_s) = _timed(lambda: fd.prefill(target, prompt, base_t), dev)
    fd.prefill(draft, prompt, base_d)
    base_t.init_sums(replace(spec, anchor_layers=None), target.cfg.n_layers, ctx - 1)  # sums at every layer
    work_t = fd.StaticKV(target, b, max_len, page=page)
    work_d = fd.StaticKV(draft, b, max_len, page=page)
    reset = lambda: (work_t.copy_from(base_t, ctx - 1), work_d.copy_from(base_d, ctx - 1))  # noqa: E731
    tag = f"ctx {ctx} batch {b}"
    log(f"{tag}: prefill {pre_s * 1e3:.0f} ms")
    cfg_t, cfg_d = target.cfg, draft.cfg
    kv_t, kv_d = _kv_bytes(cfg_t, ctx), _kv_bytes(cfg_d, ctx)
    step_floor = (w_t + b * kv_t) / bw  # one target step reads its weights and every row's KV
    impl = "cuda graph + torch.compile pieces" if dev.type == "cuda" else "eager (cpu)"
    base = {**common, "ctx": ctx, "batch": b, "new_tokens": n_new, "impl": impl}
    rows = []

    # ---- plain (graph) ----
    reset()
    comp = dev.type == "cuda"  # torch.compile'd pieces inside the graphs (CPU: eager, the same arithmetic)
    g1 = fd.StepGraph(target, work_t, 1, compile=comp)
    gaps = torch.zeros(b, n_new, device=dev)
    plain = fd.greedy_decode(g1, first, n_new, gaps)
    reset()
    _, plain_s = _timed(lambda: fd.greedy_decode(g1, first, n_new), dev)
    reset()
    step_ms = time_cuda(lambda: (work_t.pos.fill_(ctx - 1), g1(first)))
    plain_tps = b * n_new / plain_s

    # ---- eager plain (the model's own forward + KVCache, SDPA): checks the graph path ----
    ne = P["eager_tokens"]
    caches = target.new_caches(b, ctx + ne)
    target(prompt[:, :-1], caches=caches)

    def eager_loop():
        tok, out = first, []
        for _ in range(ne):
            tok = target(tok, caches=caches).logits[:, -1].argmax(-1, keepdim=True)
            out.append(tok)
        return torch.cat(out, 1)

    eager_tokens = eager_loop()  # warms up too
    for c in caches:
        c.length = ctx - 1
    _, e_s = _timed(eager_loop, dev)
    del caches
    ok_plain, info_plain = fd.first_divergence(eager_tokens, plain[:, :ne], gaps, TIE_TOL)
    eager_tps = b * ne / e_s
    rows.append({**base, "mode": "eager_plain", "tok_s": eager_tps, "check": "eager forward + KVCache loop (reference)",
                 "correct": True})
    rows.append({**base, "mode": "plain", "tok_s": plain_tps, "ms_per_step": step_ms, "prefill_ms": pre_s * 1e3,
                 "floor_tok_s": b / step_floor, "speedup_vs_eager": plain_tps / eager_tps,
                 "check": f"== eager loop up to near-ties: {info_plain}", "correct": bool(ok_plain)})
    log(f"{tag}: plain {plain_tps:.0f} tok/s ({step_ms:.3f} ms/step), eager {eager_tps:.0f} tok/s, ok={ok_plain}")
    del g1

    # ---- speculative: draft graphs + verify graphs ----
    reset()
    dsteps = {1: fd.StepGraph(draft, work_d, 1, compile=comp), 2: fd.StepGraph(draft, work_d, 2, compile=comp)}
    d_ms = time_cuda(lambda: (work_d.pos.fill_(ctx - 1), dsteps[1](first)))
    keep = spec.keep_blocks(ctx - 1)
    keep_all = -(-work_t.max_len // spec.block_size)
    # sparse_a4: the same selection computed only at every 4th layer (cheaper, coarser)
    spec4 = replace(spec, anchor_layers=tuple(range(0, cfg_t.n_layers, 4)))
    verifiers = {"dense": (None, None), "sparse": (spec, keep), "sparse_a4": (spec4, keep),
                 "keep_all": (spec, keep_all)}
    def time_speculative(ver, g):
        """(verify-pass ms, speculative result, seconds) of drafting ``g`` tokens per round."""
        reset()
        chunk = torch.cat([first, plain[:, :g]], 1)
        v_ms = time_cuda(lambda: (work_t.pos.fill_(ctx - 1), ver(chunk)))
        reset()
        fd.greedy_speculative(dsteps, ver, work_t, work_d, first, n_new, g)  # warm
        reset()
        res, sec = _timed(lambda: fd.greedy_speculative(dsteps, ver, work_t, work_d, first, n_new, g), dev)
        return v_ms, res, sec

    results = {}
    vms = {}
    for name, (sp, kp) in verifiers.items():
        reset()
        ver = fd.StepGraph(target, work_t, t_len, sparse=sp, keep=kp, compile=comp)
        vms[name], res, sec = time_speculative(ver, gamma)
        nll = None
        if name != "keep_all":
            reset()
            nll = fd.teacher_forced_nll(ver, full[:, ctx - 1 :], n_chunks)
        results[name] = (res, sec, nll)
        log(f"{tag}: spec[{name}] {b * n_new / sec:.0f} tok/s, accept len {res.mean_acceptance_length:.2f}, "
            f"verify {vms[name]:.3f} ms, nll {nll}")
        del ver
    ok_dense, info_dense = fd.first_divergence(plain, results["dense"][0].tokens, gaps, TIE_TOL)
    ok_all, info_all = fd.first_divergence(plain, results["keep_all"][0].tokens, gaps, TIE_TOL)
    res_d, sec_d, nll_d = results["dense"]
    frac = 1.0 if keep is None else min(1.0, keep * spec.block_size / (ctx - 1))
    for name, key, sp in (("spec_dense", "dense", None), ("spec_sparse", "sparse", spec),
                          ("spec_sparse_a4", "sparse_a4", spec4)):
        res, sec, nll = results[key]
        frac_kv = 1.0 if sp is None else frac
        tps = b * n_new / sec
        acc = res.mean_acceptance_length
        round_floor = gamma * (w_d + b * kv_d) / bw + (w_t + b * kv_t * frac_kv) / bw
        row = {**base, "mode": name, "tok_s": tps, "mean_accept_len": acc, "rounds": res.rounds,
               "verify_ms": vms[key], "draft_step_ms": d_ms,
               "kv_read_frac": frac_kv, "floor_tok_s": b * acc / round_floor,
               "speedup_vs_plain": tps / plain_tps, "nll_verifier": nll, "nll_dense_target": nll_d}
        if name == "spec_dense":
            row.update(check=f"== plain greedy up to near-ties: {info_dense}", correct=bool(ok_dense))
        else:
            _, info_agree = fd.first_divergence(res_d.tokens, res.tokens, torch.zeros_like(gaps), 0.0)
            row.update(token_agreement_vs_dense=info_agree["agreement"], first_div_vs_dense=info_agree["first_div"],
                       accept_len_ratio_vs_dense=acc / res_d.mean_acceptance_length,
                       speedup_vs_dense=tps / (b * n_new / sec_d),
                       speedup_verify_vs_dense=vms["dense"] / vms[key],
                       keep_blocks=keep, anchors=list(sp.anchor_layers),
                       check=f"keep-all sparse == plain up to near-ties: {info_all}", correct=bool(ok_all))
        rows.append(row)
    # ---- dense verify with longer drafts (lossless too: checked against plain) ----
    for g in P["extra_gammas"]:
        reset()
        ver = fd.StepGraph(target, work_t, g + 1, compile=comp)
        v_ms, res, sec = time_speculative(ver, g)
        ok, info = fd.first_divergence(plain, res.tokens, gaps, TIE_TOL)
        tps, acc = b * n_new / sec, res.mean_acceptance_length
        round_floor = g * (w_d + b * kv_d) / bw + (w_t + b * kv_t) / bw
        rows.append({**base, "mode": f"spec_dense_g{g}", "gamma": g, "tok_s": tps, "mean_accept_len": acc,
                     "rounds": res.rounds, "verify_ms": v_ms, "draft_step_ms": d_ms, "kv_read_frac": 1.0,
                     "floor_tok_s": b * acc / round_floor, "speedup_vs_plain": tps / plain_tps,
                     "check": f"== plain greedy up to near-ties: {info}", "correct": bool(ok)})
        log(f"{tag}: spec[dense, gamma {g}] {tps:.0f} tok/s, accept len {acc:.2f}, verify {v_ms:.3f} ms, ok={ok}")
        del ver
    del dsteps
    return rows


@register("serve", "plain vs speculative vs sparse-verify decoding of a freshly trained target/draft",
          needs_gpu=True)
def serve_suite(quick: bool) -> list[dict]:
    return run(quick=quick, log=lambda s: print(f"[serve] {s}", flush=True))
