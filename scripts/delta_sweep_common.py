"""What the delta-rule variant sweeps (sweep_delta_fwd_variants.py, sweep_delta_bwd_variants.py)
share: the shapes, the error bounds, the inputs and the result line. Import it before triton:
with ``SMALL=1`` (or ``--small``) on a machine without CUDA it turns on the Triton interpreter and
tiny shapes."""

import os
import sys

import torch

SMALL = bool(os.environ.get("SMALL")) or "--small" in sys.argv
if SMALL and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
if SMALL:
    H, D, SHAPES, CHECK_LENS = 2, 32, [(128, 2), (256, 1)], [70, 45]
else:
    # the checks use the timing's H and D: kernel constants, so each option compiles once
    H, D, SHAPES, CHECK_LENS = 16, 128, [(2048, 16), (32768, 1)], [300, 77, 1000]
# vs the fp64 token loop: relative RMS per output ("g": dg, whose sums cancel most)
BOUND64 = {"*": 3e-2, "g": 6e-2}
# vs the default option on the same inputs: reordered sums only / other rounding (bf16 operands
# or states, tf32 products): fp64 has the last word
BOUND_DEFAULT = {False: 1e-3, True: 3e-2}


def inputs(lens, decay=1.0, seed=0, dtype=torch.bfloat16):
    """Packed sequences of ``lens`` tokens: (x, cu_seqlens, do, dht), q / k L2-normalised, per-channel
    log-decay (x ``decay``) and rate."""
    gen = torch.Generator(device=DEV).manual_seed(seed)
    n = sum(lens)
    r = lambda *s: torch.randn(*s, device=DEV, generator=gen)  # noqa: E731
    x = dict(q=F.normalize(r(1, n, H, D), dim=-1).to(dtype), k=F.normalize(r(1, n, H, D), dim=-1).to(dtype),
             v=r(1, n, H, D).to(dtype), g=F.logsigmoid(r(1, n, H, D) + 3.0) * decay,
             bk=torch.sigmoid(r(1, n, H, D)).to(dtype))
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), device=DEV, dtype=torch.int32)
    return x, cu, r(1, n, H, D).to(dtype), r(len(lens), H, D, D)


def print_row(which, opt, row, width):
    """One option's result line (the format scripts/apply_sweep_best.py reads)."""
    ms = " ".join(f"{n}={v:.3f}ms" for n, v in row.get("ms", {}).items())
    dflt = "/".join(f"{max(row[k]):.0e}" for k in row if k.startswith("err_vs_default"))
    print(f"{which:{width}s} {opt} {ms} regs={row.get('n_regs')} spills={row.get('n_spills')} vs_default={dflt} "
          f"err/bound={row.get('max_err_over_bound', float('nan')):.2f} "
          f"err64={row.get('err64_decay0', float('nan')):.1e}/{row.get('err64_decay1', float('nan')):.1e} "
          f"ok={row['ok']}" + (f" ERROR {row['error']}" if "error" in row else ""), flush=True)
