"""Hashed N-gram ids and the fused ids + gather of every table (definition: ``naive.py``).

Levels, top to bottom: ``@triton.jit`` kernels (a shared hash helper, the ids kernel, the fused
ids + gather forward and the sparse backward); host launchers ``ngram_ids_fwd`` /
``ngram_embedding_fwd`` / ``ngram_embedding_bwd``; one autograd Function; the public functions
``ngram_hash_ids`` and ``ngram_embedding`` (input checks live in ``validate``).

Layout: the tables are one ``[sum_t M_t, d_e]`` weight (table t starts at row ``offset_t``), so a
launch covers all of them and autograd sees one parameter. The grid is (token blocks, tables):
each program hashes BLOCK_T tokens for its table (int64 arithmetic, one modular reduction per
term: acc < M and x * c < V * M, so V * M_max < 2^62 is all that is required) and copies their
rows to ``out[i, t, :]``. The row copy dominates: per token it reads n_tables * d_e values at
random rows and writes them contiguously, so the kernel is bound by memory bandwidth.

Backward: ``grad_weight[offset_t + id] += grad_out[i, t]`` with fp32 atomics into a zeroed fp32
buffer. Atomics handle duplicate ids (frequent n-grams) without sorting; hot rows serialize in L2,
which costs far less than a sort + segment reduce over T * n_tables keys at the sizes catkit runs.
The summation order of duplicates is not fixed, so gradients are not bitwise deterministic. The
dense gradient is O(table) memory and one zero-fill per step; for fp32 weights (training with
master weights) the buffer is the gradient itself, other dtypes pay one cast. Tables too large
for that belong in host memory or sharded (see ``catkit.layers.ngram_embedding``).

Where the kernels cannot run (CPU tensors without ``TRITON_INTERPRET=1``, no Triton), the
launchers fall back to ``naive.py``, so callers never branch.
"""

from __future__ import annotations

import torch

from catkit.ops.ngram import naive
from catkit.utils.triton_utils import autotune, interpreted, kernel_device_ok, triton_available

if triton_available():
    import triton
    import triton.language as tl
else:  # pragma: no cover - non-Linux installs
    triton = None

_INT_IN = (torch.int32, torch.int64)
_FLOAT_W = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_BWD_BLOCK_T = 32  # 32 rows x up to 256 columns of fp32 atomics per program


if triton is not None:

    @triton.jit
    def _hash_block(tok_ptr, ctx_ptr, seq_ptr, cu_ptr, coef_ptr, mod_ptr, offs, m, t, eos_id,
                    MAX_N: tl.constexpr, HAS_CTX: tl.constexpr, HAS_EOS: tl.constexpr):
        """ids of table t for tokens ``offs`` (masked by ``m``): the boundary rule of naive.py."""
        seq = tl.load(seq_ptr + offs, mask=m, other=0)
        start = tl.load(cu_ptr + seq, mask=m, other=0).to(tl.int64)
        mod = tl.load(mod_ptr + t)
        x0 = tl.load(tok_ptr + offs, mask=m, other=0).to(tl.int64)
        acc = x0 % mod
        alive = m
        prev = x0
        pos = offs.to(tl.int64)
        for r in tl.static_range(1, MAX_N):
            p = pos - r
            inside = p >= start
            x = tl.load(tok_ptr + tl.maximum(p, 0), mask=m & inside, other=0).to(tl.int64)
            if HAS_CTX:
                # position before the sequence: read the context row (oldest first)
                k = (MAX_N - 1) - (start - p)
                k = tl.minimum(tl.maximum(k, 0), MAX_N - 2)
                xc = tl.load(ctx_ptr + seq.to(tl.int64) * (MAX_N - 1) + k, mask=m & (p < start), other=0)
                x = tl.where(inside, x, xc.to(tl.int64))
            if HAS_EOS:
                if r >= 2:  # an EOS strictly between p and i cuts p and everything older
                    alive = alive & (prev != eos_id)
            c = tl.load(coef_ptr + t * MAX_N + r)
            acc = (acc + tl.where(alive, x, 0) * c) % mod
            prev = x
        return acc

    @autotune(configs=[triton.Config({"BLOCK_T": 64}, num_warps=2), triton.Config({"BLOCK_T": 256}, num_warps=4)],
              key=["MAX_N"])
    @triton.jit
    def _ids_kernel(tok_ptr, ctx_ptr, seq_ptr, cu_ptr, coef_ptr, mod_ptr, ids_ptr, T, n_tables, eos_id,
                    MAX_N: tl.constexpr, HAS_CTX: tl.constexpr, HAS_EOS: tl.constexpr, BLOCK_T: tl.constexpr):
        pid, t = tl.program_id(0), tl.program_id(1)
        offs = pid * BLOCK_T + tl.arange(0, BLOCK_T)
        m = offs < T
        ids = _hash_block(tok_ptr, ctx_ptr, seq_ptr, cu_ptr, coef_ptr, mod_ptr, offs, m, t, eos_id,
                          MAX_N, HAS_CTX, HAS_EOS)
        tl.store(ids_ptr + offs.to(tl.int64) * n_tables + t, ids, mask=m)

    # sm_90 (offline ptxas, 16-byte aligned pointers, D = 256): 54-76 registers, no spills
    @autotune(configs=[triton.Config({"BLOCK_T": 16}, num_warps=4),
                       triton.Config({"BLOCK_T": 32}, num_warps=4),
                       triton.Config({"BLOCK_T": 32}, num_warps=8),
                       triton.Config({"BLOCK_T": 64}, num_warps=8),
                       triton.Config({"BLOCK_T": 8}, num_warps=2)],
              key=["D", "MAX_N"])
    @triton.jit
    def _fwd_kernel(tok_ptr, ctx_ptr, seq_ptr, cu_ptr, coef_ptr, mod_ptr, rowoff_ptr, w_ptr, ids_ptr, out_ptr,
                    T, n_tables, eos_id, D: tl.constexpr, MAX_N: tl.constexpr, HAS_CTX: tl.constexpr,
                    HAS_EOS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        pid, t = tl.program_id(0), tl.program_id(1)
        offs = pid * BLOCK_T + tl.arange(0, BLOCK_T)
        m = offs < T
        ids = _hash_block(tok_ptr, ctx_ptr, seq_ptr, cu_ptr, coef_ptr, mod_ptr, offs, m, t, eos_id,
                          MAX_N, HAS_CTX, HAS_EOS)
        tl.store(ids_ptr + offs.to(tl.int64) * n_tables + t, ids, mask=m)
        rows = tl.load(rowoff_ptr + t) + ids  # int64: concatenated tables exceed 2^31 elements
        out_row = (offs.to(tl.int64) * n_tables + t) * D
        for d0 in tl.static_range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            mm = m[:, None] & (cols < D)[None, :]
            v = tl.load(w_ptr + rows[:, None] * D + cols[None, :], mask=mm, other=0.0)
            tl.store(out_ptr + out_row[:, None] + cols[None, :], v.to(out_ptr.dtype.element_ty), mask=mm)

    # no autotune here: tuning reruns the launch and the atomics would add the gradient twice
    @triton.jit
    def _bwd_kernel(ids_ptr, rowoff_ptr, g_ptr, gw_ptr, T, n_tables,
                    D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        pid, t = tl.program_id(0), tl.program_id(1)
        offs = pid * BLOCK_T + tl.arange(0, BLOCK_T)
        m = offs < T
        g_row = (offs.to(tl.int64) * n_tables + t)
        ids = tl.load(ids_ptr + g_row, mask=m, other=0)
        rows = tl.load(rowoff_ptr + t) + ids
        for d0 in tl.static_range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            mm = m[:, None] & (cols < D)[None, :]
            g = tl.load(g_ptr + g_row[:, None] * D + cols[None, :], mask=mm, other=0.0).to(tl.float32)
            tl.atomic_add(gw_ptr + rows[:, None] * D + cols[None, :], g, mask=mm)


# ------------------------------------------------------------------------------------------------
# host launchers


class NgramSpec:
    """Table geometry and the device tensors the kernels read (coefficients, moduli, offsets)."""

    def __init__(self, vocab_size: int, max_n: int, n_splits: int, table_base: int):
        self.vocab_size, self.max_n, self.n_splits, self.table_base = vocab_size, max_n, n_splits, table_base
        self.sizes = naive.table_sizes(vocab_size, max_n, n_splits, table_base)
        self.offsets = naive.table_offsets(self.sizes)
        self.n_tables = len(self.sizes)
        self.num_rows = sum(self.sizes)
        self._dev: dict = {}

    def tensors(self, device):
        key = str(device)
        if key not in self._dev:
            coef = naive.hash_coefficients(self.vocab_size, self.max_n, self.n_splits, self.table_base)
            mods = torch.tensor(self.sizes, dtype=torch.int64)
            offs = torch.tensor(self.offsets, dtype=torch.int64)
            self._dev[key] = tuple(x.to(device) for x in (coef.contiguous(), mods, offs))
        return self._dev[key]

    def kwargs(self) -> dict:
        return dict(vocab_size=self.vocab_size, max_n=self.max_n, n_splits=self.n_splits, table_base=self.table_base)


def _layout(tokens, cu_seqlens, context, max_n):
    """Flatten to ``[T]`` plus per-token sequence index and int64 ``cu``; all on the token's device."""
    dev = tokens.device
    flat = tokens.reshape(-1).contiguous()
    T = flat.numel()
    if tokens.ndim == 2:
        B, L = tokens.shape
        cu = torch.arange(B + 1, device=dev, dtype=torch.int64) * L
        seq = torch.div(torch.arange(T, device=dev), max(L, 1), rounding_mode="floor").to(torch.int32)
    else:
        cu = (cu_seqlens.to(dev).long() if cu_seqlens is not None else torch.tensor([0, T], device=dev))
        seq = (torch.searchsorted(cu[1:], torch.arange(T, device=dev), right=True).to(torch.int32)
               if cu_seqlens is not None else torch.zeros(T, device=dev, dtype=torch.int32))
    ctx = context.contiguous() if context is not None else flat  # dummy pointer when HAS_CTX is off
    return flat, T, cu, seq, ctx


def _block_d(d_e: int) -> int:
    cap = 32 if interpreted() else 128
    return min(cap, triton.next_power_of_2(d_e))


def ngram_ids_fwd(tokens, spec: NgramSpec, cu_seqlens=None, eos_id=None, context=None) -> torch.Tensor:
    """``[T, n_tables]`` int64 (``[B, L, n_tables]`` for 2-D tokens); no input checks."""
    if not kernel_device_ok(tokens):
        return naive.ngram_hash_ids(tokens, cu_seqlens=cu_seqlens, eos_id=eos_id, context=context, **spec.kwargs())
    flat, T, cu, seq, ctx = _layout(tokens, cu_seqlens, context, spec.max_n)
    coef, mods, _ = spec.tensors(tokens.device)
    ids = torch.empty(T, spec.n_tables, dtype=torch.int64, device=tokens.device)
    if T:
        grid = lambda meta: (triton.cdiv(T, meta["BLOCK_T"]), spec.n_tables)  # noqa: E731
        _ids_kernel[grid](flat, ctx, seq, cu, coef, mods, ids, T, spec.n_tables,
                          -1 if eos_id is None else int(eos_id), MAX_N=spec.max_n,
                          HAS_CTX=context is not None, HAS_EOS=eos_id is not None)
    return ids.reshape(*tokens.shape, spec.n_tables)


def ngram_embedding_fwd(tokens, weight, spec: NgramSpec, cu_seqlens=None, eos_id=None, context=None):
    """(rows ``[T, n_tables, d_e]`` in weight's dtype, ids ``[T, n_tables]`` int64), flat in T."""
    d_e = weight.shape[1]
    if not kernel_device_ok(tokens, weight):
        ids = naive.ngram_hash_ids(tokens, cu_seqlens=cu_seqlens, eos_id=eos_id, context=context, **spec.kwargs())
        ids = ids.reshape(-1, spec.n_tables)
        offs = torch.tensor(spec.offsets, device=ids.device)
        return weight[ids + offs], ids
    flat, T, cu, seq, ctx = _layout(tokens, cu_seqlens, context, spec.max_n)
    coef, mods, offs = spec.tensors(tokens.device)
    ids = torch.empty(T, spec.n_tables, dtype=torch.int64, device=tokens.device)
    out = torch.empty(T, spec.n_tables, d_e, dtype=weight.dtype, device=weight.device)
    if T:
        grid = lambda meta: (triton.cdiv(T, meta["BLOCK_T"]), spec.n_tables)  # noqa: E731
        _fwd_kernel[grid](flat, ctx, seq, cu, coef, mods, offs, weight, ids, out, T, spec.n_tables,
                          -1 if eos_id is None else int(eos_id), D=d_e, MAX_N=spec.max_n,
                          HAS_CTX=context is not None, HAS_EOS=eos_id is not None, BLOCK_D=_block_d(d_e))
    return out, ids


def ngram_embedding_bwd(grad_out, ids, spec: NgramSpec, num_rows: int, grad_weight=None) -> torch.Tensor:
    """fp32 ``[num_rows, d_e]`` weight gradient; adds into ``grad_weight`` (fp32) when given."""
    T, n_tables, d_e = grad_out.shape
    if grad_weight is None:
        grad_weight = torch.zeros(num_rows, d_e, dtype=torch.float32, device=grad_out.device)
    if not kernel_device_ok(grad_out, ids):
        offs = torch.tensor(spec.offsets, device=ids.device)
        grad_weight.index_add_(0, (ids + offs).reshape(-1), grad_out.reshape(-1, d_e).float())
        return grad_weight
    if T:
        _, _, offs = spec.tensors(grad_out.device)
        grid = (triton.cdiv(T, _BWD_BLOCK_T), n_tables)
        _bwd_kernel[grid](ids, offs, grad_out.contiguous(), grad_weight, T, n_tables, D=d_e, BLOCK_T=_BWD_BLOCK_T,
                          BLOCK_D=_block_d(d_e), num_warps=4)
    return grad_weight


class _NgramEmbeddingFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens, weight, spec, cu_seqlens, eos_id, context):
        out, ids = ngram_embedding_fwd(tokens, weight, spec, cu_seqlens, eos_id, context)
        ctx.save_for_backward(ids)
        ctx.spec, ctx.w_shape, ctx.w_dtype = spec, weight.shape, weight.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (ids,) = ctx.saved_tensors
        gw = None
        if ctx.needs_input_grad[1]:
            gw = ngram_embedding_bwd(grad_out, ids, ctx.spec, ctx.w_shape[0])
            if gw.dtype != ctx.w_dtype:
                gw = gw.to(ctx.w_dtype)
        return None, gw, None, None, None, None


# ------------------------------------------------------------------------------------------------
# public functions


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def validate(tokens, *, vocab_size, max_n, n_splits, table_base, cu_seqlens=None, eos_id=None, context=None,
             weight=None) -> NgramSpec:
    """Check every argument (``ValueError`` naming it) and return the table geometry.

    Value checks on tensors (id ranges, ``cu_seqlens`` contents) read the device, so they are
    skipped while a CUDA graph is being captured.
    """
    if not _is_int(vocab_size) or vocab_size < 2:
        raise ValueError(f"vocab_size: expected an int >= 2, got {vocab_size!r}")
    if not _is_int(max_n) or max_n < 2:
        raise ValueError(f"max_n: expected an int >= 2 (orders 2..max_n), got {max_n!r}")
    if not _is_int(n_splits) or n_splits < 1:
        raise ValueError(f"n_splits: expected an int >= 1, got {n_splits!r}")
    if not _is_int(table_base) or table_base % 2:
        raise ValueError(f"table_base: expected an even int so every table size table_base + 2t + 1 is odd, "
                         f"got {table_base!r}")
    if table_base < vocab_size:
        raise ValueError(f"table_base: {table_base} is too small; tables need at least vocab_size={vocab_size} "
                         f"rows (fewer rows than a unigram table only adds collisions)")
    spec = NgramSpec(vocab_size, max_n, n_splits, table_base)
    if vocab_size * max(spec.sizes) >= 2**62:
        raise ValueError(f"table_base: vocab_size * table size must stay below 2^62 for int64 hashing, "
                         f"got {vocab_size} * {max(spec.sizes)}")
    if not isinstance(tokens, torch.Tensor) or tokens.dtype not in _INT_IN or tokens.ndim not in (1, 2):
        what = f"{tokens.dtype} tensor of shape {tuple(tokens.shape)}" if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(f"tokens: expected int32/int64 [T] or [B, L], got {what}")
    if eos_id is not None and (not _is_int(eos_id) or not 0 <= eos_id < vocab_size):
        raise ValueError(f"eos_id: expected None or an int in [0, {vocab_size}), got {eos_id!r}")
    check = not _capturing()
    if check and tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        raise ValueError(f"tokens: ids must be in [0, vocab_size={vocab_size}), got range "
                         f"[{int(tokens.min())}, {int(tokens.max())}]")
    n_seq = tokens.shape[0] if tokens.ndim == 2 else 1
    if cu_seqlens is not None:
        if tokens.ndim != 1:
            raise ValueError("cu_seqlens: only for 1-D packed tokens; [B, L] tokens are B sequences already")
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype not in _INT_IN or cu_seqlens.ndim != 1 \
                or cu_seqlens.numel() < 2:
            raise ValueError("cu_seqlens: expected a 1-D int32/int64 tensor [n_seq + 1]")
        if cu_seqlens.device != tokens.device:
            raise ValueError(f"cu_seqlens: expected a tensor on {tokens.device}, got {cu_seqlens.device}")
        if check:
            cu = cu_seqlens.long()
            if int(cu[0]) != 0 or int(cu[-1]) != tokens.numel() or bool((cu[1:] < cu[:-1]).any()):
                raise ValueError(f"cu_seqlens: must start at 0, be non-decreasing and end at T={tokens.numel()}, "
                                 f"got {cu_seqlens.tolist() if cu_seqlens.numel() <= 16 else 'a mismatch'}")
        n_seq = cu_seqlens.numel() - 1
    if context is not None:
        if not isinstance(context, torch.Tensor) or context.dtype not in _INT_IN \
                or tuple(context.shape) != (n_seq, max_n - 1):
            got = tuple(context.shape) if isinstance(context, torch.Tensor) else type(context).__name__
            raise ValueError(f"context: expected an int tensor [{n_seq}, max_n - 1 = {max_n - 1}], got {got}")
        if context.device != tokens.device:
            raise ValueError(f"context: expected a tensor on {tokens.device}, got {context.device}")
        if check and context.numel() and (int(context.min()) < 0 or int(context.max()) >= vocab_size):
            raise ValueError(f"context: ids must be in [0, vocab_size={vocab_size})")
    if weight is not None:
        if not isinstance(weight, torch.Tensor) or weight.ndim != 2 or weight.dtype not in _FLOAT_W:
            raise ValueError("weight: expected a floating-point [sum_t M_t, d_e] tensor")
        if weight.shape[0] != spec.num_rows:
            raise ValueError(f"weight: expected {spec.num_rows} rows (the {spec.n_tables} tables "
                             f"{spec.sizes[0]}..{spec.sizes[-1]} concatenated), got {weight.shape[0]}")
        if weight.device != tokens.device:
            raise ValueError(f"weight: expected a tensor on {tokens.device}, got {weight.device}")
    return spec


def ngram_hash_ids(tokens, *, vocab_size, max_n, n_splits, table_base, cu_seqlens=None, eos_id=None,
                   context=None) -> torch.Tensor:
    """Hashed N-gram ids of every table.

    Args:
        tokens: ``[T]`` int (packed sequences described by ``cu_seqlens``) or ``[B, L]`` (B sequences).
        vocab_size: V; ids must be in [0, V).
        max_n: highest order N (>= 2); orders 2..N.
        n_splits: K tables per order, differing only in modulus.
        table_base: m, even and >= V; table t = (n-2)K + j has M_t = m + 2t + 1 rows.
        cu_seqlens: ``[n_seq + 1]`` int32/int64 boundaries for 1-D tokens (default: one sequence).
        eos_id: end-of-document id; context before it is cut (see naive.py for the exact rule).
        context: ``[n_seq, N-1]`` ids preceding each sequence, oldest first (a decode state);
            default zeros (sequence start).

    Returns:
        ``[T, n_tables]`` (``[B, L, n_tables]``) int64 with ``0 <= ids[..., t] < M_t``.

    Example::

        ids = ngram_hash_ids(torch.tensor([5, 7, 1, 9]), vocab_size=10, max_n=3, n_splits=2, table_base=40)
        ids.shape == (4, 4); ids[1, 0] == (7 + 5 * 10) % 41
    """
    spec = validate(tokens, vocab_size=vocab_size, max_n=max_n, n_splits=n_splits, table_base=table_base,
                    cu_seqlens=cu_seqlens, eos_id=eos_id, context=context)
    return ngram_ids_fwd(tokens, spec, cu_seqlens, eos_id, context)


def ngram_embedding(tokens, weight, *, vocab_size, max_n, n_splits, table_base, cu_seqlens=None, eos_id=None,
                    context=None, spec: NgramSpec | None = None) -> torch.Tensor:
    """Fused hash + gather of every table's row: ``[T, n_tables, d_e]`` (``[B, L, n_tables, d_e]``).

    ``weight`` is ``[sum_t M_t, d_e]``: the tables concatenated in table order (see
    ``NgramSpec.offsets``). Differentiable in ``weight`` (sparse atomic accumulation, fp32);
    other arguments as in :func:`ngram_hash_ids`. ``spec`` (from ``validate``) lets a caller that
    already checked its arguments skip the checks, e.g. in a decode loop.

    Example::

        spec = NgramSpec(259, 4, 4, 2 * 259)
        w = torch.randn(spec.num_rows, 16, requires_grad=True)
        rows = ngram_embedding(x, w, vocab_size=259, max_n=4, n_splits=4, table_base=518)  # x: [B, L]
        rows.shape == (*x.shape, 12, 16)
    """
    if spec is None:
        spec = validate(tokens, vocab_size=vocab_size, max_n=max_n, n_splits=n_splits, table_base=table_base,
                        cu_seqlens=cu_seqlens, eos_id=eos_id, context=context, weight=weight)
    out = _NgramEmbeddingFn.apply(tokens, weight, spec, cu_seqlens, eos_id, context)
    return out.reshape(*tokens.shape, spec.n_tables, weight.shape[1])
