"""The ``catkit`` command: demo | train | generate | serve | bench | reproduce | info."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys

from catkit import __version__, env

OP_FAMILIES = ["delta_rule", "sparse_attention", "quant", "ngram"]


def _parse_overrides(pairs: list[str]) -> tuple[dict, dict]:
    """``key=value`` pairs; ``model.<field>`` goes to ModelConfig, anything else to TrainConfig."""
    model, train = {}, {}
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"--set: expected key=value, got {pair!r}")
        key, raw = pair.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        if key.startswith("model."):
            model[key[6:]] = value
        else:
            train[key] = value
    return model, train


def cmd_info(args) -> int:
    import torch

    from catkit.utils.triton_utils import interpreted, triton_available

    print(f"catkit {__version__}")
    print(f"python {platform.python_version()}  torch {torch.__version__}")
    if triton_available():
        import triton

        mode = "interpreted (TRITON_INTERPRET=1)" if interpreted() else ("compiled" if torch.cuda.is_available() else "no GPU: kernels need TRITON_INTERPRET=1")
        print(f"triton {triton.__version__}: {mode}")
    else:
        print("triton: not installed (kernels fall back to PyTorch references where they have one)")
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print(f"device: cuda, {torch.cuda.device_count()} x {p.name} ({p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor})")
    else:
        print(f"device: cpu ({os.cpu_count()} cores)")
    print("kernels:")
    for fam in OP_FAMILIES:
        try:
            importlib.import_module(f"catkit.ops.{fam}")
            if not triton_available():
                status = "reference (naive.py) only: triton is not installed"
            elif torch.cuda.is_available() and not interpreted():
                status = "Triton, compiled"
            elif interpreted():
                status = "Triton, interpreted on CPU (slow; for tests)"
            else:
                status = "Triton kernels need a CUDA GPU or TRITON_INTERPRET=1"
        except ImportError as e:
            status = f"not built yet ({e.name or e})"
        print(f"  {fam:18s} {status}")
    return 0


def cmd_train(args) -> int:
    from catkit.train import Trainer, preset

    model_cfg, train_cfg = preset(args.preset)
    mo, to = _parse_overrides(args.set or [])
    model_cfg = model_cfg.replace(**mo)
    train_cfg = train_cfg.replace(**to)
    out = args.out or os.path.join(env.runs_dir(), args.preset)
    trainer = Trainer(model_cfg, train_cfg, out, progress=not args.no_progress)
    try:
        res = trainer.fit(resume=args.resume)
    except KeyboardInterrupt:
        print(f"\ninterrupted at step {trainer.step}; the last complete checkpoint under {out}/checkpoints is intact")
        return 130
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    if trainer.rank == 0:
        print(json.dumps({"run_dir": res.run_dir, "steps": res.steps, "first_val_loss": res.first_val_loss,
                          "final_val_loss": res.final_val_loss, "seconds": round(res.seconds, 1)}))
    return 0


def _load_checkpoint_model(arg: str):
    """``CatModel`` from a run directory or checkpoint directory, on the GPU if there is one, in eval mode."""
    import torch

    from catkit.models import CatModel, ModelConfig
    from catkit.train import checkpoint as ckpt

    path = arg
    if os.path.isdir(os.path.join(path, "checkpoints")):
        path = ckpt.latest_checkpoint(os.path.join(path, "checkpoints"))
        if path is None:
            raise SystemExit(f"--checkpoint: no complete checkpoint under {arg}")
    try:
        state = ckpt.read_state(path)
        model = CatModel(ModelConfig.from_dict(state["model_config"]))
        ckpt.load_weights(path, model)
    except ckpt.CheckpointError as e:
        raise SystemExit(str(e))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval(), device


def cmd_generate(args) -> int:
    import torch

    from catkit.data import ByteTokenizer
    from catkit.serve import Engine, SamplingParams
    from catkit.serve.paged_cache import check_model_supported

    model, device = _load_checkpoint_model(args.checkpoint)
    tok = ByteTokenizer()
    prompt = tok.encode(args.prompt)
    n = min(args.max_tokens, model.cfg.max_seq_len - len(prompt))
    try:
        check_model_supported(model)
    except ValueError:  # layers the paged engine does not serve yet: plain cached generation
        ids = torch.tensor([prompt], device=device)
        g = torch.Generator(device=device).manual_seed(args.seed)
        try:
            out = model.generate(ids, n, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, generator=g)
        except ValueError as e:
            raise SystemExit(str(e))
        print(tok.decode(out[0].tolist()))
        return 0
    if n < 0:
        raise SystemExit(f"--prompt: {len(prompt)} tokens exceed max_seq_len={model.cfg.max_seq_len}")
    if n == 0:
        print(tok.decode(prompt))
        return 0
    block = 16
    engine = Engine(model, max_batch_size=1, num_blocks=-(-(len(prompt) + n) // block), block_size=block)
    try:
        # same seeded generator and sampling calls as model.generate, so the output is unchanged
        gen = engine.generate([prompt], SamplingParams(max_tokens=n, temperature=args.temperature, top_k=args.top_k,
                                                       top_p=args.top_p, seed=args.seed))[0]
    except ValueError as e:
        raise SystemExit(str(e))
    print(tok.decode(prompt + gen))
    return 0


def cmd_serve(args) -> int:
    from catkit.data import ByteTokenizer
    from catkit.serve import Engine
    from catkit.serve.server import serve

    model, _ = _load_checkpoint_model(args.checkpoint)
    draft = _load_checkpoint_model(args.draft_checkpoint)[0] if args.draft_checkpoint else None
    slack = args.gamma + 1 if draft is not None else 0  # speculation writes past the last token
    num_blocks = args.num_blocks or -(-(model.cfg.max_seq_len + slack) // args.block_size) * args.max_batch_size
    try:
        engine = Engine(model, max_batch_size=args.max_batch_size, num_blocks=num_blocks, block_size=args.block_size,
                        prefill_chunk=args.prefill_chunk, draft_model=draft, gamma=args.gamma)
    except ValueError as e:
        raise SystemExit(str(e))
    name = args.model_name or os.path.basename(os.path.normpath(args.checkpoint))
    serve(engine, ByteTokenizer(), name, host=args.host, port=args.port)
    return 0


def cmd_bench(args) -> int:
    from catkit.bench.registry import load_suites, run_suite

    suites = load_suites()
    if args.list or not args.suite:
        for s in suites.values():
            print(f"{s.name:20s} {'[gpu] ' if s.needs_gpu else ''}{s.help}")
        return 0
    names = args.suite
    if names == ["all"]:
        import torch

        names = [s.name for s in suites.values() if torch.cuda.is_available() or not s.needs_gpu]
    ok = True
    for name in names:
        try:
            ok &= run_suite(name, quick=args.quick, out_dir=args.out)["ok"]
        except (ValueError, RuntimeError) as e:
            print(f"bench {name}: {e}", file=sys.stderr)
            return 2
    return 0 if ok else 1


def cmd_reproduce(args) -> int:
    from catkit.reproduce.registry import load_reproductions, run_reproduction

    if args.list or not args.name:
        for r in load_reproductions().values():
            print(f"{r.name:12s} {r.help}")
        return 0
    out = args.out or os.path.join(env.runs_dir(), "reproduce", args.name)
    run_reproduction(args.name, out, quick=args.quick)
    print(f"report: {os.path.join(out, 'report.md')}")
    return 0


def cmd_demo(args) -> int:
    from catkit.train.demo import run_demo

    s = run_demo(args.out, preset_name=args.preset, steps=args.steps, progress=not args.no_progress)
    print(f"\n{s['preset']} on {s['device']}: {s['params']:,} parameters, {s['steps']} steps in {s['train_seconds']} s")
    print(f"validation loss {s['first_val_loss']:.3f} -> {s['final_val_loss']:.3f} (nats/byte)")
    print(f"report: {os.path.join(args.out, 'report.md')}  plot: {s['plot']}")
    print("sample:\n" + s["sample"])
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="catkit", description=__doc__)
    p.add_argument("--version", action="version", version=f"catkit {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("info", help="versions, device, kernels").set_defaults(fn=cmd_info)

    d = sub.add_parser("demo", help="train a small model on the built-in corpus, plot, report, sample")
    d.add_argument("--out", default=os.path.join(env.runs_dir(), "demo"), help="run directory (replaced)")
    d.add_argument("--preset", default=None, help="default: small on a GPU, tiny on CPU")
    d.add_argument("--steps", type=int, default=None)
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(fn=cmd_demo)

    t = sub.add_parser("train", help="train a preset; torchrun for data parallel")
    t.add_argument("--preset", default="tiny")
    t.add_argument("--out", default=None, help="run directory (default runs/<preset>)")
    t.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="overrides, e.g. steps=100 model.d_model=256")
    t.add_argument("--resume", action="store_true", help="continue from the run directory's latest checkpoint")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(fn=cmd_train)

    g = sub.add_parser("generate", help="sample from a trained checkpoint")
    g.add_argument("--checkpoint", required=True, help="run directory or checkpoint directory")
    g.add_argument("--prompt", default="def ")
    g.add_argument("--max-tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(fn=cmd_generate)

    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)")
    sv.add_argument("--checkpoint", required=True, help="run directory or checkpoint directory")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--model-name", default=None, help="the model id clients send (default: the run directory name)")
    sv.add_argument("--max-batch-size", type=int, default=8)
    sv.add_argument("--block-size", type=int, default=16)
    sv.add_argument("--num-blocks", type=int, default=None, help="KV blocks per layer (default: a full context per batch slot)")
    sv.add_argument("--prefill-chunk", type=int, default=None,
                    help="prefill at most this many prompt tokens per step, interleaved with decoding (default: whole)")
    sv.add_argument("--draft-checkpoint", default=None,
                    help="a small model for speculative decoding of greedy requests (same vocabulary)")
    sv.add_argument("--gamma", type=int, default=4, help="draft tokens per speculative round")
    sv.set_defaults(fn=cmd_serve)

    b = sub.add_parser("bench", help="run benchmark suites (catkit vs its anchor)")
    b.add_argument("suite", nargs="*", help="suite names, or 'all'")
    b.add_argument("--quick", action="store_true", help="smallest sizes only")
    b.add_argument("--out", default="benchmarks/results", help="where the JSON goes")
    b.add_argument("--list", action="store_true")
    b.set_defaults(fn=cmd_bench)

    r = sub.add_parser("reproduce", help="small-scale reproduction of a paper's claim")
    r.add_argument("name", nargs="?")
    r.add_argument("--out", default=None, help="default runs/reproduce/<name>")
    r.add_argument("--quick", action="store_true", help="CPU-sized version (minutes on 2 cores)")
    r.add_argument("--list", action="store_true")
    r.set_defaults(fn=cmd_reproduce)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except ValueError as e:
        print(f"catkit {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
