"""Flash Communication over torch symmetric memory: the same two-step compressed all-reduce as
:mod:`catkit.dist.flash_all_reduce`, with no NCCL call and no separate transfer step.

Every rank owns one symmetric allocation, ``[recv: W rows of layout l1][gather: W rows of l2]``,
mapped into every peer's address space (``torch.distributed._symmetric_memory``: CUDA VMM
peer-to-peer mappings over NVLink; no multicast object is used or needed). A call is

    step 1  one kernel: quantize x; the program that owns row p writes it straight into
            peer p's ``recv`` row ``rank`` (the all-to-all is the kernel's stores)      [W ptrs]
    barrier #1 (symm_mem barrier kernel on the calling stream)
    step 2  one kernel: decode the W rows of the local ``recv`` (chunk ``rank`` as sent by
            ranks 0..W-1), sum them in fp32 in rank order, re-quantize, and write the row into
            EVERY peer's ``gather`` row ``rank`` (the all-gather is the kernel's stores)  [W ptrs]
    barrier #2
    step 3  the NCCL path's own dequantize launcher on the local ``gather`` [W, row_bytes]

so five launches (three kernels, two barriers), the same as the NCCL path's count, but the two
collectives are gone: their bytes move inside the kernels that produce them.

Numerics: the kernels are built from groupwise.py's tile helpers (``_quant_tile``,
``_decode_tile``, ``_store_tile``), the groups are the NCCL path's groups (row ``p`` holds
flattened values ``[p*c, (p+1)*c)``, ``c`` from ``row_length``), and the fp32 sum runs over rows
0..W-1 starting from zero exactly as ``_reduce_requant_kernel`` does; so the bytes in ``recv`` and
``gather`` and the output are those of :func:`flash_all_reduce` with ``transport="nccl"``
(tests/dist/test_symm_all_reduce.py checks it bit for bit: on CPU by simulating W ranks in one
process, on 2 GPUs through NCCL vs symmetric memory).

Why reusing the buffers on the next call is safe (all calls on one stream; plans are keyed by
stream): a rank writes into a peer's memory only in steps 1 and 2, and a barrier kernel on a
stream completes only after every rank's barrier kernel has started, i.e. after every rank's
earlier kernels on its stream have finished.
  * ``recv`` of call k+1 (peer's step 1) vs our reading of ``recv`` in step 2 of call k: the peer
    issues step 1 of call k+1 after its barrier #2 of call k, which waits for our barrier #2 of
    call k, which follows our step 2 of call k.
  * ``gather`` of call k+1 (peer's step 2) vs our step 3 of call k: the peer's step 2 of call
    k+1 follows its barrier #1 of call k+1, which waits for our barrier #1 of call k+1, which
    follows our step 3 of call k.
  * visibility: the barrier's signal is a release at system scope after the preceding kernels
    and its wait an acquire followed by ``__threadfence_system``, so peer stores made before a
    peer's barrier are visible to our kernels after ours (torch's own symm_mem ops rely on it).
The two barriers use the same channel: its signal slots are compare-and-swap 0 -> 1 (put) and
1 -> 0 (wait), so a rank that runs ahead into the next barrier spins until the slot is consumed;
no signal is lost. Dropping a plan frees its allocation; torch synchronizes the device before
unmapping, and no peer writes into a plan's buffers after our last barrier #2 of it.

API used (checked against torch 2.13's python module and the upstream C++ source; every call
exists since torch 2.5, so 2.11 on the GPU machine has it): ``symm_mem.empty(n, dtype, device)``,
``symm_mem.rendezvous(t, group_name)`` -> handle with ``.rank``, ``.world_size``,
``.buffer_ptrs`` (peer base addresses), ``.get_buffer(peer, sizes, dtype, storage_offset)`` and
``.barrier(channel)``. Newer torch sub-allocates ``symm_mem.empty`` from a pool and
``get_buffer`` counts ``storage_offset`` from the allocation's base, not the tensor's, so the
peer views are taken at ``t.data_ptr() - buffer_ptrs[rank]`` (0 on versions without the pool).
"""

from __future__ import annotations

import atexit
import functools
import warnings
from collections import OrderedDict

import torch
import torch.distributed as dist

from catkit.ops.quant.groupwise import _config, _layout_args, _tune_configs, dequantize_launcher
from catkit.ops.quant.layout import QTensor, QuantLayout, check_quant_args, row_length
from catkit.utils.device import check_tensor
from catkit.utils.fast_launch import BoundLaunch
from catkit.utils.triton_utils import autotune, kernel_device_ok, triton_available

if triton_available():
    import triton
    import triton.language as tl

    from catkit.ops.quant.groupwise import _e, _parts, _quant_tile, _store_tile, _sum_requant_tile
else:  # pragma: no cover - non-Linux installs
    triton = None

MAX_WORLD = 8  # peer pointer slots in the kernels (one NVLink island of 8 GPUs)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


if triton is not None:

    @triton.jit
    def _pick(p, P0, P1, P2, P3, P4, P5, P6, P7, W: tl.constexpr):
        """Peer ``p``'s base pointer (a constexpr ``p`` folds to one argument; a runtime one is
        an if-chain, so the result keeps the arguments' 16-byte alignment and vector stores)."""
        d = P0
        if W > 1:
            if p == 1:
                d = P1
        if W > 2:
            if p == 2:
                d = P2
        if W > 3:
            if p == 3:
                d = P3
        if W > 4:
            if p == 4:
                d = P4
        if W > 5:
            if p == 5:
                d = P5
        if W > 6:
            if p == 6:
                d = P6
        if W > 7:
            if p == 7:
                d = P7
        return d

    @triton.jit
    def _meta_view(dst, META16: tl.constexpr):
        """The uint8 pointer ``dst`` as a pointer to the metadata dtype (fp16 or fp32)."""
        if META16:
            m = tl.cast(dst, tl.pointer_type(tl.float16))
        else:
            m = tl.cast(dst, tl.pointer_type(tl.float32))
        return m

    @triton.jit
    def _store_row(dst, q, mn_r, s_r, lo_r, hi_r, i_lo, i_hi, bad, r, j, gmask,
                   row_bytes, row_meta, scale_m, min_m, lo_m, hi_m, row_idx, ilo_i, ihi_i,
                   G: tl.constexpr, GB: tl.constexpr, H: tl.constexpr, BITS: tl.constexpr,
                   SPIKE: tl.constexpr, META16: tl.constexpr):
        """``_store_tile`` into a peer buffer given as one uint8 pointer: the metadata and index
        sections are typed views of the same bytes (what ``_layout_args`` makes on the host)."""
        _store_tile(dst, _meta_view(dst, META16), tl.cast(dst, tl.pointer_type(tl.int16)),
                    q, mn_r, s_r, lo_r, hi_r, i_lo, i_hi, bad, r, j, gmask,
                    row_bytes, row_meta, scale_m, min_m, lo_m, hi_m, row_idx, ilo_i, ihi_i, G, GB, H, BITS, SPIKE)

    @triton.jit(do_not_specialize=["size_key"])
    def _symm_quant_kernel(x_ptr, R0, R1, R2, R3, R4, R5, R6, R7, n_valid, c, gpr, rank, size_key,
                           row_bytes, row_meta, scale_m, min_m, lo_m, hi_m, row_idx, ilo_i, ihi_i,
                           G: tl.constexpr, BITS: tl.constexpr, SPIKE: tl.constexpr, WHOLE: tl.constexpr,
                           META16: tl.constexpr, W: tl.constexpr, VALS: tl.constexpr, HP: tl.constexpr):
        # grid (tiles of one row, W): program (t, p) quantizes groups [t*GB, (t+1)*GB) of row p
        # (flattened values p*c + ...) and stores them as row ``rank`` of peer p's recv buffer.
        # One destination per program, so the peer pointer is a scalar picked once.
        GB: tl.constexpr = VALS // G
        H: tl.constexpr = HP if HP < G // 32 else G // 32  # parts of >= 32 values
        t = tl.program_id(0)
        p = tl.program_id(1)
        i = tl.arange(0, GB)
        j = t * GB + i
        gmask = j < gpr
        kk = _parts(H, G // H)
        tile = _e(i) * G + kk
        start = tl.cast(p, tl.int64) * c + tl.cast(t, tl.int64) * VALS
        valid = _e(gmask)
        if not WHOLE:  # rows past the message's end are all padding: min(...) < 0 masks them whole
            valid = valid & (tile < tl.cast(tl.minimum(n_valid - start, VALS), tl.int32))
        x = tl.load(x_ptr + start + tile, mask=valid, other=0.0).to(tl.float32)
        q, mn_r, s_r, lo_r, hi_r, i_lo, i_hi, bad = _quant_tile(
            x, valid, kk, _meta_view(x_ptr, META16).dtype.element_ty, (1 << BITS) - 1, G, SPIKE, not WHOLE)
        dst = _pick(p, R0, R1, R2, R3, R4, R5, R6, R7, W)
        _store_row(dst, q, mn_r, s_r, lo_r, hi_r, i_lo, i_hi, bad, tl.zeros_like(j).to(tl.int64) + rank, j, gmask,
                   row_bytes, row_meta, scale_m, min_m, lo_m, hi_m, row_idx, ilo_i, ihi_i, G, GB, H, BITS, SPIKE,
                   META16)

    @triton.jit(do_not_specialize=["size_key"])
    def _symm_reduce_kernel(
            buf_ptr, meta_ptr, idx_ptr, gpr, rank, size_key,
            row_bytes, row_meta, scale_m, min_m, lo_m, hi_m, row_idx, ilo_i, ihi_i,
            O0, O1, O2, O3, O4, O5, O6, O7, n_valid,
            orow_bytes, orow_meta, oscale_m, omin_m, olo_m, ohi_m, orow_idx, oilo_i, oihi_i,
            G: tl.constexpr, BITS: tl.constexpr, SPIKE: tl.constexpr, OBITS: tl.constexpr,
            OSPIKE: tl.constexpr, OMETA16: tl.constexpr, WHOLE: tl.constexpr, W: tl.constexpr,
            VALS: tl.constexpr, HP: tl.constexpr):
        # _reduce_requant_kernel's step (the shared _sum_requant_tile: same decode, same fp32 sum
        # over rows 0..W-1 from zero, same re-quantization), then the row is stored W times: into
        # every peer's gather row ``rank`` (its own included), instead of once into a local buffer
        # for an all-gather.
        GB: tl.constexpr = VALS // G
        H: tl.constexpr = HP if HP < G // 32 else G // 32  # parts of >= 32 values
        g = tl.program_id(0) * GB + tl.arange(0, GB)
        gmask = g < gpr
        q, mn_r, s_r, lo_r, hi_r, i_lo, i_hi, bad = _sum_requant_tile(
            buf_ptr, meta_ptr, idx_ptr, W, g, gmask, n_valid, row_bytes, row_meta, scale_m, min_m, lo_m, hi_m,
            row_idx, ilo_i, ihi_i, _meta_view(O0, OMETA16).dtype.element_ty, G, GB, H, BITS, SPIKE, OBITS, OSPIKE,
            WHOLE, VALS)
        rows = tl.zeros_like(g).to(tl.int64) + rank
        for p in tl.static_range(W):
            dst = _pick(p, O0, O1, O2, O3, O4, O5, O6, O7, W)
            _store_row(dst, q, mn_r, s_r, lo_r, hi_r, i_lo, i_hi, bad, rows, g, gmask,
                       orow_bytes, orow_meta, oscale_m, omin_m, olo_m, ohi_m, orow_idx, oilo_i, oihi_i,
                       G, GB, H, OBITS, OSPIKE, OMETA16)

    # Re-running either kernel (the autotuner does, on a plan's first call) writes the same bytes
    # to the same places, and no peer reads them before the barrier that follows: harmless.
    _symm_quant_tuned = autotune(_tune_configs(), key=["size_key", "G", "BITS", "SPIKE", "WHOLE", "W"])(
        _symm_quant_kernel)
    _symm_reduce_tuned = autotune(_tune_configs(), key=["size_key", "G", "BITS", "SPIKE", "OBITS", "OSPIKE",
                                                        "WHOLE", "W"])(_symm_reduce_kernel)


# ----------------------------------------------------------------------------- host launchers

def _bind_grid(tuned, grid, args: tuple, const: dict, config):
    """``f(*lead)``: like groupwise's ``_bind`` but with a grid function of the tile's groups
    per program (step 1's grid is 2-D): autotune on the first call, then launch the chosen
    config's kernel through a ``BoundLaunch`` (no autotuner work per call)."""
    def fixed(cfg):
        return BoundLaunch(tuned.fn, grid(cfg.kwargs["VALS"] // const["G"]), args, {**const, **cfg.all_kwargs()})

    if config is not None:
        return fixed(_config(*config))
    chosen = []

    def launch(*lead):
        if chosen:
            return chosen[0](*lead)
        tuned[lambda m: grid(m["VALS"] // const["G"])](*lead, *args, **const)
        chosen.append(fixed(tuned.best_config))

    return launch


def _slots(bufs: list) -> list:
    """Pad the per-peer list to the kernels' ``MAX_WORLD`` pointer slots (unused: peer 0's)."""
    return list(bufs) + [bufs[0]] * (MAX_WORLD - len(bufs))


def symm_steps(rank: int, world: int, numel: int, l1: QuantLayout, l2: QuantLayout, recv: list, gather: list,
               *, config=None):
    """The three steps of one rank, bound to every peer's buffers.

    ``recv[p]``: peer p's ``uint8 [world, l1.row_bytes]`` receive buffer (as this rank sees it:
    a peer mapping, or the local tensor for ``p == rank``); ``gather[p]``: its
    ``uint8 [world, l2.row_bytes]`` gather buffer. Returns ``(quantize_scatter(x),
    reduce_broadcast(), decode(out))``; run them in that order with a barrier between them.
    On CPU tensors under ``TRITON_INTERPRET=1`` the same kernels run, which is how the tests
    simulate W ranks in one process. ``config``: a fixed ``(values per program, warps)``.
    """
    if not 2 <= world <= MAX_WORLD:
        raise ValueError(f"world: the symmetric-memory path supports 2..{MAX_WORLD} ranks, got {world}")
    if not 0 <= rank < world:
        raise ValueError(f"rank: expected 0 <= rank < {world}, got {rank}")
    if len(recv) != world or len(gather) != world:
        raise ValueError(f"recv, gather: expected one buffer per rank ({world}), got {len(recv)} and {len(gather)}")
    if l1.n != l2.n or l1.group_size != l2.group_size:
        raise ValueError("l2: must have the same row length and group size as l1")
    if numel > world * l1.n or numel < 1:
        raise ValueError(f"numel: expected 1..{world * l1.n} for rows of {l1.n} values, got {numel}")
    for name, bufs, L in (("recv", recv, l1), ("gather", gather, l2)):
        for b in bufs:
            if b.dtype != torch.uint8 or tuple(b.shape) != (world, L.row_bytes) or not b.is_contiguous():
                raise ValueError(f"{name}: expected contiguous uint8 [{world}, {L.row_bytes}], got "
                                 f"{b.dtype} {tuple(b.shape)}")
    if not kernel_device_ok(*recv, *gather):
        raise ValueError("recv: the symmetric-memory kernels need CUDA tensors (or CPU under TRITON_INTERPRET=1)")
    c, G = l1.n, l1.group_size
    gpr = l1.groups
    n_mine = min(max(numel - rank * c, 0), c)
    _, a1 = _layout_args(QTensor(recv[rank], l1, world * c))
    const1 = dict(G=G, BITS=l1.bits, SPIKE=l1.spike_reserve, WHOLE=numel == world * c,
                  META16=l1.meta_dtype == torch.float16, W=world)
    quant = _bind_grid(_symm_quant_tuned, lambda gb: (triton.cdiv(gpr, gb), world),
                       (*_slots([r.view(-1) for r in recv]), numel, c, gpr, rank, gpr.bit_length(), *a1),
                       const1, config)
    ptrs, _ = _layout_args(QTensor(recv[rank], l1, world * c))
    _, a2 = _layout_args(QTensor(gather[rank], l2, numel))
    const2 = dict(G=G, BITS=l1.bits, SPIKE=l1.spike_reserve, OBITS=l2.bits, OSPIKE=l2.spike_reserve,
                  OMETA16=l2.meta_dtype == torch.float16, WHOLE=n_mine == c, W=world)
    reduce = _bind_grid(_symm_reduce_tuned, lambda gb: (triton.cdiv(gpr, gb),),
                        (*ptrs, gpr, rank, gpr.bit_length(), *a1, *_slots([g.view(-1) for g in gather]), n_mine, *a2),
                        const2, config)
    decode = dequantize_launcher(QTensor(gather[rank], l2, numel), config=config)
    return (lambda x: quant(x.reshape(-1))), reduce, decode


# ----------------------------------------------------------------------------- plans (GPU)

@functools.lru_cache(maxsize=None)
def symm_available() -> str | None:
    """None when this torch can allocate symmetric memory on CUDA, else why not (cached: per call)."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    if not dist.is_available():
        return "torch.distributed is not available"
    try:
        import torch.distributed._symmetric_memory as symm_mem  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means no support
        return f"torch.distributed._symmetric_memory cannot be imported ({type(e).__name__}: {e})"
    if triton is None:
        return "Triton is not available"
    return None


class _SymmPlan:
    """One message shape's symmetric buffers, peer views and bound launches (cf. ``_Plan``).

    Built collectively: ``rendezvous`` exchanges handles with every rank of the group, so every
    rank must create plans for the same shapes in the same order (it does when every rank makes
    the same calls, as with any collective)."""

    def __init__(self, group, numel: int, device: torch.device, bits: int, gather_bits: int, group_size: int,
                 spike_reserve: bool, meta_dtype: torch.dtype):
        import torch.distributed._symmetric_memory as symm_mem

        pg = group if group is not None else dist.group.WORLD
        W, N = dist.get_world_size(pg), numel
        c = row_length(N, W, group_size)
        self.l1 = QuantLayout(c, bits, group_size, spike_reserve, meta_dtype)
        self.l2 = QuantLayout(c, gather_bits, group_size, spike_reserve, meta_dtype)
        n1, n2 = W * self.l1.row_bytes, W * self.l2.row_bytes
        self.buf = symm_mem.empty(n1 + n2, dtype=torch.uint8, device=device)
        if hasattr(symm_mem, "enable_symm_mem_for_group"):  # needed before 2.7, a deprecated no-op after
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                symm_mem.enable_symm_mem_for_group(pg.group_name)
        self.handle = symm_mem.rendezvous(self.buf, pg.group_name)
        self.rank, self.world = self.handle.rank, self.handle.world_size
        if (self.rank, self.world) != (dist.get_rank(pg), W):
            raise RuntimeError(f"symmetric memory handle says rank {self.rank}/{self.world}, "
                               f"the group {dist.get_rank(pg)}/{W}")
        # newer torch: get_buffer counts from the allocation's base (see the module docstring)
        off = self.buf.data_ptr() - self.handle.buffer_ptrs[self.rank]
        if off < 0:
            raise RuntimeError(f"symmetric buffer lies before its allocation's base (offset {off})")
        views = [self.handle.get_buffer(p, (n1 + n2,), torch.uint8, off) for p in range(W)]
        if views[self.rank].data_ptr() != self.buf.data_ptr():  # the offset rule above must hold here
            raise RuntimeError("symmetric memory: get_buffer(rank) does not address the local buffer "
                               f"(torch {torch.__version__}); peer views would be wrong")
        views[self.rank] = self.buf
        self.recv = [v[:n1].view(W, self.l1.row_bytes) for v in views]
        self.gather = [v[n1:].view(W, self.l2.row_bytes) for v in views]
        self.step1, self.step2, self.step3 = symm_steps(self.rank, W, N, self.l1, self.l2, self.recv, self.gather)
        self.barrier = self.handle.barrier

    def run(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """x, out: contiguous, ``numel`` values on this rank's device; ``out`` may be ``x``."""
        self.step1(x)
        self.barrier(0)
        self.step2()
        self.barrier(0)
        self.step3(out)


_PLANS: OrderedDict = OrderedDict()
MAX_PLANS = 8  # symmetric allocations are pinned VMM memory mapped on every peer: keep few


def clear_symm_plans() -> None:
    """Drop every symmetric-memory plan (frees the allocations; call on every rank alike)."""
    _PLANS.clear()


atexit.register(clear_symm_plans)


def get_symm_plan(x: torch.Tensor, group, bits: int, gather_bits: int, group_size: int, spike_reserve: bool,
                  meta_dtype: torch.dtype) -> _SymmPlan:
    pg = group if group is not None else dist.group.WORLD
    stream = torch.cuda.current_stream(x.device).stream_id
    key = (pg, x.numel(), x.device, bits, gather_bits, group_size, spike_reserve, meta_dtype, stream)
    plan = _PLANS.get(key)
    if plan is not None:
        _PLANS.move_to_end(key)
        return plan
    plan = _PLANS[key] = _SymmPlan(group, x.numel(), x.device, bits, gather_bits, group_size, spike_reserve,
                                   meta_dtype)
    while len(_PLANS) > MAX_PLANS:
        _PLANS.popitem(last=False)
    return plan


# ----------------------------------------------------------------------------- autograd + public

class _SymmAllReduceFn(torch.autograd.Function):
    """Forward: the compressed all-reduce over symmetric memory; backward: identity (TP convention)."""

    @staticmethod
    def forward(ctx, x, plan):
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        plan.run(x, out)
        return out

    @staticmethod
    def backward(ctx, dy):
        return dy, None


def symm_all_reduce(
    x: torch.Tensor,
    group=None,
    *,
    bits: int = 8,
    gather_bits: int | None = None,
    group_size: int = 128,
    spike_reserve: bool = False,
    meta_dtype: torch.dtype = torch.float32,
    inplace: bool = False,
) -> torch.Tensor:
    """Sum ``x`` over ``group`` with Flash Communication's compression, moved over symmetric memory.

    Same arguments, result and special cases as :func:`catkit.dist.flash_all_reduce` (which
    reaches this with ``transport="symm"``), bit for bit: ``x`` of any shape, fp32/fp16/bf16, on
    this rank's CUDA device; ``bits`` / ``gather_bits`` 4 or 8; ``group_size`` a power of two in
    [32, 1024]. An empty ``x`` or a group of one rank returns ``x.clone()`` (``x`` with
    ``inplace``) without communicating. There is no size fallback here: the caller picks.
    Groups of 2..8 ranks on one NVLink island (peer-to-peer mappings; no multicast).

    Raises ValueError naming the argument for: a CPU ``x`` (``x``), torch without symmetric
    memory or CUDA (``transport``), more than 8 ranks (``group``), bad quantization arguments.

    Example (2 processes, one GPU each)::

        y = symm_all_reduce(partial, bits=4, gather_bits=8)   # == flash_all_reduce(partial, bits=4, gather_bits=8)
    """
    check_tensor("x", x, dtypes=_DTYPES)
    check_quant_args(bits, group_size, meta_dtype, name="bits")
    gather_bits = bits if gather_bits is None else gather_bits
    check_quant_args(gather_bits, group_size, meta_dtype, name="gather_bits")
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("group: torch.distributed is not initialized (call init_process_group first)")
    if inplace and not x.is_contiguous():
        raise ValueError("x: inplace=True needs a contiguous tensor")
    if inplace and x.requires_grad and torch.is_grad_enabled():
        raise ValueError("x: inplace=True cannot be used on a tensor that requires grad")
    world = dist.get_world_size(group)
    if world == 1 or x.numel() == 0:
        return x if inplace else x.clone()
    return symm_all_reduce_checked(x, group, world, bits, gather_bits, group_size, spike_reserve, meta_dtype,
                                   inplace)


def symm_all_reduce_checked(x, group, world: int, bits: int, gather_bits: int, group_size: int,
                            spike_reserve: bool, meta_dtype: torch.dtype, inplace: bool) -> torch.Tensor:
    """``symm_all_reduce`` after the arguments every transport shares were checked (what
    ``flash_all_reduce`` has done when it picks this path): ``world >= 2``, ``x`` not empty."""
    if not x.is_cuda:
        raise ValueError(f"x: the symmetric-memory transport needs a CUDA tensor, got one on {x.device} "
                         "(use transport='nccl')")
    if world > MAX_WORLD:
        raise ValueError(f"group: the symmetric-memory transport supports up to {MAX_WORLD} ranks, got {world}")
    why = symm_available()
    if why is not None:
        raise ValueError(f"transport: symmetric memory is unavailable here: {why} (use transport='nccl')")
    plan = get_symm_plan(x, group, bits, gather_bits, group_size, spike_reserve, meta_dtype)
    if inplace:
        plan.run(x, x)
        return x
    x = x.contiguous()
    if x.requires_grad and torch.is_grad_enabled():
        return _SymmAllReduceFn.apply(x, plan)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    plan.run(x, out)
    return out
