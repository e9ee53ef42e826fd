import json
import os

import pytest

from catkit.cli import main


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "kernels:" in out


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert "catkit" in capsys.readouterr().out


def test_bench_list(capsys):
    assert main(["bench", "--list"]) == 0
    assert "attention" in capsys.readouterr().out


def test_bench_unknown_suite(capsys):
    assert main(["bench", "nope"]) == 2
    assert "unknown benchmark" in capsys.readouterr().err


def test_train_then_generate(tmp_path, capsys):
    run = str(tmp_path / "run")
    args = ["train", "--preset", "tiny", "--out", run, "--no-progress", "--set", "steps=4", "eval_every=2",
            "ckpt_every=2", "eval_batches=1", "batch_size=4", "seq_len=32", "corpus_max_bytes=200000",
            "model.d_model=32", "model.pattern=\"AA\""]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 4 and summary["final_val_loss"] < summary["first_val_loss"]
    assert main(args[:5] + ["--resume"] + args[5:]) == 0  # already at step 4: resumes and stops
    assert main(["generate", "--checkpoint", run, "--prompt", "import ", "--max-tokens", "8", "--seed", "1"]) == 0
    assert capsys.readouterr().out.count("\n") >= 1


def test_train_bad_override(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path), "--set", "model.n_heads=3"]) == 2
    assert "d_model" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="key=value"):
        main(["train", "--out", str(tmp_path), "--set", "steps"])
    assert main(["train", "--out", str(tmp_path), "--set", "bogus=1"]) == 2
    assert "bogus" in capsys.readouterr().err


def test_generate_missing_checkpoint(tmp_path):
    with pytest.raises(SystemExit, match="missing"):
        main(["generate", "--checkpoint", str(tmp_path)])


def test_demo_short(tmp_path, capsys):
    out = str(tmp_path / "demo")
    assert main(["demo", "--out", out, "--steps", "3", "--no-progress"]) == 0
    for f in ("report.md", "loss.png", "metrics.jsonl"):
        assert os.path.exists(os.path.join(out, f)), f
    text = capsys.readouterr().out
    assert "validation loss" in text and "sample:" in text
