"""Replay one Triton launch without Triton's per-call argument binding.

``kernel[grid](*args, **kw)`` re-binds and re-specializes every argument on each call (type,
16-byte alignment and value-1 checks of each pointer and int, the kernel-cache key, the global
variable check) before it reaches the compiled kernel's launcher. The all-reduce's kernels take
~35 arguments, and their launches cost 20-30 us of host time each on the H200 machines, which is
all a compressed all-reduce costs below a few MB (how much of it is binding: to be measured by
tests/test_fast_launch.py's GPU test, which prints both paths' host time).

``BoundLaunch`` pays it once. The first call goes through Triton, which returns the compiled
kernel; later calls hand the same argument list straight to its launcher. Only the leading
tensors may change between calls (an all-reduce's input and output) and only while they keep
the first call's 16-byte alignment, the one property of a pointer Triton specializes on (else the
call takes Triton's path, which compiles or finds the right variant). It is the plain Triton call
under the interpreter, while launch hooks are registered (profilers see every launch as usual;
newer Triton keeps them in HookChain objects that are never None, so "registered" means a chain
with calls), and for good if this Triton's launcher rejects the argument list (TypeError on the
first replay: Triton >= 3.3 passes constexprs to the launcher, which skips them; older ones did
not).
"""

from __future__ import annotations

import inspect

import torch

from catkit.utils.triton_utils import interpreted

# On since tests/test_fast_launch.py's GPU test took the replay path on an H100 (torch 2.11,
# Triton 3.6; 22.8 us per Triton call vs 11.7 us replayed, host time). False = Triton's own call.
REPLAY = True
_DISABLED = []  # set once a launcher rejected the argument list: this Triton lays it out otherwise
_HOOK_HOLDER = []  # where this Triton keeps its launch hooks, found once


def _hooks_set() -> bool:
    if not _HOOK_HOLDER:
        try:
            from triton import knobs

            _HOOK_HOLDER.append(knobs.runtime)
        except (ImportError, AttributeError):  # Triton < 3.4 kept them on CompiledKernel
            from triton.compiler import CompiledKernel

            _HOOK_HOLDER.append(CompiledKernel)
    h = _HOOK_HOLDER[0]
    return _hook_on(getattr(h, "launch_enter_hook", None)) or _hook_on(getattr(h, "launch_exit_hook", None))


def _hook_on(hook) -> bool:
    # a plain callable (older Triton) or a HookChain with registered calls (newer Triton)
    return hook is not None and bool(getattr(hook, "calls", True))


def _current_stream():
    from triton.runtime import driver

    return driver.active.get_current_stream(driver.active.get_current_device())


def _aligned(lead: tuple) -> tuple:
    return tuple(t.data_ptr() % 16 == 0 if isinstance(t, torch.Tensor) else t for t in lead)


class BoundLaunch:
    """``f(*lead)`` == ``jit_fn[grid](*lead, *args, **kwargs)``, cheaper from the second call.

    ``grid`` is a fixed tuple; ``kwargs`` holds constexprs and launch options (num_warps...)."""

    def __init__(self, jit_fn, grid: tuple, args: tuple, kwargs: dict):
        self.jit_fn, self.args, self.kwargs = jit_fn, tuple(args), dict(kwargs)
        self.grid = tuple(grid) + (1,) * (3 - len(grid))
        self.compiled = None
        self.tail = None  # the kernel's arguments after the lead ones, in signature order
        self.alignment = None
        self.replays = 0  # launches that took the replay path (tests check it is taken)

    def _bind_values(self, lead: tuple) -> list:
        sig = inspect.signature(self.jit_fn.fn)
        named = {k: v for k, v in self.kwargs.items() if k in sig.parameters}  # not num_warps & co
        bound = sig.bind(*lead, *self.args, **named)
        bound.apply_defaults()
        return list(bound.arguments.values())

    def __call__(self, *lead):
        c = self.compiled
        if REPLAY and c is not None and not _DISABLED and _aligned(lead) == self.alignment and not _hooks_set():
            stream = _current_stream()
            try:  # (no reference to the lead tensors is kept between calls)
                c.run(*self.grid, stream, c.function, c.packed_metadata, None, None, None, *lead, *self.tail)
                self.replays += 1
                return
            except TypeError:  # the launcher wants another argument list: Triton's path from now on
                _DISABLED.append(True)
        kernel = self.jit_fn[self.grid](*lead, *self.args, **self.kwargs)
        if self.compiled is None and not interpreted() and hasattr(kernel, "packed_metadata"):
            self.compiled, self.alignment = kernel, _aligned(lead)
            self.tail = self._bind_values(lead)[len(lead):]
