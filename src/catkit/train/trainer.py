"""Single-device and ``torchrun`` data-parallel training of a ``CatModel`` on the built-in corpus.

Determinism: the global batch of step ``s`` is drawn with a generator seeded from (seed, s), and
each rank takes its slice of it, so a resumed run sees exactly the batches it would have seen and
N ranks see exactly the global batch one process would.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from catkit import env
from catkit.models import CatModel, ModelConfig
from catkit.train import checkpoint as ckpt
from catkit.train.config import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``lr`` then cosine decay to ``lr * min_lr_ratio`` at ``cfg.steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; no weight decay on norms, biases and other 1-D parameters."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), foreach=False)


@dataclass
class TrainResult:
    run_dir: str
    steps: int
    first_val_loss: float | None
    final_val_loss: float | None
    seconds: float
    history: list[dict] = field(default_factory=list)


class Trainer:
    """Owns the model, optimizer, data and run directory of one training run."""

    def __init__(self, model_cfg: ModelConfig, cfg: TrainConfig, run_dir: str, *, train_data=None, val_data=None,
                 progress: bool = True):
        self.model_cfg, self.cfg, self.run_dir = model_cfg, cfg, run_dir
        self.rank, local_rank, self.world = env.distributed_rank()
        self.device = self._pick_device(local_rank)
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        if cfg.batch_size % (self.world * cfg.grad_accum):
            raise ValueError(f"batch_size: {cfg.batch_size} is not divisible by world_size*grad_accum="
                             f"{self.world * cfg.grad_accum}")
        if cfg.seq_len > model_cfg.max_seq_len:
            raise ValueError(f"seq_len: {cfg.seq_len} exceeds the model's max_seq_len={model_cfg.max_seq_len}")
        torch.manual_seed(cfg.seed)
        self.model = CatModel(model_cfg).to(self.device)
        self.ddp = (torch.nn.parallel.DistributedDataParallel(self.model, device_ids=[local_rank] if self.device.type == "cuda" else None)
                    if self.world > 1 else None)
        self.optimizer = make_optimizer(self.model, cfg)
        self.train_data, self.val_data = train_data, val_data
        if self.train_data is None:
            self.train_data, self.val_data = load_builtin_data(cfg)
        self.progress = progress and self.rank == 0
        self.step = 0
        self.ckpt_root = os.path.join(run_dir, "checkpoints")
        self.autocast = self._autocast_dtype()

    def _pick_device(self, local_rank: int) -> torch.device:
        want = self.cfg.device
        if want == "auto":
            want = "cuda" if torch.cuda.is_available() else "cpu"
        if want == "cuda":
            if not torch.cuda.is_available():
                raise ValueError("device: 'cuda' requested but no CUDA device is visible")
            torch.cuda.set_device(local_rank)
            return torch.device("cuda", local_rank)
        return torch.device(want)

    def _autocast_dtype(self):
        p = self.cfg.precision
        if p == "bf16" or (p == "auto" and self.device.type == "cuda"):
            return torch.bfloat16
        return None

    def _ctx(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    # -- checkpoints -------------------------------------------------------------------------
    def resume(self) -> bool:
        """Load the newest checkpoint under the run directory if there is one."""
        path = ckpt.latest_checkpoint(self.ckpt_root)
        if path is None:
            return False
        state = ckpt.load_checkpoint(path, self.model, self.optimizer)
        if state.get("model_config") != self.model_cfg.to_dict():
            raise ckpt.CheckpointError(f"checkpoint: {path} was written for a different model config")
        self.step = int(state["step"])
        return True

    def save(self) -> None:
        if self.rank == 0:
            ckpt.save_checkpoint(self.ckpt_root, self.step, self.model, self.optimizer,
                                 {"model_config": self.model_cfg.to_dict(), "train_config": self.cfg.to_dict()},
                                 keep=self.cfg.keep_checkpoints)
        if self.world > 1:
            dist.barrier()

    # -- steps --------------------------------------------------------------------------------
    def global_batch(self, step: int):
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)
        return self.train_data.sample(self.cfg.batch_size, g)

    def accumulate_gradients(self) -> torch.Tensor:
        """Forward and backward over this rank's share of the step's global batch.

        Leaves the (DDP-averaged) gradients in ``.grad``; returns the LM loss averaged over ranks.
        """
        cfg, model = self.cfg, self.ddp or self.model
        inputs, targets = self.global_batch(self.step)
        per_rank = cfg.batch_size // self.world
        sl = slice(self.rank * per_rank, (self.rank + 1) * per_rank)
        inputs, targets = inputs[sl].to(self.device), targets[sl].to(self.device)
        self.model.train()
        total = torch.zeros((), device=self.device)
        micro = per_rank // cfg.grad_accum
        for i in range(cfg.grad_accum):
            sync = i == cfg.grad_accum - 1 or self.ddp is None
            with (contextlib.nullcontext() if sync else self.ddp.no_sync()), self._ctx():
                loss, parts = self._loss(model, inputs[i * micro:(i + 1) * micro], targets[i * micro:(i + 1) * micro])
            (loss / cfg.grad_accum).backward()
            total += parts["lm_loss"].float() / cfg.grad_accum
        if self.world > 1:
            dist.all_reduce(total)
            total /= self.world
        return total

    def train_step(self) -> dict:
        """One optimizer step on this step's global batch; returns metrics."""
        lr = lr_at(self.step, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss = self.accumulate_gradients()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {"step": self.step, "loss": float(loss), "lr": lr, "grad_norm": float(grad_norm)}

    def _loss(self, model, inputs, targets):
        # the forward goes through ``model`` (the DDP wrapper when there is one) so DDP can hook
        # its gradient all-reduce
        return self.model.loss_from_output(model(inputs), targets)

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        losses = []
        for inputs, targets in self.val_data.iter_eval(self.cfg.batch_size // self.world or 1, self.cfg.eval_batches):
            with self._ctx():
                _, parts = self.model.loss(inputs.to(self.device), targets.to(self.device))
            losses.append(float(parts["lm_loss"]))
        return sum(losses) / len(losses)

    def fit(self, *, resume: bool = False) -> TrainResult:
        """Train to ``cfg.steps``; evaluate, log (``metrics.jsonl``) and checkpoint on schedule.

        Ctrl-C stops between steps without touching the last complete checkpoint.
        """
        cfg = self.cfg
        os.makedirs(self.run_dir, exist_ok=True)
        if resume:
            self.resume()
        metrics_path = os.path.join(self.run_dir, "metrics.jsonl")
        history: list[dict] = []
        t0 = time.perf_counter()
        first_val = self.evaluate() if self.step == 0 else None
        if first_val is not None:
            history.append({"step": 0, "val_loss": first_val})
        tokens_per_step = cfg.batch_size * cfg.seq_len
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not self.progress, desc="train", unit="step")
        last_val = first_val
        try:
            while self.step < cfg.steps:
                ts = time.perf_counter()
                m = self.train_step()
                m["tokens_per_s"] = tokens_per_step / (time.perf_counter() - ts)
                if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                    m["val_loss"] = last_val = self.evaluate()
                if self.step % cfg.log_every == 0 or "val_loss" in m:
                    history.append(m)
                    if self.rank == 0:
                        with open(metrics_path, "a") as f:
                            f.write(json.dumps(m) + "\n")
                if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps:
                    self.save()
                bar.update(1)
                bar.set_postfix(loss=f"{m['loss']:.3f}", **({"val": f"{last_val:.3f}"} if last_val else {}))
        finally:
            bar.close()
        return TrainResult(self.run_dir, self.step, first_val, last_val, time.perf_counter() - t0, history)


def load_builtin_data(cfg: TrainConfig):
    """Train/val ``PackedDataset``s over the standard-library corpus."""
    from catkit.data import PackedDataset, load_corpus

    train_docs = load_corpus("train", max_bytes=cfg.corpus_max_bytes)
    val_cap = None if cfg.corpus_max_bytes is None else max(cfg.corpus_max_bytes // 10, 200_000)
    val_docs = load_corpus("val", max_bytes=val_cap)
    return PackedDataset(train_docs, cfg.seq_len), PackedDataset(val_docs, cfg.seq_len)
