"""LoZA: turn a trained dense-attention model into a dense/streaming hybrid.

1. ``calibrate(model, data, steps)``: every attention layer gets a gate ``alpha = sigmoid(logit)``
   and computes ``alpha * dense + (1 - alpha) * streaming`` with its own weights; the model is
   frozen and only the gates train on the LM loss (optionally with an L1 push toward streaming,
   as DuoAttention does for its gates). Layers that need long-range attention keep a high alpha.
2. ``convert(model, fraction=0.5)``: the lowest-alpha layers (or the ``layers`` given) switch to
   streaming attention (sink + block-aligned window, ``catkit.layers.attention``); their decode
   caches then hold only sink + window tokens.
3. Ordinary training recovers the quality (the model's own trainer; nothing LoZA-specific).

Works on ``CatModel`` (its ``Attention`` layers) and on Hugging Face Llama / Qwen3 models, whose
attention modules are patched by ``catkit.models.hf.patch`` (done here automatically).

Example::

    alphas = calibrate(model, train_data, steps=200)
    streaming_layers = convert(model, fraction=0.5, alphas=alphas)
    # ... continue training `model` as usual
"""

from __future__ import annotations

import itertools
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from catkit.layers.attention import Attention


def _is_hf_model(model: nn.Module) -> bool:
    return any(c.__module__.startswith("transformers.") for c in type(model).__mro__)


def loza_layers(model: nn.Module) -> list[nn.Module]:
    """The attention modules LoZA can gate and switch, in depth order.

    ``Attention`` layers of a catkit model, or the attention modules of a Hugging Face model
    (patched on first use). Each has ``mode``, ``streaming``, ``loza_gate`` and ``use_kernels``.
    """
    if _is_hf_model(model):
        from catkit.models.hf import patch, patched_modules

        return patched_modules(model) or patch(model)
    return [m for m in model.modules() if isinstance(m, Attention)]


def set_use_kernels(model: nn.Module, flag: bool) -> None:
    """Let (True) or stop (False) every LoZA layer from using the Triton kernels.

    False forces the plain-PyTorch paths, e.g. to train on CPU tensors while TRITON_INTERPRET=1
    is set for kernel tests (the interpreter is far too slow for training).
    """
    for m in loza_layers(model):
        m.use_kernels = flag


def _batches(data, batch_size: int, generator: torch.Generator | None) -> Callable[[int], object]:
    if callable(data) and not hasattr(data, "sample"):
        return data
    if hasattr(data, "sample"):
        return lambda step: data.sample(batch_size, generator)
    if isinstance(data, Iterable):
        it = itertools.cycle(data)
        return lambda step: next(it)
    raise ValueError(f"data: expected a callable step -> (inputs, targets), an object with .sample(batch_size, "
                     f"generator) or an iterable of batches, got {type(data).__name__}")


def _split(batch):
    """(inputs, targets) from a batch: a pair, or a token tensor [B, T + 1] (targets = shift)."""
    if isinstance(batch, torch.Tensor):
        return batch[:, :-1], batch[:, 1:]
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise ValueError(f"data: a batch must be (inputs, targets) or a [B, T + 1] token tensor, got {type(batch).__name__}")


def lm_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``model(inputs).logits`` against ``targets`` (-100 ignored).

    ``targets[:, t]`` is the token after ``inputs[:, t]`` (catkit's convention, already shifted).
    """
    logits = model(inputs).logits
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)


def calibrate(model: nn.Module, data, steps: int, *, lr: float = 0.05, l1: float = 0.0, init_logit: float = 0.0,
              batch_size: int = 8, generator: torch.Generator | None = None, amp_dtype: torch.dtype | None = None,
              loss_fn: Callable | None = None, log: list | None = None, progress: bool = True) -> list[float]:
    """Learn one dense-vs-streaming gate per attention layer with the model frozen; return the alphas.

    Args:
        model: a ``CatModel`` or a Hugging Face Llama / Qwen3 causal LM (trained, dense).
        data: a callable ``step -> (inputs, targets)``, an object with ``.sample(batch_size,
            generator)`` (e.g. ``PackedDataset``), or an iterable of ``(inputs, targets)`` (cycled).
            Use long sequences: where every query's window covers its whole prefix, dense and
            streaming agree and the gate learns nothing.
        steps: optimizer steps on the gates.
        lr: step size on the gate logits. The update is Adam with ONE second moment shared by all
            gates (the mean squared gradient): per-gate Adam would move every gate that prefers
            dense at the same speed whatever its gain, losing the ranking LoZA needs; a shared
            scale keeps each gate's step proportional to its gradient.
        l1: weight of ``sum(alpha)`` added to the loss (pushes gates toward streaming).
        init_logit: starting logit (0: alpha = 0.5).
        amp_dtype: autocast dtype (e.g. ``torch.bfloat16`` on a GPU), None for none.
        loss_fn: ``(model, inputs, targets) -> loss`` (default: :func:`lm_loss`).
        log: if a list, one ``{"step", "loss", "alphas"}`` dict is appended per step.
    Returns:
        ``alphas`` (floats in [0, 1], one per layer in depth order); also stored as each layer's
        ``loza_alpha``. The model comes back unchanged: gates removed, modes, ``requires_grad``
        and train/eval state restored.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected an int >= 1, got {steps!r}")
    if l1 < 0:
        raise ValueError(f"l1: expected >= 0, got {l1}")
    layers = loza_layers(model)
    if not layers:
        raise ValueError("model: no attention layers that LoZA can gate")
    next_batch = _batches(data, batch_size, generator)
    loss_fn = loss_fn or lm_loss
    device = next(model.parameters()).device
    saved_grad = [(p, p.requires_grad) for p in model.parameters()]
    saved_modes = [m.mode for m in layers]
    was_training = model.training
    for p, _ in saved_grad:
        p.requires_grad_(False)
    gates = []
    for m in layers:
        m.loza_gate = nn.Parameter(torch.full((), float(init_logit), device=device))
        m.mode = "gated"
        gates.append(m.loza_gate)
    m1 = torch.zeros(len(gates), device=device)
    v2 = torch.zeros((), device=device)
    beta1, beta2, eps = 0.9, 0.99, 1e-12
    model.eval()  # frozen model: no dropout; gradients still reach the gates
    try:
        bar = tqdm(range(steps), disable=not progress, desc="loza calibrate", unit="step")
        for step in bar:
            inputs, targets = _split(next_batch(step))
            inputs, targets = inputs.to(device), targets.to(device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = loss_fn(model, inputs, targets)
            alpha = torch.sigmoid(torch.stack(gates))
            total = loss.float() + l1 * alpha.sum()
            grad = torch.autograd.grad(total, gates)
            with torch.no_grad():
                g = torch.stack(grad).float()
                m1.mul_(beta1).add_(g, alpha=1 - beta1)
                v2.mul_(beta2).add_(g.pow(2).mean(), alpha=1 - beta2)
                m_hat, v_hat = m1 / (1 - beta1 ** (step + 1)), v2 / (1 - beta2 ** (step + 1))
                for gate, upd in zip(gates, lr * m_hat / (v_hat.sqrt() + eps)):
                    gate.sub_(upd)
            if log is not None:
                log.append({"step": step + 1, "loss": float(loss.detach()), "alphas": torch.sigmoid(torch.stack(gates).detach()).tolist()})
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
    finally:
        alphas = [float(torch.sigmoid(g.detach())) for g in gates]
        for m, mode, a in zip(layers, saved_modes, alphas):
            del m.loza_gate
            m.loza_gate = None
            m.mode = mode
            m.loza_alpha = a
        for p, flag in saved_grad:
            p.requires_grad_(flag)
        model.train(was_training)
    return alphas


def convert(model: nn.Module, fraction: float = 0.5, alphas: list[float] | None = None,
            layers: list[int] | None = None) -> list[int]:
    """Switch attention layers to streaming; return the indices (depth order) now streaming.

    Args:
        model: a ``CatModel`` or a Hugging Face Llama / Qwen3 model.
        fraction: share of the attention layers to make streaming, ``round(fraction * n)`` of them,
            the lowest alphas first (ties: shallower first).
        alphas: one per layer (default: the ``loza_alpha`` left by :func:`calibrate`).
        layers: explicit layer indices instead (then ``fraction`` and ``alphas`` are ignored).
    Every other LoZA layer is set to dense, so the result does not depend on earlier conversions.
    A ``CatModel``'s ``cfg.pattern`` is updated to match (``S`` streaming, ``A`` dense).
    """
    atts = loza_layers(model)
    n = len(atts)
    if n == 0:
        raise ValueError("model: no attention layers that LoZA can switch")
    if layers is not None:
        chosen = list(layers)
        if any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n for i in chosen) or \
                len(set(chosen)) != len(chosen):
            raise ValueError(f"layers: expected distinct ints in [0, {n}), got {layers!r}")
    else:
        if not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
            raise ValueError(f"fraction: expected a number in [0, 1], got {fraction!r}")
        if alphas is None:
            alphas = [getattr(m, "loza_alpha", None) for m in atts]
            if any(a is None for a in alphas):
                raise ValueError("alphas: none given and the model has not been calibrated; run calibrate() "
                                 "or pass layers=")
        alphas = [float(a) for a in alphas]
        if len(alphas) != n:
            raise ValueError(f"alphas: expected {n} values (one per attention layer), got {len(alphas)}")
        order = sorted(range(n), key=lambda i: (alphas[i], i))
        chosen = order[:round(fraction * n)]
    chosen = sorted(chosen)
    for i, m in enumerate(atts):
        m.mode = "streaming" if i in chosen else "dense"
    _sync_pattern(model, atts)
    return chosen


def _sync_pattern(model: nn.Module, atts: list[nn.Module]) -> None:
    cfg, blocks = getattr(model, "cfg", None), getattr(model, "blocks", None)
    if cfg is None or blocks is None or not hasattr(cfg, "pattern"):
        return
    letters = list(cfg.pattern)
    for bi, block in enumerate(blocks):
        mixer = getattr(block, "mixer", None)
        if any(mixer is m for m in atts):
            letters[bi] = "S" if mixer.mode == "streaming" else "A"
    model.cfg = cfg.replace(pattern="".join(letters))


def streaming_layer_indices(model: nn.Module) -> list[int]:
    """Indices (depth order) of the LoZA layers currently in streaming mode."""
    return [i for i, m in enumerate(loza_layers(model)) if m.mode == "streaming"]


def kv_cache_bytes(model: nn.Module, batch_size: int, seq_len: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of the decode caches a ``CatModel`` allocates for ``batch_size`` x ``seq_len`` tokens.

    Dense layers hold every token, streaming layers sink + window (measured on the meta device,
    nothing is allocated).
    """
    caches = model.new_caches(batch_size, seq_len, device=torch.device("meta"), dtype=dtype)
    return int(sum(c.nbytes for c in caches if hasattr(c, "nbytes")))


__all__ = ["calibrate", "convert", "loza_layers", "set_use_kernels", "lm_loss", "streaming_layer_indices",
           "kv_cache_bytes"]
