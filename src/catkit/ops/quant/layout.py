"""The byte layout of a group-wise quantized tensor, shared by ``naive.py`` and ``groupwise.py``.

A quantized tensor is one ``uint8`` buffer of shape ``[R, row_bytes]``: ``R`` rows ("ranks" in the
all-reduce), each holding one logical row of ``n`` values (``n % group_size == 0``) as

    [codes: n * bits / 8 bytes][scale: n/G][min: n/G]                  (meta_dtype each)
    (spike_reserve only)       [spike_lo: n/G][spike_hi: n/G]          (meta_dtype each)
                               [idx_lo: n/G][idx_hi: n/G]              (int16 each)
    [zero padding up to a multiple of 16 bytes]

Keeping codes and metadata of one row in one contiguous block means the all-reduce moves a row to
its owner with a single ``all_to_all_single`` / ``all_gather`` call instead of one call per field.
int4 codes are packed two per byte: element ``2i`` in the low nibble, ``2i + 1`` in the high one.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

BITS = (4, 8)
META_DTYPES = (torch.float32, torch.float16)
MIN_GROUP, MAX_GROUP = 32, 1024
_ALIGN = 16  # bytes; keeps every section aligned for fp32 views and for NCCL's vector copies


def check_quant_args(bits: int, group_size: int, meta_dtype: torch.dtype, *, name: str = "bits") -> None:
    """Raise ``ValueError`` naming the bad argument."""
    if bits not in BITS:
        raise ValueError(f"{name}: expected 4 or 8, got {bits!r}")
    if (not isinstance(group_size, int) or group_size < MIN_GROUP or group_size > MAX_GROUP
            or group_size & (group_size - 1)):
        raise ValueError(f"group_size: expected a power of two in [{MIN_GROUP}, {MAX_GROUP}], got {group_size!r}")
    if meta_dtype not in META_DTYPES:
        raise ValueError(f"meta_dtype: expected torch.float32 or torch.float16, got {meta_dtype!r}")


@dataclass(frozen=True)
class QuantLayout:
    """Where each field of one row lives, in bytes from the start of the row.

    Offsets are cached on first use (``cached_property`` writes the instance ``__dict__``, which a
    frozen dataclass allows): the all-reduce reads them on every call.
    """

    n: int  # values per row, a multiple of group_size
    bits: int
    group_size: int
    spike_reserve: bool = False
    meta_dtype: torch.dtype = torch.float32

    def __post_init__(self):
        check_quant_args(self.bits, self.group_size, self.meta_dtype)
        if self.n <= 0 or self.n % self.group_size:
            raise ValueError(f"n: expected a positive multiple of group_size={self.group_size}, got {self.n}")

    @cached_property
    def groups(self) -> int:
        return self.n // self.group_size

    @cached_property
    def code_bytes_per_group(self) -> int:
        return self.group_size * self.bits // 8

    @cached_property
    def meta_size(self) -> int:
        return self.meta_dtype.itemsize

    @cached_property
    def scale_off(self) -> int:
        return self.groups * self.code_bytes_per_group

    @cached_property
    def min_off(self) -> int:
        return self.scale_off + self.groups * self.meta_size

    @cached_property
    def lo_off(self) -> int:
        return self.min_off + self.groups * self.meta_size

    @cached_property
    def hi_off(self) -> int:
        return self.lo_off + self.groups * self.meta_size

    @cached_property
    def idx_lo_off(self) -> int:
        return self.hi_off + self.groups * self.meta_size

    @cached_property
    def idx_hi_off(self) -> int:
        return self.idx_lo_off + self.groups * 2

    @cached_property
    def row_bytes(self) -> int:
        end = self.idx_hi_off + self.groups * 2 if self.spike_reserve else self.lo_off
        return -(-end // _ALIGN) * _ALIGN

    def bits_per_value(self) -> float:
        """Bytes on the wire per value, times 8 (codes + metadata + padding)."""
        return 8.0 * self.row_bytes / self.n


@dataclass
class QTensor:
    """A quantized ``[R, n]`` tensor: ``data`` is the ``uint8 [R, row_bytes]`` buffer of ``layout``.

    The field properties are views into ``data`` (no copies), shaped ``[R, n / group_size]``
    (``codes``: ``[R, n * bits / 8]``).
    """

    data: torch.Tensor
    layout: QuantLayout
    numel: int  # how many leading values of the flattened [R * n] are real (the rest is padding)

    @property
    def rows(self) -> int:
        return self.data.shape[0]

    def _field(self, off: int, dtype: torch.dtype) -> torch.Tensor:
        size = dtype.itemsize
        return self.data[:, off: off + self.layout.groups * size].view(dtype)

    @property
    def codes(self) -> torch.Tensor:
        return self.data[:, : self.layout.scale_off]

    @property
    def scale(self) -> torch.Tensor:
        return self._field(self.layout.scale_off, self.layout.meta_dtype)

    @property
    def min(self) -> torch.Tensor:
        return self._field(self.layout.min_off, self.layout.meta_dtype)

    def _spike(self, off: int, dtype: torch.dtype) -> torch.Tensor:
        if not self.layout.spike_reserve:
            raise AttributeError("spike fields exist only when spike_reserve=True")
        return self._field(off, dtype)

    @property
    def spike_lo(self) -> torch.Tensor:
        return self._spike(self.layout.lo_off, self.layout.meta_dtype)

    @property
    def spike_hi(self) -> torch.Tensor:
        return self._spike(self.layout.hi_off, self.layout.meta_dtype)

    @property
    def idx_lo(self) -> torch.Tensor:
        return self._spike(self.layout.idx_lo_off, torch.int16)

    @property
    def idx_hi(self) -> torch.Tensor:
        return self._spike(self.layout.idx_hi_off, torch.int16)


def row_length(numel: int, rows: int, group_size: int) -> int:
    """Values per row when ``numel`` values are split over ``rows`` rows of whole groups."""
    per_row = max(1, -(-numel // rows))
    return -(-per_row // group_size) * group_size


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """``[..., 2k]`` integer codes in ``[0, 15]`` -> ``[..., k]`` uint8 (even index in the low nibble)."""
    if codes.shape[-1] % 2:
        raise ValueError(f"codes: last dim must be even to pack int4, got {tuple(codes.shape)}")
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: ``[..., k]`` uint8 -> ``[..., 2k]`` uint8 codes."""
    lo, hi = packed & 15, packed >> 4
    return torch.stack((lo, hi), dim=-1).flatten(-2)
