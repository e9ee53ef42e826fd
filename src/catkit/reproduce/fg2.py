"""``catkit reproduce fg2``: multi-query associative recall (MQAR) for FG2-GDN against its relatives.

The paper claims FG2-GDN(+) recall better than GDN and KDA. We train small pure models of each
mixer (pattern "GG", "KK", "FF", "PP") and softmax attention ("AA", the upper reference) on MQAR
(``catkit.data.synthetic.mqar``) at (nearly) equal parameter count — the SwiGLU width of each
model is adjusted so all land on the largest one's count — and equal steps, 3 seeds each. One
training run sees a mixture of sequence lengths and key-value counts (one setting per step, the
same tokens per step), chosen so that the linear models' state (H x K x V per layer) is stressed;
every model is then scored on every setting. Metric: per-query accuracy (fraction of queried
keys whose value is predicted), the Zoology convention; exact-row accuracy is also recorded.

Full run: one GPU, bf16 autocast, Triton kernels, 2000 steps per run, the 15 runs trained
concurrently in separate processes: 441 s on an H200. Processes time-slice the GPU (no MPS), so
this mostly hides the host time of the cheap attention runs; the delta-rule runs are bound by
their many small kernels and gain little over one process (about 70 steps/s in all either way).
``quick``: a CPU-sized version of the same pipeline (smaller models and lengths, the PyTorch
fallback of the delta layers on CPU), a couple of minutes on 2 cores; numbers there say little.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from catkit.data.synthetic import IGNORE, mqar
from catkit.models import CatModel
from catkit.models.config import ModelConfig
from catkit.reproduce.registry import register

MODELS = (("attention", "A"), ("GDN", "G"), ("KDA", "K"), ("FG2-GDN", "F"), ("FG2-GDN+", "P"))


@dataclass
class StudyConfig:
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 2
    vocab_size: int = 259  # MQAR keys 1..129, values 130..258 (needs >= 2 * max N + 1)
    # Training mixes short and long settings: a mixture dominated by hard ones (N up to 128) kept
    # every model in the MQAR plateau for 1700 steps on an H200 (all near chance, attention 12%);
    # this one lets the recall circuit form within the budget, and the eval adds harder settings.
    train_settings: list = field(default_factory=lambda: [
        (64, 4), (64, 8), (128, 8), (128, 16), (256, 16), (256, 32), (512, 32), (512, 64)])
    eval_settings: list | None = field(default_factory=lambda: [
        (64, 8), (128, 16), (256, 32), (256, 64), (512, 32), (512, 64), (512, 128)])  # None = train_settings
    tokens_per_step: int = 16384  # batch = tokens_per_step // T
    steps: int = 2000
    time_budget_s: float | None = None  # if set: a training wall budget for all runs that caps `steps` (equal for all)
    workers: int = 0  # processes training runs concurrently; 0 = one per run (up to the CPU count) on CUDA, 1 on CPU
    min_steps: int = 200
    lr: float = 3e-3  # 1e-2 was worse in a CPU trial; a bigger batch mattered more (MQAR scores few tokens)
    warmup: int = 100
    weight_decay: float = 0.1
    eval_examples: int = 512
    eval_batch: int = 128
    seeds: tuple = (0, 1, 2)
    models: tuple = MODELS
    impl: str = "auto"  # delta-layer implementation (see catkit.layers.delta_net)
    device: str | None = None  # None = CUDA if available
    bf16: bool = True  # autocast on CUDA
    progress: bool = True

    def settings_eval(self):
        return list(self.eval_settings or self.train_settings)


def full_config() -> StudyConfig:
    return StudyConfig()


def quick_config() -> StudyConfig:
    on_cuda = torch.cuda.is_available()
    return StudyConfig(d_model=64, n_heads=2, train_settings=[(64, 4), (64, 8), (128, 8), (128, 16)], eval_settings=None,
                       tokens_per_step=1024, steps=120, time_budget_s=None, min_steps=1, lr=3e-3,
                       warmup=10, eval_examples=128, eval_batch=64,
                       impl="auto" if on_cuda else "torch")  # interpreted Triton would take hours


# ------------------------------------------------------------------------------------- models
def _model_config(sc: StudyConfig, letter: str, ffn_hidden: int | None) -> ModelConfig:
    max_t = max(t for t, _ in sc.train_settings + sc.settings_eval())
    return ModelConfig(vocab_size=sc.vocab_size, d_model=sc.d_model, pattern=letter * sc.n_layers,
                       n_heads=sc.n_heads, ffn_hidden=ffn_hidden, max_seq_len=max_t,
                       mixer_options={"delta": {"impl": sc.impl}})


def _n_params(cfg: ModelConfig) -> int:
    with torch.device("meta"):
        return CatModel(cfg).num_params()


def matched_configs(sc: StudyConfig) -> dict[str, ModelConfig]:
    """One config per model, SwiGLU widths set so every model has about the largest one's count."""
    base = {name: _model_config(sc, letter, None) for name, letter in sc.models}
    counts = {name: _n_params(c) for name, c in base.items()}
    target = max(counts.values())
    per_unit = 3 * sc.d_model * sc.n_layers  # parameters per unit of SwiGLU hidden width
    out = {}
    for name, letter in sc.models:
        ffn = base[name].ffn_dim + round((target - counts[name]) / per_unit)
        out[name] = _model_config(sc, letter, ffn)
    return out


# ---------------------------------------------------------------------------------- training
def _batch(sc, setting, batch_size, gen, device):
    T, N = setting
    x, y = mqar(batch_size, num_kv_pairs=N, seq_len=T, vocab_size=sc.vocab_size, generator=gen)
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def _lr(sc: StudyConfig, step: int, steps: int) -> float:
    if step < sc.warmup:
        return sc.lr * (step + 1) / sc.warmup
    p = (step - sc.warmup) / max(1, steps - sc.warmup)
    return sc.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


class _Run:
    """Model + optimizer + data stream of one (model, seed) run."""

    def __init__(self, sc: StudyConfig, cfg: ModelConfig, seed: int, device):
        torch.manual_seed(seed)
        self.sc, self.device = sc, device
        self.model = CatModel(cfg).to(device)
        decay = [p for p in self.model.parameters() if p.ndim >= 2]
        other = [p for p in self.model.parameters() if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": sc.weight_decay}, {"params": other, "weight_decay": 0.0}]
        self.opt = torch.optim.AdamW(groups, lr=sc.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
        self.gen = torch.Generator().manual_seed(1000 + seed)
        self.autocast = device.type == "cuda" and sc.bf16

    def step(self, setting, lr: float) -> torch.Tensor:
        T, _ = setting
        x, y = _batch(self.sc, setting, max(1, self.sc.tokens_per_step // T), self.gen, self.device)
        for group in self.opt.param_groups:
            group["lr"] = lr
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            loss, _ = self.model.loss(x, y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        return loss.detach()

    @torch.no_grad()
    def evaluate(self, setting) -> dict:
        T, N = setting
        gen = torch.Generator().manual_seed(12345 + 7 * T + N)  # same eval data for every model
        hit = tot = rows_ok = rows = 0
        self.model.eval()
        left = self.sc.eval_examples
        while left > 0:
            b = min(left, self.sc.eval_batch)
            x, y = _batch(self.sc, setting, b, gen, self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                pred = self.model(x).logits.argmax(-1)
            scored = y != IGNORE
            correct = (pred == y) & scored
            hit += int(correct.sum())
            tot += int(scored.sum())
            rows_ok += int((correct | ~scored).all(1).sum())
            rows += b
            left -= b
        self.model.train()
        return {"acc": hit / tot, "row_acc": rows_ok / rows}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def calibrate(sc: StudyConfig, cfgs: dict, device) -> dict[str, float]:
    """Seconds per step of each model, averaged over the training lengths (after warm-up/compile)."""
    per_model = {}
    for name, cfg in cfgs.items():
        run = _Run(sc, cfg, 0, device)
        times = []
        for setting in {t: (t, n) for t, n in sc.train_settings}.values():
            for _ in range(2):  # compile / autotune for this length
                run.step(setting, 0.0)
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(3):
                run.step(setting, 0.0)
            _sync(device)
            times.append((time.perf_counter() - t0) / 3)
        per_model[name] = sum(times) / len(times)
        del run
    return per_model


# ------------------------------------------------------------------------------------ report
def _plot(results: dict, sc: StudyConfig, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({t for t, _ in sc.settings_eval()})
    fig, axes = plt.subplots(1, len(lengths), figsize=(4.2 * len(lengths), 3.6), dpi=120, squeeze=False)
    for ax, T in zip(axes[0], lengths):
        ns = sorted(n for t, n in sc.settings_eval() if t == T)
        for name, _ in sc.models:
            accs = [results[name][f"T{T}_N{n}"]["acc"] for n in ns]
            mean = [100 * sum(a) / len(a) for a in accs]
            lo = [m - 100 * min(a) for m, a in zip(mean, accs)]
            hi = [100 * max(a) - m for m, a in zip(mean, accs)]
            ax.errorbar(ns, mean, yerr=[lo, hi], marker="o", capsize=3, label=name,
                        ls="--" if name == "attention" else "-")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_ylim(-2, 102)
        ax.set_title(f"MQAR, sequence length {T}")
        ax.set_xlabel("key-value pairs")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("per-query accuracy (%)")
    fig.suptitle("mean over seeds, bars: min-max", fontsize=8, x=0.99, ha="right")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _report(summary: dict, sc: StudyConfig, path: str) -> None:
    keys = [f"T{t}_N{n}" for t, n in sc.settings_eval()]
    res = summary["results"]
    lines = [
        "# FG2-GDN reproduction: multi-query associative recall (MQAR)",
        "",
        f"Device: {summary['device']}; mode: {'quick (CPU-sized)' if summary['quick'] else 'full'}; "
        f"{summary['steps']} steps per run (equal for all models), {sc.tokens_per_step} tokens per step, "
        f"lr {sc.lr} (warm-up {sc.warmup}, cosine), seeds {list(sc.seeds)}; delta-layer implementation "
        f"`{sc.impl}`; bf16 autocast: {summary['bf16']}.",
        f"Models: {sc.n_layers} layers, d_model {sc.d_model}, {sc.n_heads} heads (head dim "
        f"{sc.d_model // sc.n_heads}), SwiGLU width adjusted to equalise parameters. Training mixes the "
        f"settings {[tuple(s) for s in sc.train_settings]} (one per step); every model is scored on each "
        f"with {sc.eval_examples} fresh examples (the same ones for every model).",
        "",
        "Per-query accuracy (%), mean ± std over seeds:",
        "",
        "| model | params | ffn | " + " | ".join(k.replace("_", " ") for k in keys) + " | mean | s/step |",
        "| --- | --- | --- | " + " | ".join("---" for _ in keys) + " | --- | --- |",
    ]
    for name, _ in sc.models:
        cells = []
        for k in keys:
            a = torch.tensor(res[name][k]["acc"], dtype=torch.float64) * 100
            cells.append(f"{a.mean():.1f} ± {a.std(unbiased=False):.1f}")
        lines.append(f"| {name} | {summary['params'][name]:,} | {summary['ffn'][name]} | " + " | ".join(cells)
                     + f" | {100 * summary['mean_acc'][name]:.1f} | {summary['sec_per_step'][name]:.4f} |")
    lines += ["", "Exact-row accuracy (%, every query of a row right), mean over seeds:", "",
              "| model | " + " | ".join(k.replace("_", " ") for k in keys) + " |",
              "| --- | " + " | ".join("---" for _ in keys) + " |"]
    for name, _ in sc.models:
        lines.append(f"| {name} | " + " | ".join(
            f"{100 * sum(res[name][k]['row_acc']) / len(res[name][k]['row_acc']):.1f}" for k in keys) + " |")
    lines += ["", "Final training loss per seed: " + "; ".join(
        f"{name} {', '.join(f'{v:.3f}' for v in summary['final_loss'][name])}" for name, _ in sc.models),
        "", f"![MQAR accuracy]({os.path.basename(summary['plot'])})", "",
        f"Wall time: {summary['seconds']:.0f} s. {summary['note']}", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


# ---------------------------------------------------------------------------------- the study
def _train_one(sc: StudyConfig, cfg: ModelConfig, seed: int, steps: int, device: str) -> dict:
    """Train one (model, seed) run for ``steps`` and score it on every eval setting."""
    device = torch.device(device)
    run = _Run(sc, cfg, seed, device)
    order = torch.Generator().manual_seed(seed)
    pick = torch.randint(0, len(sc.train_settings), (steps,), generator=order).tolist()
    _sync(device)
    t0 = time.perf_counter()
    losses = []
    for step in range(steps):
        loss = run.step(tuple(sc.train_settings[pick[step]]), _lr(sc, step, steps))
        if step % 50 == 0 or step == steps - 1:
            losses.append(loss)
    _sync(device)
    train_sec = time.perf_counter() - t0
    return {"train_sec": train_sec, "final_loss": float(torch.stack(losses[-3:]).float().mean()),
            "eval": {f"T{t}_N{n}": run.evaluate((t, n)) for t, n in sc.settings_eval()}}


def _run_all(sc, cfgs, runs, steps, device, workers, tqdm):
    """Yield ``(name, seed, result)`` per run: in this process, or ``workers`` spawned processes."""
    bar = (tqdm(total=len(runs), desc="fg2 mqar runs", unit="run", disable=not sc.progress) if tqdm else None)
    if workers <= 1:
        jobs = ((name, seed, _train_one(sc, cfgs[name], seed, steps, str(device))) for name, seed in runs)
        for job in jobs:
            if bar is not None:
                bar.set_postfix(model=job[0], seed=job[1])
                bar.update(1)
            yield job
    else:
        import concurrent.futures as cf
        import multiprocessing as mp

        with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            futs = {pool.submit(_train_one, sc, cfgs[name], seed, steps, str(device)): (name, seed)
                    for name, seed in runs}
            for fut in cf.as_completed(futs):
                if bar is not None:
                    bar.set_postfix(model=futs[fut][0], seed=futs[fut][1])
                    bar.update(1)
                yield (*futs[fut], fut.result())
    if bar is not None:
        bar.close()


def run_study(sc: StudyConfig, out_dir: str, *, quick: bool = False) -> dict:
    """Train every model with every seed, score every setting, write report.md and the PNG.

    ``catkit.reproduce.registry.run_reproduction`` writes the returned summary to results.json.
    """
    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress bars are a nicety
        tqdm = None
    os.makedirs(out_dir, exist_ok=True)
    t_start = time.perf_counter()
    device = torch.device(sc.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    for setting in sc.train_settings + sc.settings_eval():  # refuse a bad setting before any training
        mqar(1, num_kv_pairs=setting[1], seq_len=setting[0], vocab_size=sc.vocab_size)
    cfgs = matched_configs(sc)
    params = {name: _n_params(c) for name, c in cfgs.items()}
    steps, note = sc.steps, "No step cap applied."
    sec_step = {name: float("nan") for name in cfgs}
    if sc.time_budget_s:
        sec_step = calibrate(sc, cfgs, device)
        per_step_all = len(sc.seeds) * sum(sec_step.values())
        if per_step_all * steps > sc.time_budget_s:
            steps = max(sc.min_steps, int(sc.time_budget_s / per_step_all))
            note = (f"Steps capped from {sc.steps} to {steps} by the {sc.time_budget_s:.0f} s training budget "
                    f"(measured step times after warm-up).")
    results = {name: {f"T{t}_N{n}": {"acc": [], "row_acc": []} for t, n in sc.settings_eval()} for name in cfgs}
    final_loss = {name: [] for name in cfgs}
    train_sec = {name: 0.0 for name in cfgs}
    runs = [(name, seed) for seed in sc.seeds for name in cfgs]
    workers = sc.workers or (min(len(runs), os.cpu_count() or 1) if device.type == "cuda" else 1)
    for name, seed, out in _run_all(sc, cfgs, runs, steps, device, workers, tqdm):
        train_sec[name] += out["train_sec"]
        final_loss[name].append(out["final_loss"])
        for key, r in out["eval"].items():
            results[name][key]["acc"].append(r["acc"])
            results[name][key]["row_acc"].append(r["row_acc"])
    if workers > 1:
        note += (f" The {len(runs)} runs trained concurrently in {workers} processes on the one GPU (tiny "
                 "models leave it mostly idle), so s/step is wall time per step while sharing it.")
    if not sc.time_budget_s:
        sec_step = {name: train_sec[name] / (len(sc.seeds) * max(1, steps)) for name in cfgs}
    mean_acc = {name: sum(sum(v["acc"]) / len(v["acc"]) for v in results[name].values()) / len(results[name])
                for name in cfgs}
    plot = _plot(results, sc, os.path.join(out_dir, "mqar_accuracy.png"))
    summary = {
        "quick": quick,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "bf16": device.type == "cuda" and sc.bf16,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(sc).items()},
        "steps": steps,
        "params": params,
        "ffn": {name: c.ffn_dim for name, c in cfgs.items()},
        "sec_per_step": sec_step,
        "train_seconds": train_sec,
        "final_loss": final_loss,
        "results": results,
        "mean_acc": mean_acc,
        "plot": plot,
        "note": note,
    }
    summary["seconds"] = time.perf_counter() - t_start
    _report(summary, sc, os.path.join(out_dir, "report.md"))
    return summary


@register("fg2", "MQAR recall: attention vs GDN, KDA, FG2-GDN, FG2-GDN+ at equal params and steps, 3 seeds")
def reproduce_fg2(out_dir: str, quick: bool) -> dict:
    return run_study(quick_config() if quick else full_config(), out_dir, quick=quick)
