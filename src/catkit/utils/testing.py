"""Test helpers used by catkit's own tests and by benchmarks' correctness checks."""

from __future__ import annotations

import torch


def rel_rms(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """RMS of the difference over RMS of ``expected`` (both taken in float64).

    NaN or Inf anywhere in ``actual`` gives ``inf`` so a poisoned, unwritten element always fails.
    """
    a = actual.detach().double()
    e = expected.detach().double().to(a.device)
    if a.shape != e.shape:
        raise ValueError(f"shape mismatch: actual {tuple(a.shape)} vs expected {tuple(e.shape)}")
    if not torch.isfinite(a).all():
        return float("inf")
    denom = e.pow(2).mean().sqrt().clamp_min(1e-30)
    return float((a - e).pow(2).mean().sqrt() / denom)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5, name: str = "tensor") -> float:
    """Assert relative-RMS error <= ``rtol``; return the error so callers can report it."""
    err = rel_rms(actual, expected)
    if not err <= rtol:
        raise AssertionError(f"{name}: relative RMS error {err:.3e} > {rtol:.1e}")
    return err
