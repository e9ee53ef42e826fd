"""Shared test setup.

On a machine without CUDA, Triton kernels run in the interpreter: the variable must be set before
any module defining a ``@triton.jit`` kernel is imported, hence here at the top of conftest.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from catkit.utils.testing import assert_close, rel_rms  # noqa: E402,F401

_HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="gpu test: no CUDA device on this machine")
    for item in items:
        if "gpu" in item.keywords and not _HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def poison_empty(monkeypatch):
    """Make ``torch.empty``/``empty_like``/``new_empty`` return NaN-filled (or -1 for ints) tensors.

    Ops allocate outputs with ``torch.empty``; a kernel that forgets to write an element then
    returns NaN and the relative-RMS check fails instead of passing on leftover memory.
    """
    real_empty, real_empty_like, real_new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty

    def fill(t):
        if t.is_floating_point() or t.is_complex():
            t.fill_(float("nan"))
        elif t.dtype != torch.bool:
            t.fill_(-1)
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(real_empty_like(*a, **k)))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **k: fill(real_new_empty(self, *a, **k)))
    yield


@pytest.fixture
def seed():
    """Fresh random inputs each run, reproducible from the printed seed on failure."""
    s = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(s)
    print(f"seed={s}")
    return s
