"""``catkit demo``: train a small model on the built-in corpus, plot, report, and sample from it."""

from __future__ import annotations

import os
import shutil
import time

import torch

from catkit.train.config import preset
from catkit.train.trainer import Trainer
from catkit.utils.plots import loss_curve_png

DEMO_PROMPT = "def "


def run_demo(out_dir: str, *, preset_name: str | None = None, steps: int | None = None, progress: bool = True) -> dict:
    """Train ``tiny`` (CPU) or ``small`` (GPU) from scratch in ``out_dir`` (replaced), then report."""
    from catkit.data import ByteTokenizer

    name = preset_name or ("small" if torch.cuda.is_available() else "tiny")
    model_cfg, train_cfg = preset(name)
    if steps is not None:
        train_cfg.steps = steps
        train_cfg.eval_every = train_cfg.ckpt_every = max(1, steps // 3)
        train_cfg.warmup_steps = min(train_cfg.warmup_steps, max(1, steps // 10))
    if os.path.isdir(os.path.join(out_dir, "checkpoints")) or os.path.exists(os.path.join(out_dir, "metrics.jsonl")):
        shutil.rmtree(out_dir)  # the demo's own previous output; a demo always starts fresh
    t0 = time.perf_counter()
    trainer = Trainer(model_cfg, train_cfg, out_dir, progress=progress)
    result = trainer.fit()
    train_s = time.perf_counter() - t0

    tok = ByteTokenizer()
    prompt = torch.tensor([tok.encode(DEMO_PROMPT)], device=trainer.device)
    g = torch.Generator(device=trainer.device).manual_seed(0)
    n_new = min(200, model_cfg.max_seq_len - prompt.shape[1])
    out = trainer.model.generate(prompt, n_new, temperature=0.8, top_k=40, generator=g)
    sample = tok.decode(out[0].tolist())

    png = loss_curve_png(result.history, os.path.join(out_dir, "loss.png"), title=f"catkit demo ({name})")
    tps = [h["tokens_per_s"] for h in result.history if "tokens_per_s" in h]
    device = torch.cuda.get_device_name() if trainer.device.type == "cuda" else "CPU"
    summary = {
        "preset": name, "device": device, "params": trainer.model.num_params(), "steps": result.steps,
        "first_val_loss": result.first_val_loss, "final_val_loss": result.final_val_loss,
        "train_seconds": round(train_s, 1), "median_tokens_per_s": sorted(tps)[len(tps) // 2] if tps else None,
        "sample": sample, "plot": png,
    }
    _write_report(os.path.join(out_dir, "report.md"), summary, model_cfg, train_cfg)
    return summary


def _write_report(path: str, s: dict, model_cfg, train_cfg) -> None:
    lines = [
        f"# catkit demo: preset `{s['preset']}` on {s['device']}",
        "",
        f"- parameters: {s['params']:,}; layer pattern `{model_cfg.pattern}`, d_model {model_cfg.d_model}",
        f"- {s['steps']} steps of {train_cfg.batch_size} x {train_cfg.seq_len} bytes in {s['train_seconds']} s "
        f"(median {s['median_tokens_per_s']:.0f} tokens/s)",
        f"- validation loss: {s['first_val_loss']:.3f} at start -> {s['final_val_loss']:.3f} at the end (nats/byte)",
        "",
        "![loss curve](loss.png)",
        "",
        f"## Sample (prompt `{DEMO_PROMPT}`, temperature 0.8, top-k 40)",
        "",
        "```",
        s["sample"],
        "```",
        "",
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines))
