"""Shared plumbing: devices and dtypes, Triton helpers, test helpers."""

from catkit.utils.device import default_device, resolve_dtype, check_tensor
from catkit.utils.testing import assert_close, rel_rms

__all__ = ["default_device", "resolve_dtype", "check_tensor", "assert_close", "rel_rms"]
