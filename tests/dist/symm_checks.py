"""The 2-GPU check of the symmetric-memory transport, run inside spawned NCCL ranks (imported by
the children, so not a test module; tests/dist/test_symm_all_reduce.py drives it)."""

import importlib

import torch

from dist_checks import _poison_empty

symm = importlib.import_module("catkit.dist.symm_all_reduce")  # the module (not a same-named function)

GPU_CASES = [  # (bits, gather_bits, group_size, numel, dtype, spike, meta)
    (8, 8, 128, 1 << 20, torch.bfloat16, False, torch.float32),
    (4, 4, 128, 1 << 20, torch.bfloat16, False, torch.float32),
    (4, 8, 128, 1 << 20, torch.bfloat16, False, torch.float32),  # INT6
    (8, 8, 32, 4099, torch.float32, False, torch.float32),
    (4, 4, 64, 100003, torch.float16, True, torch.float16),
    (4, 8, 128, 777, torch.bfloat16, False, torch.float32),
    (8, 4, 32, 7, torch.float32, False, torch.float32),  # one rank's row is all padding
]


def _pin_one_tile():
    """One tile per kernel (both transports): the test checks bytes, not speed, and compiles 7x
    less; 4096 values / 4 warps is the tile comm_symm's timing pins too, so it finds these kernels
    in Triton's on-disk cache. Every tile writes the same bytes (tests/ops)."""
    from catkit.ops.quant import groupwise

    for t in (groupwise._quant_tuned, groupwise._dequant_tuned, groupwise._reduce_requant_tuned,
              symm._symm_quant_tuned, symm._symm_reduce_tuned):
        t.configs = [groupwise._config(4096, 4)]


def gpu_job(rank, world, seed):
    """Every GPU_CASES case on this rank: {case: (all same, per-call same, max |symm - nccl|)}."""
    from catkit.dist import flash_all_reduce

    _poison_empty()
    _pin_one_tile()
    dev = torch.device("cuda", rank)
    report = {}
    for case in GPU_CASES:
        bits, gbits, G, n, dtype, spike, meta = case
        kw = dict(bits=bits, gather_bits=gbits, group_size=G, spike_reserve=spike, meta_dtype=meta, min_bytes=0)
        g = torch.Generator(device=dev).manual_seed(seed + rank)
        # three different inputs back to back, no sync between calls: buffer reuse under the barriers
        xs = [(torch.randn(n, generator=g, device=dev) * (k + 1 + rank)).to(dtype) for k in range(3)]
        xs[1][n // 3] = float("nan")
        ys_symm = [flash_all_reduce(x, transport="symm", **kw) for x in xs]
        inplace = xs[2].clone()
        flash_all_reduce(inplace, transport="symm", inplace=True, **kw)
        ys_nccl = [flash_all_reduce(x, transport="nccl", **kw) for x in xs]
        torch.cuda.synchronize()
        same = [torch.equal(a.nan_to_num(1e30), b.nan_to_num(1e30)) for a, b in zip(ys_symm, ys_nccl)]
        same.append(torch.equal(inplace.nan_to_num(1e30), ys_nccl[2].nan_to_num(1e30)))
        diff = max(float((a.float() - b.float()).nan_to_num(0.0).abs().max()) for a, b in zip(ys_symm, ys_nccl))
        report[str(case)] = (all(same), same, diff)
    # a 2-D non-contiguous input and autograd (identity backward)
    x = torch.randn(64, 96, device=dev, requires_grad=True)
    y = flash_all_reduce(x.t(), transport="symm", min_bytes=0)
    y.sum().backward()
    report["autograd"] = (y.shape == (96, 64) and torch.equal(x.grad, torch.ones_like(x)), None, 0.0)
    return report


def cpu_job(rank, world, seed):
    """On gloo (CPU): the transport hook's errors and its "auto" default, inside a real group."""
    import pytest

    from catkit.dist import flash_all_reduce

    x = torch.randn(1000, generator=torch.Generator().manual_seed(seed + rank))
    with pytest.raises(ValueError, match="x"):  # CPU tensor: symm needs CUDA
        flash_all_reduce(x, transport="symm")
    with pytest.raises(ValueError, match="transport"):
        flash_all_reduce(x, transport="multicast")
    with pytest.raises(ValueError, match="chunks"):  # checked once the symm path is chosen
        flash_all_reduce(x.cuda() if torch.cuda.is_available() else x, transport="symm", chunks=2)
    auto = flash_all_reduce(x, bits=4, group_size=32)
    nccl = flash_all_reduce(x, bits=4, group_size=32, transport="nccl")
    assert torch.equal(auto, nccl), "auto must be the NCCL/gloo path until symm is measured faster"
    # below an explicit min_bytes the symm request still takes the exact all-reduce, on any device
    small = flash_all_reduce(x, transport="symm", min_bytes=1 << 20)
    exact = x.clone()
    torch.distributed.all_reduce(exact)
    assert torch.equal(small, exact)
    # a group of one rank returns a copy on every transport
    solo = torch.distributed.new_group([0])
    if rank == 0:
        y = flash_all_reduce(x, solo, transport="symm")
        assert torch.equal(y, x) and y.data_ptr() != x.data_ptr()
    return "ok"
