"""Jobs run inside spawned ranks for tests/dist/test_symm_exact.py (imported by the children, so
not a test module)."""

import importlib

import torch


def gpu_job(rank, world, seed):
    """On NCCL ranks: the one-shot exact all-reduce vs ``dist.all_reduce`` on the same inputs,
    {case: (bit for bit NCCL's, max |diff|)}; several calls back to back (buffer reuse under the
    kernel's barriers), unaligned / non-contiguous / in-place inputs, and the fallback hook."""
    import torch.distributed as dist

    from catkit.dist import flash_all_reduce
    from catkit.dist.symm_exact import symm_exact_all_reduce, usable

    far = importlib.import_module("catkit.dist.flash_all_reduce")
    dev = torch.device("cuda", rank)
    g = torch.Generator(device=dev).manual_seed(seed + rank)
    report = {}

    def nccl(x):
        y = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(y)
        return y

    def record(name, got, want):
        same = bool(torch.equal(got, want)) and got.shape == want.shape and got.dtype == want.dtype
        report[name] = (same, float((got.float() - want.float()).abs().max()) if got.numel() else 0.0)

    for dtype in (torch.bfloat16, torch.float32):
        for n in (2, 8, 1000, 4098, 1 << 20):  # whole 4-byte words (odd bf16 counts: NCCL)
            xs = [torch.randn(n, generator=g, device=dev).to(dtype) * (k + 1 + rank) for k in range(3)]
            ys = [symm_exact_all_reduce(x) for x in xs]  # back to back, no sync between
            for k, (x, y) in enumerate(zip(xs, ys)):
                record(f"{dtype} n={n} call {k}", y, nccl(x))
        base = torch.randn(1001, generator=g, device=dev).to(dtype)
        record(f"{dtype} unaligned", symm_exact_all_reduce(base[1:]), nccl(base[1:]))
        m = torch.randn(64, 48, generator=g, device=dev).to(dtype)
        record(f"{dtype} non-contiguous", symm_exact_all_reduce(m.t()), nccl(m.t()))
        want = nccl(base[1:])
        inplace = base.clone()
        out = symm_exact_all_reduce(inplace[1:], inplace=True)
        record(f"{dtype} in place (unaligned)", inplace[1:], want)
        report[f"{dtype} in place returns x"] = (out.data_ptr() == inplace[1:].data_ptr(), 0.0)
        report[f"{dtype} untouched prefix"] = (bool(torch.equal(inplace[:1], base[:1])), 0.0)
    report["fp16 not usable"] = (not usable(torch.zeros(8, device=dev, dtype=torch.float16), world), 0.0)
    report["odd bf16 count not usable"] = (not usable(torch.zeros(7, device=dev, dtype=torch.bfloat16), world), 0.0)
    # the fallback hook: with a measured range, flash_all_reduce below its threshold takes this
    # path (counted), except for an odd bf16 count (NCCL); exact either way
    sx = importlib.import_module("catkit.dist.symm_exact")
    calls, real = [], sx.symm_exact_checked
    sx.symm_exact_checked = lambda *a, **k: calls.append(1) or real(*a, **k)
    saved = dict(far.SYMM_EXACT_FASTER)
    far.SYMM_EXACT_FASTER[world] = [(0, 1 << 20)]
    try:
        x = torch.randn(3000, generator=g, device=dev).to(torch.bfloat16)
        record("flash_all_reduce fallback", flash_all_reduce(x, bits=8, min_bytes=1 << 30), nccl(x))
        x2 = x.clone()
        flash_all_reduce(x2, bits=8, min_bytes=1 << 30, inplace=True)
        record("flash_all_reduce fallback in place", x2, nccl(x))
        report["fallback took the one-shot path twice"] = (len(calls) == 2, 0.0)
        x = torch.randn(7, generator=g, device=dev).to(torch.bfloat16)
        record("flash_all_reduce fallback, 7 bf16 (NCCL)", flash_all_reduce(x, bits=8, min_bytes=1 << 30), nccl(x))
        report["7 bf16 stayed on NCCL"] = (len(calls) == 2, 0.0)
    finally:
        far.SYMM_EXACT_FASTER.clear()
        far.SYMM_EXACT_FASTER.update(saved)
        sx.symm_exact_checked = real
    torch.cuda.synchronize()
    return report


def cpu_job(rank, world, seed):
    """On gloo: a measured one-shot range must not touch CPU groups; the fallback is still the
    exact gloo sum (in place and not, autograd too)."""
    import torch.distributed as dist

    from catkit.dist import flash_all_reduce

    far = importlib.import_module("catkit.dist.flash_all_reduce")
    far.SYMM_EXACT_FASTER[world] = [(0, 1 << 30)]
    g = torch.Generator().manual_seed(seed + rank)
    x = torch.randn(1000, generator=g)
    want = x.clone()
    dist.all_reduce(want)
    got = flash_all_reduce(x, min_bytes=1 << 30)
    inplace = x.clone()
    flash_all_reduce(inplace, min_bytes=1 << 30, inplace=True)
    xg = x.clone().requires_grad_()
    flash_all_reduce(xg, min_bytes=1 << 30).sum().backward()
    ok = torch.equal(got, want) and torch.equal(inplace, want) and torch.equal(xg.grad, torch.ones_like(x))
    return "ok" if ok else "mismatch"
