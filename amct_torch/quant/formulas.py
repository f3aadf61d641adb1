"""AMCT's quantization formulas, bit for bit.

``q = clip(round(x / scale + offset), qmin, qmax)`` and ``x' = (q - offset) * scale`` with
``qmin, qmax = -2^(b-1), 2^(b-1) - 1``. The scale is a *divisor*; rounding is half-to-even (as
``torch.round`` and ONNX ``QuantizeLinear``).

Scale and offset from a range ``[lo, hi]``:

* symmetric: ``scale = hi / (2^(b-1) - 1)`` when ``|hi| >= |lo|``, else ``|lo| / 2^(b-1)`` (the full
  negative range); ``offset = 0``;
* asymmetric: ``hi = max(hi, 0)``, ``lo = min(lo, 0)``; ``scale = (hi - lo) / (2^b - 1)``;
  ``offset = round(-2^(b-1) - lo / scale)``;
* a scale below float32 epsilon becomes 1 (and the asymmetric offset ``-2^(b-1)``).
"""

from __future__ import annotations

import torch

__all__ = ["qrange", "scale_offset", "quantize", "dequantize", "fake_quantize", "FLT_EPSILON", "channel_major",
           "from_channel_major", "channel_shape"]

FLT_EPSILON = float(torch.finfo(torch.float32).eps)


def qrange(bits: int) -> tuple[int, int]:
    """Signed integer range of ``bits``: ``(-2^(b-1), 2^(b-1) - 1)``."""
    if not isinstance(bits, int) or not 2 <= bits <= 32:
        raise ValueError(f"bits: got {bits!r}; allowed: an int in 2..32")
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def scale_offset(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float32) and integer offset (int32) for ranges ``[lo, hi]`` (elementwise: per tensor or per channel)."""
    lo = torch.as_tensor(lo, dtype=torch.float64)
    hi = torch.as_tensor(hi, dtype=torch.float64)
    qmin, qmax = qrange(bits)
    if symmetric:
        pos, neg = hi.abs(), lo.abs()
        scale = torch.where(pos >= neg, pos / qmax, neg / -qmin)
        scale = scale.float()
        scale = torch.where(scale < FLT_EPSILON, torch.ones_like(scale), scale)
        return scale, torch.zeros_like(scale, dtype=torch.int32)
    hi = torch.clamp(hi, min=0.0)
    lo = torch.clamp(lo, max=0.0)
    scale = ((hi - lo) / ((1 << bits) - 1)).float()
    small = scale < FLT_EPSILON
    scale = torch.where(small, torch.ones_like(scale), scale)
    offset = torch.round(qmin - lo / scale.double())
    offset = torch.where(small, torch.full_like(offset, qmin), offset)
    return scale, torch.clamp(offset, qmin, qmax).to(torch.int32)


def quantize(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer values (as ``x``'s float dtype) ``clip(round(x / scale + offset), qmin, qmax)``."""
    qmin, qmax = qrange(bits)
    return torch.clamp(torch.round(x / scale + offset.to(x.dtype)), qmin, qmax)


def dequantize(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """``(q - offset) * scale``."""
    return (q - offset.to(scale.dtype)) * scale


class _FakeQuantSTE(torch.autograd.Function):
    """Fake quantization with a straight-through estimator: the gradient of ``x`` passes inside the
    clip range and is zero outside; scale and offset receive none (they are fixed here).

    ``offset=None`` is the symmetric case (offset 0, two passes fewer). The backward selects with
    ``hardtanh_backward`` on the integer values ``v`` (inside is ``qmin - 0.5 < v < qmax + 0.5``) rather
    than multiplying by a boolean mask, which on the CPU costs several times an arithmetic pass.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, bits: int) -> torch.Tensor:  # type: ignore[override]
        qmin, qmax = qrange(bits)
        v = torch.div(x, scale)
        if offset is None:
            v.round_()
            ctx.save_for_backward(v)
            ctx.bits = bits
            return torch.clamp(v, qmin, qmax).mul_(scale)
        o = offset.to(x.dtype)
        v.add_(o).round_()
        ctx.save_for_backward(v)
        ctx.bits = bits
        return torch.clamp(v, qmin, qmax).sub_(o).mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (v,) = ctx.saved_tensors
        qmin, qmax = qrange(ctx.bits)
        return torch.ops.aten.hardtanh_backward(grad, v, qmin - 0.5, qmax + 0.5), None, None, None


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, bits: int) -> torch.Tensor:
    """``dequantize(quantize(x))`` with a straight-through gradient for ``x``.

    ``scale``/``offset`` broadcast against ``x`` (use :func:`channel_shape` for per-channel tensors);
    ``offset=None``: symmetric (offset 0).
    """
    return _FakeQuantSTE.apply(x, scale.to(x.dtype), offset, bits)


# -- per-channel layout ------------------------------------------------------------------------
def channel_major(w: torch.Tensor, axis: int, groups: int = 1) -> torch.Tensor:
    """``w`` as ``(C_out, -1)``: one row per output channel.

    ``axis`` is the output-channel axis of the weight. ConvTranspose weights ``(C_in, C_out/g, *k)``
    (axis 1, rank > 2) are regrouped so that row ``o = group * C_out/g + j`` holds output channel ``o``.
    """
    if axis == 1 and w.dim() > 2:
        c_in, c_out_g = w.shape[0], w.shape[1]
        v = w.reshape(groups, c_in // groups, c_out_g, *w.shape[2:]).transpose(1, 2)
        return v.reshape(groups * c_out_g, -1)
    return w.movedim(axis, 0).reshape(w.shape[axis], -1)


def from_channel_major(m: torch.Tensor, shape: torch.Size | tuple[int, ...], axis: int, groups: int = 1) -> torch.Tensor:
    """Inverse of :func:`channel_major`."""
    shape = tuple(shape)
    if axis == 1 and len(shape) > 2:
        c_in, c_out_g = shape[0], shape[1]
        v = m.reshape(groups, c_out_g, c_in // groups, *shape[2:]).transpose(1, 2)
        return v.reshape(shape)
    moved = (shape[axis],) + shape[:axis] + shape[axis + 1:]
    return m.reshape(moved).movedim(0, axis)


def channel_shape(per_channel: torch.Tensor, shape: torch.Size | tuple[int, ...], axis: int, groups: int = 1) -> torch.Tensor:
    """Reshape a per-output-channel vector so it broadcasts against a weight of ``shape``.

    For ConvTranspose with groups the result has the weight's own rank and is expanded per group.
    """
    if axis == 1 and len(shape) > 2:
        c_in, c_out_g = shape[0], shape[1]
        v = per_channel.reshape(groups, 1, c_out_g, *([1] * (len(shape) - 2)))
        return v.expand(groups, c_in // groups, c_out_g, *([1] * (len(shape) - 2))).reshape(c_in, c_out_g, *([1] * (len(shape) - 2)))
    view = [1] * len(shape)
    view[axis] = -1
    return per_channel.reshape(view)
