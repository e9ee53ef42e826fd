"""flash_all_reduce on 2, 4 and 8 gloo processes: error bound, identical ranks, NaN, bad input.

The checks themselves run inside the spawned ranks (tests/dist/dist_checks.py); the CONFIGS
there cover int8 / int4 / int6 / int8->int4, group sizes 32..1024, odd sizes, fp32/bf16/fp16.
"""

import pytest
import torch
import torch.distributed as dist

from dist_checks import CONFIGS, WORLD8_CHECKS, assert_check

from catkit.dist import flash_all_reduce

CHECKS = list(CONFIGS) + ["zero_range", "outliers", "nan_inf", "fallback_and_special", "pipelined", "bad_input",
                          "single_rank_group"]


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("check", CHECKS)
def test_flash_all_reduce(dist_report, world, check):
    assert_check(dist_report(world), check)


@pytest.mark.parametrize("check", [c for c in WORLD8_CHECKS if not c.startswith("tp_")])
def test_flash_all_reduce_world8(dist_report, check):
    assert_check(dist_report(8), check)


def test_not_initialized_is_a_clear_error():
    if dist.is_initialized():
        pytest.skip("a process group exists in this process")
    with pytest.raises(ValueError, match="group"):
        flash_all_reduce(torch.randn(10))


def test_fallback_threshold_lookup_most_specific_first(monkeypatch):
    """(backend, world, bits) beats (backend, world) beats backend; unknown backends never fall back."""
    import importlib

    far = importlib.import_module("catkit.dist.flash_all_reduce")  # the module, not the function
    monkeypatch.setattr(far, "FALLBACK_BYTES", {"nccl": 30, ("nccl", 4): 20, ("nccl", 4, 4): 10})
    assert far.fallback_bytes("nccl", 4, 4) == 10
    assert far.fallback_bytes("nccl", 4, 8) == 20
    assert far.fallback_bytes("nccl", 8, 4) == 30
    assert far.fallback_bytes("mpi", 4, 4) == 0
