"""Flash Communication: a quantized two-step all-reduce (spec: shared/papers/flash_comm.md).

    x (every rank, numel N)
      -> quantize into W rows of c values (c = N / W rounded up to whole groups)   [groupwise.py]
      -> all_to_all_single: row r goes to rank r                                     (reduce-scatter)
      -> on rank r: decode the W copies of chunk r, sum in fp32, re-quantize        [one fused kernel]
      -> all_gather of the re-quantized chunks                                       (all-gather)
      -> decode all W chunks straight into the output dtype                          [groupwise.py]

Each value is quantized exactly twice whatever W, and every addition is fp32. ``bits`` is the
width of the reduce-scatter step, ``gather_bits`` (default ``bits``) of the all-gather step;
``bits=4, gather_bits=8`` is the paper's "INT6". Each quantized row (codes plus its per-group
scale and min) is one contiguous block, so each step is a single collective call; both calls
(``all_to_all_single``, ``all_gather_single`` / ``all_gather_into_tensor``) exist on NCCL and gloo,
so there is no backend branch (buffers are 1-D because gloo's all-gather insists on it).

Error bound per output value (fp32 metadata): ``sum_r s1[r, g] / 2 + s2[g] / 2`` where
``s1[r, g]`` is rank r's step for the value's group (its range / (2**bits - 1)) and ``s2[g]`` is
the step of the re-quantized sum's group (range / (2**gather_bits - 1)), plus fp32 rounding and,
for fp16/bf16 outputs, the final rounding to the output dtype.

Host cost (the first GPU run paid a fixed ~0.5-0.6 ms per call, 64 KB to 64 MB, while NCCL took
0.04 ms): per message shape a cached :class:`_Plan` holds persistent buffers and every launch
argument, so a call is five launches (quantize, all-to-all, reduce+requantize, all-gather,
dequantize) and no allocation; measured on CPU with the kernels and collectives stubbed out, the
Python around them went from 146 us to 11 us per call. There is no device->host sync on the path
(no ``.item()``, no tensor in a Python ``if``), and without autograd no ``autograd.Function``.
Below the fallback size only ``dist.all_reduce`` runs. Large messages can be cut into slices
(``chunks``) whose kernels overlap the other slices' transfers (:class:`_Pipeline`).

Not done here, an option for fixed shapes: capture the whole call in a CUDA graph (the plan's
buffers are already static; NCCL collectives are capturable), which removes the remaining
launch cost (~5 launches a call) for decode-sized messages; the caller would capture its own
model step around it.
"""

from __future__ import annotations

import atexit
import functools
import sys
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.distributed as dist

from catkit.ops.quant.groupwise import (dequantize_launcher, new_qtensor, quantize_launcher,
                                        reduce_requantize_launcher)
from catkit.ops.quant.layout import QTensor, QuantLayout, check_quant_args, row_length
from catkit.utils.device import check_tensor

# Below this many input bytes ``flash_all_reduce`` runs the exact all-reduce instead, because
# two collectives plus three kernels cannot beat one NCCL call there. Keys, most specific first:
# (backend, world size, bits of the reduce-scatter step), (backend, world size), backend;
# ``catkit bench comm`` prints the crossover ("[comm] measured fallback bytes ... set
# FALLBACK_BYTES[...]") in its ``fallback_*`` rows (``fallback_bytes_measured`` per width).
# Measured on H200s with the NCCL transport (benchmarks/results/comm-NVIDIA_H200-4gpu.json;
# 2 GPUs: comm-NVIDIA_H200-2gpu-nccl-transport.json, before transport="auto" moved to symmetric
# memory): 2 GPUs, int6 wins from 64 MB (1.07x), int4 from 128 MB (1.39x), int8 only at 256 MB
# (1.04x); 4 GPUs, int4 and int6 from 64 MB (1.22x / 1.04x there, 1.42x / 1.18x at 256 MB), int8
# only at 256 MB (1.02x). Other world sizes use the int8 value until measured. On 2 GPUs
# ``transport="auto"`` takes the symmetric-memory path from 64 MB (``SYMM_FASTER``), which skips
# this fallback. "gloo" is 0 so CPU runs (tests) always take the compressed path; on CPU
# compression is about correctness, not speed.
FALLBACK_BYTES: dict = {"nccl": 256 << 20, ("nccl", 2, 4): 128 << 20, ("nccl", 4, 4): 64 << 20, "gloo": 0}


def fallback_bytes(backend: str, world: int, bits: int) -> int:
    """The measured size below which ``flash_all_reduce`` sends the exact all-reduce instead."""
    for key in ((backend, world, bits), (backend, world), backend):
        if key in FALLBACK_BYTES:
            return FALLBACK_BYTES[key]
    return 0

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The symmetric-memory transport (catkit.dist.symm_all_reduce: the same compressed all-reduce,
# bit for bit, with the two NCCL collectives replaced by peer stores inside the kernels) is
# picked by ``transport="auto"`` only in byte ranges [lo, hi) where it was MEASURED faster than
# both this module's NCCL path and NCCL bf16 (the ``symm_faster_*`` rows of ``catkit bench
# comm_symm``, which print the entry), keyed (world size, bits, gather_bits); there it also
# skips the size fallback. 2 H200s: faster than both from 64 MB in every run (64 MB: int8
# 1.40-1.55x, int6 1.77-1.80x, int4 1.93-2.22x NCCL bf16; 256 MB: 1.56x / 1.85x / 2.38x;
# benchmarks/results/comm_symm-NVIDIA_H200-2gpu.json, comm-NVIDIA_H200-2gpu.json). At 32 MB it
# won in three runs (1.13-1.30x) and lost in one (0.74x): there the call is host bound (0.12-0.18
# ms of host time for three launches and two barriers against NCCL's 0.136 ms), so 32 MB stays
# with NCCL. 4 H100s (comm_symm-NVIDIA_H100_80GB_HBM3-4gpu.json): faster than both from 16 MB
# (16 MB: 1.35-1.38x; 64 MB: int8 1.16x, int6 1.51x, int4 1.87x; 256 MB: 1.11x / 1.47x / 1.83x,
# the auto pass of comm-NVIDIA_H100_80GB_HBM3-4gpu.json). Other world sizes: NCCL path until measured.
SYMM_FASTER: dict = {(2, 8, 8): [(64 << 20, 512 << 20)], (2, 4, 8): [(64 << 20, 512 << 20)],
                     (2, 4, 4): [(64 << 20, 512 << 20)], (4, 8, 8): [(16 << 20, 512 << 20)],
                     (4, 4, 8): [(16 << 20, 512 << 20)], (4, 4, 4): [(16 << 20, 512 << 20)]}
TRANSPORTS = ("auto", "nccl", "symm")

# Byte ranges [lo, hi) per world size where the exact fallback runs as ONE symmetric-memory kernel
# (catkit.dist.symm_exact: torch's one-shot all-reduce) instead of NCCL, because it was MEASURED
# faster there (the ``symm_exact_faster`` row of ``catkit bench comm_symm`` prints the entry).
# Only bf16 / fp32 without autograd; everything else below the threshold is NCCL. 2 H200s
# (benchmarks/results/comm_symm-NVIDIA_H200-2gpu.json): 1.1-2.2x faster than NCCL bf16 from 8 KB
# to 2 MB (0.015-0.023 ms against 0.023-0.035 ms, bit for bit NCCL's sum), slower from 4 MB; 4
# H100s (comm_symm-NVIDIA_H100_80GB_HBM3-4gpu.json): the same range.
SYMM_EXACT_FASTER: dict = {2: [(0, 4 << 20)], 4: [(0, 4 << 20)]}


def resolve_transport(transport: str, backend: str, world: int, bits: int, gather_bits: int, nbytes: int,
                      is_cuda: bool) -> str:
    """"nccl" (this module's path: NCCL on CUDA, gloo on CPU) or "symm" for one call."""
    if transport != "auto":
        return transport
    if backend != "nccl" or not is_cuda:
        return "nccl"
    return "symm" if _in_ranges(SYMM_FASTER.get((world, bits, gather_bits), ()), nbytes) else "nccl"


def _in_ranges(ranges, nbytes: int) -> bool:
    """Whether ``nbytes`` lies in one of the measured half-open byte ranges [lo, hi)."""
    return any(lo <= nbytes < hi for lo, hi in ranges)


@dataclass
class CommConfig:
    """How a tensor-parallel layer reduces its partial outputs.

    ``mode``: ``"exact"`` (``dist.all_reduce`` in the tensor's dtype) or ``"flash"``
    (:func:`flash_all_reduce` with the remaining fields, ``transport`` included).
    """

    mode: str = "exact"
    bits: int = 8
    gather_bits: int | None = None
    group_size: int = 128
    spike_reserve: bool = False
    meta_dtype: torch.dtype = torch.float32
    min_bytes: int | None = None
    chunks: int | None = None
    transport: str = "auto"

    def __post_init__(self):
        if self.mode not in ("exact", "flash"):
            raise ValueError(f"mode: expected 'exact' or 'flash', got {self.mode!r}")
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport: expected one of {TRANSPORTS}, got {self.transport!r}")
        check_quant_args(self.bits, self.group_size, self.meta_dtype)
        if self.gather_bits is not None:
            check_quant_args(self.gather_bits, self.group_size, self.meta_dtype, name="gather_bits")
        if self.chunks is not None and (not isinstance(self.chunks, int) or self.chunks < 1):
            raise ValueError(f"chunks: expected a positive int or None, got {self.chunks!r}")


def _backend_key(group, x: torch.Tensor) -> str:
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and x.is_cuda:
        return "nccl"
    return "gloo" if "gloo" in backend else backend


_GROUPS: dict = {}


def _group_info(group, x: torch.Tensor) -> tuple[int, str]:
    """(world size, backend key) of ``group`` for ``x``'s device, looked up once per group."""
    pg = group if group is not None else dist.group.WORLD
    key = (pg, x.is_cuda)
    info = _GROUPS.get(key)
    if info is None:
        info = _GROUPS[key] = (dist.get_world_size(group), _backend_key(group, x))
    if info[1] == "nccl" and not x.is_cuda:
        raise ValueError(f"x: an NCCL group needs a CUDA tensor, got one on {x.device}")
    return info


# torch >= 2.13 names it all_gather_single (all_gather_into_tensor is deprecated there); the GPU
# machine's torch 2.11 has only all_gather_into_tensor. Resolved once, not per call.
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class _Plan:
    """Everything one message shape needs, built once and reused by every later call.

    The first GPU run paid a fixed ~0.5 ms per call at every size from 64 KB to 64 MB; per call,
    the old path rebuilt two layouts, allocated four buffers (two of them the full quantized
    message), recomputed every launch argument and looked up the backend. A plan holds the
    persistent ``send`` / ``recv`` / ``mine`` / ``gathered`` buffers and the five launches with
    all their arguments bound, so a call is five launches and nothing else on the host.

    Reusing the buffers is safe for calls issued on one stream: each collective makes the
    calling stream wait for it (``async_op=False``), so call k+1's quantize cannot overwrite
    ``send`` before call k's all-to-all has read it, and NCCL's stream waits for the calling
    stream before call k+1's all-to-all writes ``recv``. Plans are keyed by the CUDA stream too,
    so two streams never share buffers.
    """

    def __init__(self, group, numel: int, dtype: torch.dtype, device: torch.device, bits: int, gather_bits: int,
                 group_size: int, spike_reserve: bool, meta_dtype: torch.dtype):
        self.group = group
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.numel, self.dtype, self.device = numel, dtype, device
        if self.world == 1:
            return
        W, N = self.world, numel
        c = row_length(N, W, group_size)
        self.l1 = QuantLayout(c, bits, group_size, spike_reserve, meta_dtype)
        self.l2 = QuantLayout(c, gather_bits, group_size, spike_reserve, meta_dtype)
        self.send = new_qtensor(W, self.l1, device, N)
        self.recv = torch.empty(W, self.l1.row_bytes, dtype=torch.uint8, device=device)
        # rank r owns flattened values [r*c, (r+1)*c); the tail past N is padding (absent)
        n_mine = min(max(N - self.rank * c, 0), c)
        self.mine = new_qtensor(1, self.l2, device, n_mine)
        # flat: gloo's all-gather wants 1-D output and input
        self.gathered = torch.empty(W * self.l2.row_bytes, dtype=torch.uint8, device=device)
        self.quantize = quantize_launcher(self.l1, W, N, self.send)
        self.reduce = reduce_requantize_launcher(QTensor(self.recv, self.l1, W * c), self.l2, n_mine, self.mine)
        self.decode = dequantize_launcher(QTensor(self.gathered.view(W, self.l2.row_bytes), self.l2, N))
        self.a2a = functools.partial(dist.all_to_all_single, self.recv, self.send.data, group=group)
        self.gather = functools.partial(_ALL_GATHER, self.gathered, self.mine.data.view(-1), group=group)
        self.a2a_async = functools.partial(self.a2a, async_op=True)
        self.gather_async = functools.partial(self.gather, async_op=True)

    def run(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """x, out: contiguous, ``numel`` values; ``out`` may be ``x`` (x is last read by quantize)."""
        self.quantize(x)
        self.a2a()
        self.reduce()
        self.gather()
        self.decode(out)

    def stages(self, x: torch.Tensor) -> dict:
        """The five steps as separate callables (the benchmark times each one alone)."""
        return {"quantize": lambda: self.quantize(x), "all_to_all": self.a2a, "reduce_requantize": self.reduce,
                "all_gather": self.gather, "dequantize": lambda: self.decode(x)}


class _Pipeline:
    """The message cut into consecutive slices, each with its own :class:`_Plan`, issued so that
    slice k+1's kernels run while slice k is on the link (async collectives; the calling
    stream waits for each one only right before its result is read).

    Order on the calling stream: Q0 Q1 .. | R0 R1 .. | D0 D1 ..; on NCCL's stream: A2A0 A2A1 ..
    AG0 AG1 ..: Q(k+1) overlaps A2A(k), R(k) overlaps A2A(k+1) and AG(k-1), D(k) overlaps
    AG(k+1). Every slice but the last holds a multiple of ``world * group_size`` values, so the
    quantization groups are exactly those of the unsliced message (same error bound).
    """

    def __init__(self, group, numel: int, chunks: int, dtype, device, *cfg):
        world = dist.get_world_size(group)
        G = cfg[2]
        step = -(-numel // chunks)
        step = -(-step // (world * G)) * (world * G)
        self.world, self.parts = world, []
        for start in range(0, numel, step):
            stop = min(start + step, numel)
            self.parts.append((start, stop, _Plan(group, stop - start, dtype, device, *cfg)))

    def run(self, x: torch.Tensor, out: torch.Tensor) -> None:
        xf, of = x.view(-1), out.view(-1)
        sent = []
        for start, stop, p in self.parts:
            p.quantize(xf[start:stop])
            sent.append(p.a2a_async())
        gathered = []
        for (_, _, p), work in zip(self.parts, sent):
            work.wait()
            p.reduce()
            gathered.append(p.gather_async())
        for (start, stop, p), work in zip(self.parts, gathered):
            work.wait()
            p.decode(of[start:stop])


# Slices for the pipelined path by message size (bytes, slices), largest first; below the last
# entry one unsliced plan. Measured on 2 H200s (rows ``flash_<bits>:chunks=K`` of
# benchmarks/results/comm-NVIDIA_H200-2gpu-session1-quick.json, NCCL transport): one slice was fastest or tied at 64 KB,
# 64 MB and 256 MB for every width (256 MB int8: 1.07 / 1.12 / 1.11 / 2.26 ms for 1 / 2 / 4 / 8
# slices), since each slice adds about five launches of host time and the slices' collectives
# serialise on the link anyway. So no size is sliced by default; ``chunks=`` still forces it.
PIPELINE_CHUNKS: tuple = ()


def auto_chunks(nbytes: int) -> int:
    """How many pipelined slices a message of ``nbytes`` gets by default."""
    return next((k for limit, k in PIPELINE_CHUNKS if nbytes >= limit), 1)


_PLANS: OrderedDict = OrderedDict()
MAX_PLANS = 16  # least recently used plans (and their buffers) are dropped beyond this


def clear_plan_cache() -> None:
    """Drop every cached plan and its persistent buffers (e.g. before ``torch.cuda.empty_cache``)
    and the cached group facts; also run at exit, so no process group outlives the interpreter's
    orderly shutdown inside a cache."""
    _PLANS.clear()
    _GROUPS.clear()
    symm = sys.modules.get("catkit.dist.symm_all_reduce")
    if symm is not None:  # the symmetric-memory transport's plans too, if it was ever used
        symm.clear_symm_plans()
    exact = sys.modules.get("catkit.dist.symm_exact")
    if exact is not None:  # and the one-shot fallback's buffers
        exact.clear_buffers()


atexit.register(clear_plan_cache)


def get_plan(x: torch.Tensor, group, bits: int, gather_bits: int, group_size: int, spike_reserve: bool,
             meta_dtype: torch.dtype, chunks: int = 1):
    """The cached plan for ``x``'s size, dtype, device (and CUDA stream) and these settings:
    a :class:`_Plan`, or with ``chunks > 1`` a :class:`_Pipeline` of that many slices."""
    pg = group if group is not None else dist.group.WORLD  # a re-initialized world is a new object
    stream = torch.cuda.current_stream(x.device).stream_id if x.is_cuda else 0
    key = (pg, x.numel(), x.dtype, x.device, bits, gather_bits, group_size, spike_reserve, meta_dtype, stream, chunks)
    plan = _PLANS.get(key)
    if plan is not None:
        _PLANS.move_to_end(key)
        return plan
    cfg = (bits, gather_bits, group_size, spike_reserve, meta_dtype)
    if chunks > 1 and x.numel() > chunks * dist.get_world_size(group) * group_size:
        plan = _Pipeline(group, x.numel(), chunks, x.dtype, x.device, *cfg)
    else:
        plan = _Plan(group, x.numel(), x.dtype, x.device, *cfg)
    _PLANS[key] = plan
    while len(_PLANS) > MAX_PLANS:
        _PLANS.popitem(last=False)
    return plan


def flash_all_reduce_fwd(x: torch.Tensor, group, bits: int, gather_bits: int, group_size: int,
                         spike_reserve: bool, meta_dtype: torch.dtype, out: torch.Tensor | None = None,
                         chunks: int = 1) -> torch.Tensor:
    """The compressed path on a contiguous, non-empty ``x`` and a group of two or more ranks.

    ``out`` (contiguous, x's numel and dtype) may be ``x`` itself: ``x`` is last read by the
    quantize kernel, which runs before the final decode on the same stream."""
    plan = get_plan(x, group, bits, gather_bits, group_size, spike_reserve, meta_dtype, chunks)
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    plan.run(x, out)
    return out.view(x.shape)


class _FlashAllReduceFn(torch.autograd.Function):
    """Forward: compressed all-reduce. Backward: identity (Megatron's row-parallel convention:
    what follows the reduction is replicated, so each rank's partial gets the output's gradient)."""

    @staticmethod
    def forward(ctx, x, group, bits, gather_bits, group_size, spike_reserve, meta_dtype, chunks):
        return flash_all_reduce_fwd(x, group, bits, gather_bits, group_size, spike_reserve, meta_dtype,
                                    chunks=chunks)

    @staticmethod
    def backward(ctx, dy):
        return dy, None, None, None, None, None, None, None


class _ExactAllReduceFn(torch.autograd.Function):
    """``dist.all_reduce`` on a copy; backward identity, as above."""

    @staticmethod
    def forward(ctx, x, group):
        y = x.clone()
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, dy):
        return dy, None


def exact_all_reduce(x: torch.Tensor, group=None, *, inplace: bool = False) -> torch.Tensor:
    """Sum of ``x`` over ``group`` (``dist.all_reduce`` on a copy, identity backward).

    ``inplace``: reduce into ``x`` itself and return it (contiguous ``x``, no autograd through it)."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1 or x.numel() == 0:
        return x if inplace else x.clone()
    if inplace:
        if not x.is_contiguous():
            raise ValueError("x: inplace=True needs a contiguous tensor")
        dist.all_reduce(x, group=group)
        return x
    return _ExactAllReduceFn.apply(x.contiguous(), group)


_ARGS_OK: set = set()  # argument tuples already validated: below the fallback size NCCL's own
# latency is ~30 us of host time, so every microsecond of checking shows


def _check_args(bits, gather_bits, group_size, meta_dtype, min_bytes, chunks, transport) -> None:
    key = (bits, gather_bits, group_size, meta_dtype, min_bytes, chunks, transport)
    try:
        if key in _ARGS_OK:
            return
    except TypeError:  # an unhashable argument: certainly not a valid one, checked below
        key = None
    check_quant_args(bits, group_size, meta_dtype, name="bits")
    check_quant_args(gather_bits, group_size, meta_dtype, name="gather_bits")
    if min_bytes is not None and (not isinstance(min_bytes, int) or min_bytes < 0):
        raise ValueError(f"min_bytes: expected a non-negative int or None, got {min_bytes!r}")
    if chunks is not None and (not isinstance(chunks, int) or isinstance(chunks, bool) or chunks < 1):
        raise ValueError(f"chunks: expected a positive int or None, got {chunks!r}")
    if transport not in TRANSPORTS:
        raise ValueError(f"transport: expected one of {TRANSPORTS}, got {transport!r}")
    if key is not None and len(_ARGS_OK) < 1024:
        _ARGS_OK.add(key)


def _exact_fallback(x, group, world: int, backend: str, nbytes: int, inplace: bool) -> torch.Tensor:
    """Below the compression threshold: the exact sum, in as few host steps as possible (NCCL's
    own latency is the bar), over one symmetric-memory kernel where that was measured faster
    (``SYMM_EXACT_FASTER``), else ``dist.all_reduce``."""
    grad = x.requires_grad and torch.is_grad_enabled()
    if not grad and backend == "nccl" and _in_ranges(SYMM_EXACT_FASTER.get(world, ()), nbytes):
        from catkit.dist import symm_exact  # CUDA-only, loaded on first use

        if symm_exact.usable(x, world):  # same answer on every rank: dtype, size and world only
            return symm_exact.symm_exact_checked(x, group, inplace)
    if inplace:
        dist.all_reduce(x, group=group)
        return x
    x = x.contiguous()
    if grad:
        return _ExactAllReduceFn.apply(x, group)
    y = x.clone()  # no graph to record: skip the autograd.Function's own host cost
    dist.all_reduce(y, group=group)
    return y


def flash_all_reduce(
    x: torch.Tensor,
    group=None,
    *,
    bits: int = 8,
    gather_bits: int | None = None,
    group_size: int = 128,
    spike_reserve: bool = False,
    meta_dtype: torch.dtype = torch.float32,
    min_bytes: int | None = None,
    inplace: bool = False,
    chunks: int | None = None,
    transport: str = "auto",
) -> torch.Tensor:
    """Sum ``x`` over the ranks of ``group`` with int8/int4 group-wise compression.

    Args:
        x: any shape, fp32/fp16/bf16, same shape on every rank; on CUDA for NCCL, CPU for gloo.
            By default only read: the result is a NEW tensor of ``x``'s shape and dtype, and a
            non-contiguous ``x`` is copied to contiguous memory first.
        group: a ``torch.distributed`` process group (default: the world).
        bits: 4 or 8, reduce-scatter step. gather_bits: 4 or 8, all-gather step (default ``bits``);
            ``bits=4, gather_bits=8`` is the paper's INT6.
        group_size: values sharing one scale and min; a power of two in [32, 1024].
        spike_reserve: keep each group's max and min exactly (see ops/quant/naive.py).
        meta_dtype: torch.float32 (default; any finite input stays finite) or torch.float16
            (the paper's 32/g bits of metadata; groups beyond fp16 range come out NaN).
        min_bytes: inputs smaller than this many bytes use the exact all-reduce; ``None`` reads
            :data:`FALLBACK_BYTES` for the backend and world size (measured crossovers).
        inplace: write the result into ``x`` and return ``x`` (like ``dist.all_reduce``; saves
            the output allocation and, below the fallback size, a copy). Needs a contiguous
            ``x`` and no autograd through it.
        chunks: cut the message into this many slices and overlap one slice's kernels with
            another's transfers (same result: the groups do not change); ``None`` =
            :func:`auto_chunks` of the size (1 at every size measured so far).
        transport: ``"nccl"``: two NCCL (gloo on CPU) collectives between the kernels;
            ``"symm"``: the same bytes moved by the kernels themselves over torch symmetric
            memory (:func:`catkit.dist.symm_all_reduce.symm_all_reduce`: CUDA, 2..8 ranks, one
            NVLink island; bit-identical result; ``min_bytes=None`` means no fallback there and
            ``chunks`` must be None or 1); ``"auto"`` (default): "symm" only where
            :data:`SYMM_FASTER` records it measured faster, else "nccl".

    Returns ``sum over ranks of x`` (fp32 accumulation), identical on every rank, within the
    bound in the module docstring. Special cases: an empty ``x`` or a group of one rank returns
    ``x.clone()`` (``x`` itself with ``inplace``) without communicating. NaN or Inf anywhere in a group of ``group_size``
    values on any rank turns that group of the result into NaN on every rank (never a wrong
    finite number); other groups are unaffected. Autograd: identity backward (TP convention).

    Example (2 processes)::

        y = flash_all_reduce(partial, bits=4, gather_bits=8)   # INT6
    """
    check_tensor("x", x, dtypes=_DTYPES)
    gather_bits = bits if gather_bits is None else gather_bits
    _check_args(bits, gather_bits, group_size, meta_dtype, min_bytes, chunks, transport)
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("group: torch.distributed is not initialized (call init_process_group first)")
    if inplace and not x.is_contiguous():
        raise ValueError("x: inplace=True needs a contiguous tensor")
    if inplace and x.requires_grad and torch.is_grad_enabled():
        raise ValueError("x: inplace=True cannot be used on a tensor that requires grad")
    world, backend = _group_info(group, x)
    if world == 1 or x.numel() == 0:
        return x if inplace else x.clone()
    nbytes = x.numel() * x.element_size()
    if transport == "symm" and chunks not in (None, 1):
        raise ValueError(f"chunks: the symm transport does not slice messages, got {chunks}")
    # "auto" with sliced messages asked for stays on the NCCL path (the only one that slices)
    if (chunks in (None, 1) and (min_bytes is None or nbytes >= min_bytes)
            and resolve_transport(transport, backend, world, bits, gather_bits, nbytes, x.is_cuda) == "symm"):
        from catkit.dist.symm_all_reduce import symm_all_reduce_checked  # CUDA-only, loaded on first use

        return symm_all_reduce_checked(x, group, world, bits, gather_bits, group_size, spike_reserve, meta_dtype,
                                       inplace)
    if min_bytes is None:
        threshold = fallback_bytes(backend, world, bits)
    else:
        threshold = min_bytes
    if nbytes < threshold:
        return _exact_fallback(x, group, world, backend, nbytes, inplace)
    chunks = auto_chunks(nbytes) if chunks is None else chunks
    plan = get_plan(x, group, bits, gather_bits, group_size, spike_reserve, meta_dtype, chunks)
    if inplace:  # no autograd here
        plan.run(x, x)
        return x
    x = x.contiguous()
    if x.requires_grad and torch.is_grad_enabled():
        return _FlashAllReduceFn.apply(x, group, bits, gather_bits, group_size, spike_reserve, meta_dtype, chunks)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    plan.run(x, out)
    return out


def all_reduce(x: torch.Tensor, group=None, config: CommConfig | None = None, *, inplace: bool = False) -> torch.Tensor:
    """Exact or compressed all-reduce of ``x`` as ``config`` says (default exact); ``inplace``
    reduces into ``x`` (a scratch partial sum nobody else reads, no autograd through it)."""
    config = config or CommConfig()
    if config.mode == "exact":
        return exact_all_reduce(x, group, inplace=inplace)
    return flash_all_reduce(x, group, bits=config.bits, gather_bits=config.gather_bits,
                            group_size=config.group_size, spike_reserve=config.spike_reserve,
                            meta_dtype=config.meta_dtype, min_bytes=config.min_bytes, chunks=config.chunks,
                            inplace=inplace, transport=config.transport)
