"""The exact all-reduce of small messages in one kernel over torch symmetric memory.

Below the size where compression pays, ``flash_all_reduce`` sends the exact sum. NCCL's
small-message all-reduce costs 25-35 us a call on 2 H200s whatever the size up to a few MB:
fixed latency (host bookkeeping, protocol setup), not bytes. torch's
``symm_mem.one_shot_all_reduce_copy_out`` does the same sum in ONE kernel launch: it copies the
local input into this rank's symmetric buffer, waits for every peer at a device barrier, loads
every peer's buffer over NVLink and sums them in rank order 0..W-1 (so every rank gets the same
bits), and barriers again before the buffer may be reused. This module keeps one such buffer per
(group, device) and calls that op; ``flash_all_reduce`` takes it for the sizes where it was
measured faster than NCCL (``SYMM_EXACT_FASTER`` there), else NCCL.

Restrictions (the op's): fp32 or bf16, a whole number of 4-byte words, at most ``MAX_BYTES``, CUDA peers of one NVLink island
(no multicast needed). ``usable`` says whether a tensor qualifies, from what every rank of an
all-reduce shares (dtype, size, world, software) and never from its address, so all ranks take
the same path (a rank on NCCL while its peer waits at a device barrier would hang both); an
input the op cannot take as it is (not contiguous, not 16-byte aligned) goes through an aligned
copy. Sum in the input dtype (as NCCL's bf16 all-reduce): on 2 ranks a + b rounded once, bit for
bit NCCL's result.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from catkit.dist.symm_all_reduce import symm_available

DTYPES = (torch.float32, torch.bfloat16)
MAX_BYTES = 8 << 20  # the buffer per (group, device): the measured wins lie far below it
_BUFFERS: dict = {}


@functools.lru_cache(maxsize=None)
def _op():
    """torch's one-shot op, or None where this torch lacks it (looked up once)."""
    return getattr(getattr(torch.ops, "symm_mem", None), "one_shot_all_reduce_copy_out", None)


def usable(x: torch.Tensor, world: int) -> bool:
    """Whether ``symm_exact_all_reduce`` can take ``x`` (else the caller uses NCCL)."""
    nbytes = x.numel() * x.element_size()
    # the op's kernels move at least 4-byte words: a 2-byte bf16 tail is refused (measured, torch 2.11)
    return (x.is_cuda and x.dtype in DTYPES and 2 <= world <= 8 and nbytes <= MAX_BYTES and nbytes % 4 == 0
            and symm_available() is None and _op() is not None)


def _buffer(group, device: torch.device):
    """(symmetric uint8 buffer of MAX_BYTES, group name), allocated and exchanged once."""
    pg = group if group is not None else dist.group.WORLD
    key = (pg, device)
    hit = _BUFFERS.get(key)
    if hit is None:
        import torch.distributed._symmetric_memory as symm_mem

        buf = symm_mem.empty(MAX_BYTES, dtype=torch.uint8, device=device)
        symm_mem.rendezvous(buf, pg.group_name)
        hit = _BUFFERS[key] = (buf, pg.group_name)
    return hit


def clear_buffers() -> None:
    """Drop the symmetric buffers (call on every rank alike; ``catkit.dist.clear_plan_cache``
    does, also at exit)."""
    _BUFFERS.clear()


def symm_exact_all_reduce(x: torch.Tensor, group=None, *, inplace: bool = False) -> torch.Tensor:
    """Sum ``x`` over ``group`` exactly (in ``x``'s dtype) with one symmetric-memory kernel.

    ``x``: as ``usable`` requires (check it first: this raises ValueError naming ``x`` otherwise).
    Returns a new tensor, or ``x`` itself with ``inplace``. No autograd.
    """
    world = dist.get_world_size(group)
    if not usable(x, world):
        raise ValueError(f"x: the one-shot symmetric all-reduce needs a CUDA fp32/bf16 tensor of at most {MAX_BYTES} "
                         f"bytes on 2..8 ranks with torch symmetric memory; got {x.dtype} {tuple(x.shape)} on "
                         f"{x.device}, world {world}")
    return symm_exact_checked(x, group, inplace)


def symm_exact_checked(x: torch.Tensor, group, inplace: bool) -> torch.Tensor:
    """``symm_exact_all_reduce`` once ``usable(x, world)`` has said yes (``flash_all_reduce``'s
    fallback asks it first: the small messages this serves are latency bound)."""
    buf, name = _buffer(group, x.device)
    direct = x.is_contiguous() and x.data_ptr() % 16 == 0  # the op's vector width is 16 bytes
    src = x.view(-1) if direct else x.clone(memory_format=torch.contiguous_format).view(-1)  # fresh: aligned
    # each thread copies and later writes the same elements, and peers read only the symmetric
    # buffer, so the output may alias the input
    out = src if (inplace or not direct) else torch.empty_like(src)
    _op()(buf.view(x.dtype)[:src.numel()], src, "sum", name, out)
    if inplace:
        if not direct:
            x.copy_(out.view(x.shape))
        return x
    return out.view(x.shape)
