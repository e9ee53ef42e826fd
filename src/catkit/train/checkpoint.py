"""Atomic checkpoints: safetensors weights and optimizer state, plus a JSON config.

Layout under ``<run>/checkpoints/``: ``step_000100/{model,optimizer}.safetensors``,
``step_000100/state.json`` and a ``latest`` file naming the newest complete checkpoint. A
checkpoint is written into ``<name>.tmp`` and renamed only when complete, and ``latest`` is
replaced atomically after that, so an interrupted save (Ctrl-C, crash, full disk) leaves the
previous checkpoint and ``latest`` intact.
"""

from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt."""


def _write_json(path: str, obj) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict, list]:
    sd = opt.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            t = val if isinstance(val, torch.Tensor) else torch.tensor(val)
            tensors[f"state.{idx}.{key}"] = t.detach().contiguous().cpu()
    return tensors, sd["param_groups"]


def save_checkpoint(ckpt_root: str, step: int, model: torch.nn.Module, optimizer, state: dict, keep: int = 2) -> str:
    """Write a complete checkpoint for ``step``; return its directory. ``state`` must be JSON-able."""
    os.makedirs(ckpt_root, exist_ok=True)
    name = f"step_{step:06d}"
    final, tmp = os.path.join(ckpt_root, name), os.path.join(ckpt_root, name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(weights, os.path.join(tmp, "model.safetensors"))
    opt_tensors, groups = _optimizer_tensors(optimizer)
    save_file(opt_tensors, os.path.join(tmp, "optimizer.safetensors"))
    _write_json(os.path.join(tmp, "state.json"), {**state, "step": step, "param_groups": groups})
    if os.path.exists(final):  # re-saving the same step: the old copy goes only once the new one is complete
        shutil.rmtree(final)
    os.replace(tmp, final)
    with open(os.path.join(ckpt_root, "latest.tmp"), "w") as f:
        f.write(name)
    os.replace(os.path.join(ckpt_root, "latest.tmp"), os.path.join(ckpt_root, "latest"))
    _prune(ckpt_root, keep)
    return final


def _prune(ckpt_root: str, keep: int) -> None:
    done = sorted(d for d in os.listdir(ckpt_root) if d.startswith("step_") and not d.endswith(".tmp"))
    for d in done[:-keep]:
        shutil.rmtree(os.path.join(ckpt_root, d), ignore_errors=True)


def latest_checkpoint(ckpt_root: str) -> str | None:
    """Directory of the newest complete checkpoint under ``ckpt_root``, or None if there is none."""
    pointer = os.path.join(ckpt_root, "latest")
    if not os.path.exists(pointer):
        return None
    with open(pointer) as f:
        path = os.path.join(ckpt_root, f.read().strip())
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint: {pointer} names {path}, which does not exist")
    return path


def read_state(path: str) -> dict:
    """The JSON part of a checkpoint (configs, step, ...)."""
    file = os.path.join(path, "state.json")
    try:
        with open(file) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint: {file} is missing; {path} is not a complete checkpoint") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint: {file} is corrupt ({e})") from None


def load_weights(path: str, model: torch.nn.Module) -> None:
    file = os.path.join(path, "model.safetensors")
    if not os.path.exists(file):
        raise CheckpointError(f"checkpoint: {file} is missing")
    try:
        weights = load_file(file)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint: {file} is corrupt ({e})") from None
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint: {file} does not match the model ({e})") from None


def load_checkpoint(path: str, model: torch.nn.Module, optimizer=None) -> dict:
    """Load weights (and optimizer state if given) from ``path``; return the JSON state."""
    state = read_state(path)
    load_weights(path, model)
    if optimizer is not None:
        file = os.path.join(path, "optimizer.safetensors")
        try:
            tensors = load_file(file)
        except (SafetensorError, OSError, ValueError, FileNotFoundError) as e:
            raise CheckpointError(f"checkpoint: {file} is missing or corrupt ({e})") from None
        opt_state: dict = {}
        for key, val in tensors.items():
            _, idx, name = key.split(".", 2)
            opt_state.setdefault(int(idx), {})[name] = val
        optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    return state
