import pytest
import torch

from catkit.utils import assert_close, check_tensor, rel_rms, resolve_dtype


def test_rel_rms_detects_error_and_nan():
    x = torch.randn(100, dtype=torch.float64)
    assert rel_rms(x, x) == 0.0
    assert rel_rms(x * 1.1, x) == pytest.approx(0.1, rel=1e-6)
    y = x.clone()
    y[3] = float("nan")
    assert rel_rms(y, x) == float("inf")
    with pytest.raises(AssertionError, match="relative RMS"):
        assert_close(x * 1.1, x, rtol=1e-3)


def test_poison_empty_fills_nan(poison_empty):
    assert torch.isnan(torch.empty(4)).all()
    assert torch.isnan(torch.empty_like(torch.zeros(3))).all()
    assert (torch.empty(2, dtype=torch.int64) == -1).all()


def test_check_tensor_names_argument():
    with pytest.raises(ValueError, match="q: expected 4 dims"):
        check_tensor("q", torch.zeros(2, 3), ndim=4)
    with pytest.raises(ValueError, match="k: expected dtype"):
        check_tensor("k", torch.zeros(2, dtype=torch.int32), dtypes=[torch.float32])
    assert resolve_dtype("bf16") is torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("fp8x")
