"""Group-wise asymmetric int8/int4 quantization (Flash Communication's codec).

``quantize`` / ``dequantize`` / ``fake_quantize`` are the Triton path (falls back to ``naive``
where Triton cannot run); ``naive`` holds the definition; ``layout`` the byte layout.
"""

from catkit.ops.quant import naive
from catkit.ops.quant.groupwise import (
    dequantize,
    dequantize_fwd,
    fake_quantize,
    quantize,
    quantize_fwd,
    reduce_requantize_fwd,
)
from catkit.ops.quant.layout import QTensor, QuantLayout, pack_int4, unpack_int4

__all__ = [
    "QTensor", "QuantLayout", "dequantize", "dequantize_fwd", "fake_quantize", "naive", "pack_int4",
    "quantize", "quantize_fwd", "reduce_requantize_fwd", "unpack_int4",
]
