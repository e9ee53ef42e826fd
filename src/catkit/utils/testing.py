"""Test helpers used by catkit's own tests and by benchmarks' correctness checks."""

from __future__ import annotations

import torch

_SLICE = 1 << 24  # elements per float64 slice in rel_rms


def rel_rms(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """RMS of the difference over RMS of ``expected`` (both taken in float64).

    NaN or Inf anywhere in ``actual`` gives ``inf`` so a poisoned, unwritten element always fails.
    Works through the tensors in slices so checking a multi-GB gradient needs no float64 copy.
    """
    a = actual.detach().reshape(-1)
    e = expected.detach().to(a.device).reshape(-1)
    if actual.shape != expected.shape:
        raise ValueError(f"shape mismatch: actual {tuple(actual.shape)} vs expected {tuple(expected.shape)}")
    num = torch.zeros((), dtype=torch.float64, device=a.device)
    den = torch.zeros((), dtype=torch.float64, device=a.device)
    bad = torch.zeros((), dtype=torch.bool, device=a.device)
    for i in range(0, a.numel(), _SLICE):
        ac, ec = a[i : i + _SLICE].double(), e[i : i + _SLICE].double()
        bad |= ~torch.isfinite(ac).all()
        num += (ac - ec).pow(2).sum()
        den += ec.pow(2).sum()
    if bool(bad):
        return float("inf")
    return float(num.sqrt() / den.sqrt().clamp_min(1e-30))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5, name: str = "tensor") -> float:
    """Assert relative-RMS error <= ``rtol``; return the error so callers can report it."""
    err = rel_rms(actual, expected)
    if not err <= rtol:
        raise AssertionError(f"{name}: relative RMS error {err:.3e} > {rtol:.1e}")
    return err
