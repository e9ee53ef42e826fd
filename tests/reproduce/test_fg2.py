"""The FG2 MQAR reproduction runs end to end at toy size and writes its report, plot and JSON."""

import json
import os

import pytest

from catkit.reproduce import fg2
from catkit.reproduce.registry import load_reproductions, run_reproduction


def test_fg2_is_registered():
    assert "fg2" in load_reproductions()


def test_matched_parameter_counts():
    cfgs = fg2.matched_configs(fg2.full_config())
    counts = {name: fg2._n_params(c) for name, c in cfgs.items()}
    assert set(counts) == {name for name, _ in fg2.MODELS}
    assert max(counts.values()) / min(counts.values()) < 1.01, counts
    assert [c.pattern for c in cfgs.values()] == ["AA", "GG", "KK", "FF", "PP"]


def test_tiny_pipeline_writes_report(tmp_path, monkeypatch):
    tiny = fg2.StudyConfig(d_model=32, n_heads=2, vocab_size=33, train_settings=[(32, 2), (32, 4)],
                           eval_settings=[(32, 4), (48, 4)], tokens_per_step=128, steps=2,
                           time_budget_s=None, warmup=1, eval_examples=8, eval_batch=4, seeds=(0, 1),
                           impl="torch", device="cpu", progress=False)
    monkeypatch.setattr(fg2, "quick_config", lambda: tiny)
    out = str(tmp_path / "fg2")
    summary = run_reproduction("fg2", out, quick=True)
    for name in ("report.md", "results.json", "mqar_accuracy.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    with open(os.path.join(out, "results.json")) as f:
        saved = json.load(f)
    assert saved["steps"] == 2 and saved["quick"] is True
    for name, _ in fg2.MODELS:
        accs = saved["results"][name]["T48_N4"]["acc"]
        assert len(accs) == 2 and all(0.0 <= a <= 1.0 for a in accs)
        assert len(saved["final_loss"][name]) == 2
    report = open(os.path.join(out, "report.md")).read()
    assert "FG2-GDN+" in report and "mqar_accuracy.png" in report and "T48 N4" in report
    assert summary["params"] == saved["params"]


def test_bad_setting_is_refused(tmp_path):
    bad = fg2.StudyConfig(d_model=32, n_heads=2, vocab_size=9, train_settings=[(32, 8)], steps=1,
                          time_budget_s=None, seeds=(0,), impl="torch", device="cpu", progress=False,
                          models=(("GDN", "G"),))
    with pytest.raises(ValueError, match="vocab_size"):
        fg2.run_study(bad, str(tmp_path))
