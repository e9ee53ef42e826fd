"""``catkit generate`` through the Engine, and the ``catkit serve`` wiring (server start mocked)."""

import torch

from catkit.cli import main
from catkit.data import ByteTokenizer
from catkit.models import CatModel, ModelConfig
from catkit.train import checkpoint as ckpt


def _run_dir(tmp_path, pattern="AA"):
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_heads=4, n_kv_heads=2, pattern=pattern, max_seq_len=64, init_std=0.5)
    model = CatModel(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ckpt.save_checkpoint(str(tmp_path / "run" / "checkpoints"), 1, model, opt, {"model_config": cfg.to_dict()})
    return str(tmp_path / "run"), model.eval()


def test_generate_uses_engine_and_matches_model_generate(tmp_path, capsys, monkeypatch):
    run, model = _run_dir(tmp_path)
    import catkit.serve.engine as eng

    calls = []
    orig = eng.Engine.generate
    monkeypatch.setattr(eng.Engine, "generate", lambda self, *a, **k: calls.append(1) or orig(self, *a, **k))
    tok = ByteTokenizer()
    for temp in ("0", "0.8"):
        assert main(["generate", "--checkpoint", run, "--prompt", "hi ", "--max-tokens", "12", "--seed", "3",
                     "--temperature", temp]) == 0
        out = capsys.readouterr().out
        g = torch.Generator().manual_seed(3)
        ref = model.generate(torch.tensor([tok.encode("hi ")]), 12, temperature=float(temp), generator=g)
        assert out == tok.decode(ref[0].tolist()) + "\n"
    assert len(calls) == 2


def test_serve_subcommand(tmp_path, monkeypatch):
    run, _ = _run_dir(tmp_path)
    import catkit.serve.server as server

    seen = {}
    monkeypatch.setattr(server, "serve", lambda engine, tok, name, host, port: seen.update(
        engine=engine, name=name, host=host, port=port))
    assert main(["serve", "--checkpoint", run, "--port", "8123", "--max-batch-size", "2"]) == 0
    assert seen["name"] == "run" and seen["port"] == 8123 and seen["host"] == "127.0.0.1"
    assert seen["engine"].max_batch_size == 2 and seen["engine"].cache.num_blocks == 2 * 4
