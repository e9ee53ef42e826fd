"""BoundLaunch (catkit.utils.fast_launch): a replayed launch computes what Triton's own call does.

CPU (interpreter): it is the plain call. GPU: the replay path, with new lead tensors per call, a
misaligned lead (must take Triton's path: its alignment specialization differs), and the host
time of both paths printed.
"""

import time

import pytest
import torch

from catkit.utils.triton_utils import triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs triton")

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _axpy_kernel(x, out, y, n, a, B: tl.constexpr, SHIFT: tl.constexpr):
        i = tl.program_id(0) * B + tl.arange(0, B)
        m = i < n
        v = tl.load(x + i, mask=m) * a + tl.load(y + i, mask=m) + SHIFT
        tl.store(out + i, v, mask=m)


def _launch(n, a, dev):
    from catkit.utils.fast_launch import BoundLaunch

    y = torch.arange(n, device=dev, dtype=torch.float32)
    return BoundLaunch(_axpy_kernel, (triton.cdiv(n, 64),), (y, n, a), dict(B=64, SHIFT=3, num_warps=2)), y


def _check(f, y, x, a):
    """f's result is bit for bit Triton's own call's (same kernel) and near the torch formula
    (the kernel may fuse the multiply-add: rounding differs from torch's two ops)."""
    out, ref = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
    f(x, out)
    _axpy_kernel[f.grid](x, ref, *f.args, **f.kwargs)
    assert torch.equal(out, ref)
    torch.testing.assert_close(out, x * a + y + 3, rtol=1e-6, atol=1e-5)


def test_bound_launch_matches_plain_call(seed):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    n, a = 1000, 0.5
    f, y = _launch(n, a, dev)
    for _ in range(3):  # fresh lead tensors every call
        _check(f, y, torch.randn(n, device=dev), a)
    if dev == "cpu":
        assert f.compiled is None  # the interpreter has no compiled kernel: always the plain call


@pytest.mark.gpu
def test_bound_launch_replays_on_gpu(seed):
    n, a = 1000, -1.25
    f, y = _launch(n, a, "cuda")
    _check(f, y, torch.randn(n, device="cuda"), a)
    assert f.compiled is not None and f.alignment == (True, True)
    from catkit.utils.fast_launch import _DISABLED

    assert not _DISABLED, "this Triton's launcher rejected the replayed argument list"
    for _ in range(3):
        _check(f, y, torch.randn(n, device="cuda"), a)
    # a lead 4 bytes off 16-byte alignment: Triton's path (another specialization), still right
    base = torch.randn(n + 1, device="cuda")
    out = torch.full((n + 1,), float("nan"), device="cuda")
    f(base[1:], out[1:])
    torch.testing.assert_close(out[1:], base[1:] * a + y + 3, rtol=1e-6, atol=1e-5)
    x, out = torch.randn(n, device="cuda"), torch.empty(n, device="cuda")

    def host_us(fn, reps=2000):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        dt = (time.perf_counter() - t) / reps * 1e6
        torch.cuda.synchronize()
        return dt

    plain = host_us(lambda: _axpy_kernel[(triton.cdiv(n, 64),)](x, out, y, n, a, B=64, SHIFT=3, num_warps=2))
    fast = host_us(lambda: f(x, out))
    print(f"host time per launch: Triton call {plain:.1f} us, BoundLaunch replay {fast:.1f} us")
    _check(f, y, x, a)
