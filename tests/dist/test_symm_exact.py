"""The small-message exact all-reduce over symmetric memory (catkit.dist.symm_exact) and how
flash_all_reduce's fallback picks it. CPU: the selection rules and the bench's range summary;
GPU (2 CUDA devices): bit for bit NCCL's result in every case of symm_exact_checks.gpu_job."""

import importlib
import os

import pytest
import torch

import symm_exact_checks

far = importlib.import_module("catkit.dist.flash_all_reduce")


def test_fallback_stays_exact_and_off_symm_on_gloo(seed):
    from catkit.dist import run_local

    assert run_local(symm_exact_checks.cpu_job, 2, seed, timeout_s=60) == ["ok", "ok"]


def test_symm_exact_not_usable_off_cuda():
    from catkit.dist.symm_exact import usable

    assert not usable(torch.randn(10), 2)
    assert not usable(torch.randn(10, dtype=torch.bfloat16), 2)
    assert far.SYMM_EXACT_FASTER == {} or all(lo < hi for r in far.SYMM_EXACT_FASTER.values() for lo, hi in r)


def test_symm_exact_faster_summary_rows():
    from catkit.bench.comm_symm import symm_exact_faster_rows

    rows = []
    for size, nccl, exact, ok in ((8, 2.0, 1.0, True), (16, 2.0, 1.5, True), (32, 2.0, 2.5, True),
                                  (64, 2.0, 1.0, True), (128, 2.0, 1.0, False)):
        rows.append({"bytes": size, "method": "nccl_bf16", "world": 2, "ms": nccl, "correct": True})
        rows.append({"bytes": size, "method": "symm_exact", "world": 2, "ms": exact, "nccl_ms": nccl, "correct": ok})
    (r,) = symm_exact_faster_rows(rows)
    # the smallest measured size wins: the range starts at 0; 32 lost; 128 was wrong
    assert r["wins_bytes"] == [8, 16, 64] and r["ranges"] == [[0, 32], [64, 128]] and r["key"] == 2
    assert r["correct"] is False


def _two_gpus():
    return torch.cuda.is_available() and torch.cuda.device_count() >= 2


@pytest.mark.gpu
@pytest.mark.skipif(not _two_gpus(), reason="needs 2 CUDA devices with peer access")
def test_symm_exact_is_nccl_bit_for_bit_on_two_gpus():
    from catkit.dist import run_local

    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed={seed}")
    reports = run_local(symm_exact_checks.gpu_job, 2, seed, backend="nccl", timeout_s=140)
    for rank, rep in enumerate(reports):
        for k, v in rep.items():
            print(f"rank {rank} {k}: ok={v[0]} max|diff|={v[1]:.3e}")
    failures = [(rank, k, v) for rank, rep in enumerate(reports) for k, v in rep.items() if not v[0]]
    assert not failures, failures
