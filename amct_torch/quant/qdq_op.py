"""``torch.ops.amct.fake_quant``: quantize-dequantize as one op, so exporters can map it to Q/DQ.

``fake_quant(x, scale, zero_point, axis, qmin, qmax) = (clip(round(x / scale + zp), qmin, qmax) - zp) * scale``,
per tensor (one scale) or per ``axis``. Its semantics are ONNX ``QuantizeLinear`` followed by
``DequantizeLinear`` (division by the scale, round half to even, saturation), so the ONNX export (see
``amct_torch.export.onnx_qdq``) translates it to exactly that pair. ``zero_point``'s dtype (int8,
uint8, int16) is the integer type of the Q/DQ pair.
"""

from __future__ import annotations

import torch

__all__ = ["fake_quant"]


@torch.library.custom_op("amct::fake_quant", mutates_args=())
def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int, qmin: int,
               qmax: int) -> torch.Tensor:
    if scale.numel() > 1:
        shape = [1] * x.dim()
        shape[axis] = -1
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    zp = zero_point.to(x.dtype)
    return (torch.clamp(torch.round(x / scale.to(x.dtype) + zp), qmin, qmax) - zp) * scale.to(x.dtype)


@fake_quant.register_fake
def _(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int, qmin: int, qmax: int) -> torch.Tensor:
    return torch.empty_like(x)
