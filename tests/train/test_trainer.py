import json
import os

import pytest
import torch

from catkit.train import TrainConfig, Trainer, lr_at
from catkit.train import checkpoint as ckpt


def make(small_setup, run_dir, **overrides):
    model_cfg, train_cfg, train, val = small_setup
    for k, v in overrides.items():
        setattr(train_cfg, k, v)
    return Trainer(model_cfg, train_cfg, str(run_dir), train_data=train, val_data=val, progress=False)


def test_loss_decreases_and_logs(small_setup, tmp_path):
    t = make(small_setup, tmp_path, steps=20, eval_every=20, ckpt_every=20, lr=1e-2)
    res = t.fit()
    assert res.final_val_loss < res.first_val_loss - 0.3
    lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert lines[-1]["step"] == 20 and "val_loss" in lines[-1]
    assert ckpt.latest_checkpoint(str(tmp_path / "checkpoints")).endswith("step_000020")


def test_resume_is_bit_identical(small_setup, tmp_path):
    a = make(small_setup, tmp_path / "a", steps=3)
    a.fit()  # checkpoint at step 3
    next_a = a.train_step()
    b = make(small_setup, tmp_path / "a", steps=3)
    assert b.resume() and b.step == 3
    next_b = b.train_step()
    assert next_a["loss"] == next_b["loss"]
    for (na, pa), (nb, pb) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.equal(pa, pb), na


def test_grad_accum_matches_full_batch(small_setup, tmp_path):
    model_cfg, *rest = small_setup
    dense = (model_cfg.replace(n_experts=0), *rest)  # MoE balance loss is per micro-batch (see test_ddp)
    a = make(dense, tmp_path / "a")
    b = make(dense, tmp_path / "b", grad_accum=4)
    ma, mb = a.train_step(), b.train_step()
    assert abs(ma["loss"] - mb["loss"]) < 1e-5
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6)


def test_interrupted_save_keeps_last_checkpoint(small_setup, tmp_path, monkeypatch):
    t = make(small_setup, tmp_path, steps=3)
    t.fit()
    good = ckpt.latest_checkpoint(str(tmp_path / "checkpoints"))
    before = open(os.path.join(good, "model.safetensors"), "rb").read()
    t.train_step()

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        t.save()
    assert ckpt.latest_checkpoint(str(tmp_path / "checkpoints")) == good
    assert open(os.path.join(good, "model.safetensors"), "rb").read() == before
    monkeypatch.undo()
    u = make(small_setup, tmp_path, steps=3)
    assert u.resume() and u.step == 3


def test_corrupt_or_missing_checkpoint(small_setup, tmp_path):
    t = make(small_setup, tmp_path, steps=3)
    t.fit()
    path = ckpt.latest_checkpoint(str(tmp_path / "checkpoints"))
    with open(os.path.join(path, "model.safetensors"), "r+b") as f:
        f.write(b"\xff" * 64)
    with pytest.raises(ckpt.CheckpointError, match="corrupt"):
        make(small_setup, tmp_path, steps=3).resume()
    os.remove(os.path.join(path, "state.json"))
    with pytest.raises(ckpt.CheckpointError, match="missing"):
        make(small_setup, tmp_path, steps=3).resume()
    assert make(small_setup, tmp_path / "empty").resume() is False


def test_resume_refuses_other_model(small_setup, tmp_path):
    make(small_setup, tmp_path, steps=3).fit()
    model_cfg, train_cfg, train, val = small_setup
    other = Trainer(model_cfg.replace(d_model=64), train_cfg, str(tmp_path), train_data=train, val_data=val, progress=False)
    with pytest.raises(ckpt.CheckpointError):
        other.resume()


def test_lr_schedule():
    cfg = TrainConfig(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(100, cfg) == pytest.approx(0.1)
    assert lr_at(55, cfg) == pytest.approx(0.55)


@pytest.mark.parametrize("kw, field", [({"steps": 0}, "steps"), ({"grad_accum": 3}, "grad_accum"),
                                       ({"precision": "fp8"}, "precision"), ({"lr": -1.0}, "lr")])
def test_bad_train_config(kw, field):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**kw)
