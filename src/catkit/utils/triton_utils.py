"""Triton plumbing: availability, interpreter mode and an interpreter-aware ``autotune``."""

from __future__ import annotations

import functools

from catkit import env


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether ``import triton`` works (Linux wheels only)."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def interpreted() -> bool:
    """True when kernels run in Triton's CPU interpreter."""
    return env.triton_interpret()


def autotune(configs, key, **kwargs):
    """``triton.autotune`` that keeps only the first config under ``TRITON_INTERPRET=1``.

    The interpreter runs each config at Python speed, so tuning there costs minutes and tells
    nothing; the first config is the one every CPU test exercises.
    """
    import triton

    if interpreted():
        configs = configs[:1]
    return triton.autotune(configs=configs, key=key, **kwargs)


def kernel_device_ok(*tensors) -> bool:
    """Kernels run on CUDA tensors, or on CPU tensors under the interpreter."""
    if not triton_available():
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    on_cpu = all(t.device.type == "cpu" for t in tensors)
    return on_cuda or (on_cpu and interpreted())
