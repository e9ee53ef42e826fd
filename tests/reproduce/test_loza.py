"""The ``loza`` reproduction end to end at toy size (a few steps per stage, CPU)."""

import dataclasses
import json
import os

import pytest

from catkit.reproduce.loza import gpu_setup, quick_setup, run_loza
from catkit.reproduce.registry import load_reproductions


def tiny_setup():
    return dataclasses.replace(quick_setup(), d_model=32, n_layers=4, n_heads=2, n_kv_heads=1, context=224,
                               batch_size=4, corpus_max_bytes=300_000, pretrain_steps=3, calib_steps=2,
                               recover_steps=2, eval_batches=1, passkey_rows=4, speed_context=200, decode_tokens=3)


def test_loza_pipeline_runs_end_to_end(tmp_path):
    assert "loza" in load_reproductions()
    out = str(tmp_path)
    r = run_loza(out, tiny_setup(), device="cpu")
    assert os.path.exists(os.path.join(out, "report.md")) and os.path.getsize(r["plot"]) > 0
    v = r["variants"]
    assert set(v) == {"dense", "loza_50", "random_50", "streaming_100"}
    assert len(v["loza_50"]["layers"]) == 2 and v["loza_50"]["layers"] != v["random_50"]["layers"]
    assert v["streaming_100"]["pattern"] == "SSSS" and v["dense"]["pattern"] == "AAAA"
    # The LoZA layers are the lowest-alpha ones.
    a = r["alphas"]
    assert max(a[i] for i in v["loza_50"]["layers"]) <= min(a[i] for i in range(4) if i not in v["loza_50"]["layers"])
    for res in v.values():
        for k in ("before", "after"):
            assert res[k]["lm_loss"] > 0 and 0 <= res[k]["passkey_acc"] <= res[k]["passkey_digit_acc"] <= 1
    sp = r["speed"]
    assert sp["streaming_100"]["kv_bytes"] < sp["loza_50"]["kv_bytes"] < sp["dense"]["kv_bytes"]
    report = open(os.path.join(out, "report.md")).read()
    assert "50% LoZA" in report and "KV" in report
    json.dumps(r)  # the summary is JSON-ready (the registry writes results.json)
    # A second run reuses every cached stage and reports the same numbers.
    again = run_loza(out, tiny_setup(), device="cpu")
    assert again["alphas"] == r["alphas"] and again["variants"] == r["variants"]


@pytest.mark.gpu
def test_loza_pipeline_gpu_smoke(tmp_path):
    """The GPU path (bf16 autocast, Triton prefill/decode kernels, block 128) at toy size."""
    s = dataclasses.replace(gpu_setup(), d_model=128, n_layers=4, n_heads=2, n_kv_heads=1, context=1024,
                            recent_blocks=2, batch_size=4, corpus_max_bytes=1_000_000, pretrain_steps=5,
                            calib_steps=2, recover_steps=2, eval_batches=1, passkey_rows=4, speed_context=4096,
                            speed_batch=2, decode_tokens=4, curriculum=((0.0, 512, 0.75), (0.5, 1024, 0.5)))
    r = run_loza(str(tmp_path), s, device="cuda")
    assert r["device"] != "CPU" and len(r["variants"]["loza_50"]["layers"]) == 2
    sp = r["speed"]
    assert sp["streaming_100"]["kv_bytes"] < sp["loza_50"]["kv_bytes"] < sp["dense"]["kv_bytes"]
    assert all(v["after"]["lm_loss"] < 10 for v in r["variants"].values())


def test_passkey_marker_and_curriculum():
    """The marker sits before both key copies and ends the question; curriculum phases and checks."""
    import torch

    from catkit.data import passkey, passkey_min_len
    from catkit.reproduce.loza import LozaSetup

    b = passkey(3, context_len=300, generator=torch.Generator().manual_seed(0), marker=1)
    for row, key in zip(b.inputs.tolist(), b.answers.tolist()):
        text = bytes(row)
        assert text.count(b"\x01" + str(key).encode()) == 3 and text.endswith(b"\x01" + str(key).encode())
    assert passkey_min_len(1) == passkey_min_len() + 3
    with pytest.raises(ValueError, match="marker"):
        passkey(1, context_len=300, marker=256)
    s = LozaSetup(context=1024, curriculum=((0.0, 256, 0.9), (0.5, 1024, 0.5)), curriculum_mix=0.5)
    assert s.phase(0.1, 0.9) == (256, 0.9) and s.phase(0.6, 0.9) == (1024, 0.5) and s.phase(0.6, 0.2) == (256, 0.5)
    for bad in (((0.5, 256, 0.5),), ((0.0, 300, 0.5),), ((0.0, 2048, 0.5),), ((0.0, 256, 1.5),)):
        with pytest.raises(ValueError, match="curriculum"):
            LozaSetup(context=1024, curriculum=bad)
