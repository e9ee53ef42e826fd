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
def test_bound_launch_replays_on_gpu(seed, monkeypatch):
    import catkit.utils.fast_launch as fl

    monkeypatch.setattr(fl, "REPLAY", True)
    n, a = 1000, -1.25
    f, y = _launch(n, a, "cuda")
    _check(f, y, torch.randn(n, device="cuda"), a)
    assert f.compiled is not None and f.alignment == (True, True)
    from catkit.utils.fast_launch import _DISABLED

    assert not _DISABLED, "this Triton's launcher rejected the replayed argument list"
    for _ in range(3):
        _check(f, y, torch.randn(n, device="cuda"), a)
    assert f.replays == 3, "the replay path was not taken (launch hooks seen as registered?)"
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


class _FakeCompiled:
    """Stands in for Triton's CompiledKernel: records what its launcher receives."""

    packed_metadata, function = "meta", "fn"

    def __init__(self, reject=False):
        self.calls, self.reject = [], reject

    def run(self, *args):
        if self.reject:
            raise TypeError("function takes exactly 9 arguments")
        self.calls.append(args)


class _FakeJit:
    """A JIT function ``f(x, out, y, n, a=2.0, B: constexpr, SHIFT: constexpr)`` whose
    ``[grid](...)`` records the plain call and returns the fake compiled kernel."""

    def __init__(self, compiled):
        self.compiled, self.plain = compiled, []

        def f(x, out, y, n, a=2.0, B=None, SHIFT=None):
            pass

        self.fn = f

    def __getitem__(self, grid):
        def call(*args, **kw):
            self.plain.append((grid, args, kw))
            return self.compiled
        return call


@pytest.fixture
def replayable(monkeypatch):
    """BoundLaunch as on a GPU: not interpreted, a stream from the driver, no hooks registered."""
    import catkit.utils.fast_launch as fl

    monkeypatch.setattr(fl, "REPLAY", True)
    monkeypatch.setattr(fl, "interpreted", lambda: False)
    monkeypatch.setattr(fl, "_current_stream", lambda: 7)
    monkeypatch.setattr(fl, "_hooks_set", lambda: False)
    monkeypatch.setattr(fl, "_DISABLED", [])
    return fl


def test_replay_passes_the_signature_order_and_no_stale_tensors(replayable):
    comp = _FakeCompiled()
    jit = _FakeJit(comp)
    y = torch.zeros(4)
    f = replayable.BoundLaunch(jit, (3,), (y, 4), dict(B=64, SHIFT=1, num_warps=2))
    x1, o1, x2, o2 = (torch.zeros(4) for _ in range(4))
    f(x1, o1)  # Triton's own call, which compiles
    assert len(jit.plain) == 1 and jit.plain[0][2]["num_warps"] == 2 and f.replays == 0
    f(x2, o2)
    assert f.replays == 1 and len(jit.plain) == 1
    grid_x, grid_y, grid_z, stream, fn, meta, md, enter, exit_, *args = comp.calls[0]
    assert (grid_x, grid_y, grid_z, stream, fn, meta, md, enter, exit_) == (3, 1, 1, 7, "fn", "meta", None, None, None)
    # every parameter in signature order: the lead tensors of THIS call, defaults and constexprs
    # included, launch options (num_warps) excluded
    assert args[0] is x2 and args[1] is o2 and args[2] is y and args[3:] == [4, 2.0, 64, 1]
    assert all(t is not x1 and t is not o1 for t in f.tail)


def test_misaligned_lead_takes_tritons_path(replayable):
    comp = _FakeCompiled()
    jit = _FakeJit(comp)
    f = replayable.BoundLaunch(jit, (1,), (torch.zeros(4), 4), dict(B=64, SHIFT=1))
    base = torch.zeros(9)
    f(base[:8], base[:8])
    f(base[1:], base[:8])  # 4 bytes off: another specialization in Triton
    assert f.replays == 0 and len(jit.plain) == 2


def test_rejected_argument_list_falls_back_for_good(replayable):
    jit = _FakeJit(_FakeCompiled(reject=True))
    f = replayable.BoundLaunch(jit, (1,), (torch.zeros(4), 4), dict(B=64, SHIFT=1))
    x = torch.zeros(4)
    for _ in range(3):
        f(x, x)
    assert f.replays == 0 and len(jit.plain) == 3 and replayable._DISABLED


def test_replay_is_off_until_verified_on_a_gpu():
    import catkit.utils.fast_launch as fl

    comp = _FakeCompiled()
    jit = _FakeJit(comp)
    f = fl.BoundLaunch(jit, (1,), (torch.zeros(4), 4), dict(B=64, SHIFT=1))
    x = torch.zeros(4)
    f(x, x)
    f(x, x)
    assert fl.REPLAY or (f.replays == 0 and len(jit.plain) == 2)


def test_hook_detection_understands_hook_chains():
    from catkit.utils.fast_launch import _hook_on

    class Chain:
        def __init__(self, calls):
            self.calls = calls

    assert not _hook_on(None) and not _hook_on(Chain([]))
    assert _hook_on(Chain([print])) and _hook_on(print)
