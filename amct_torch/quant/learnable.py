"""Learnable fake quantization for QAT: ULQ (AMCT's ``ulq_quantize`` / ``ulq_retrain``) and LSQ+.

Both are autograd functions with the published gradients written out (not left to autograd through
``round``), so they can be checked against hand-computed values.

**ULQ** learns the clip range ``[clip_min, clip_max]``. Asymmetric: ``s = (clip_max - clip_min) / (2^b - 1)``,
``o = round(-2^(b-1) - clip_min / s)``; symmetric: ``s = clip_max / (2^(b-1) - 1)``, ``o = 0``; ``fixed_min``
pins ``clip_min`` at 0. Forward ``x' = (clip(round(x/s) + o, qmin, qmax) - o) * s``, range
``[lower, upper] = [(qmin - o) s, (qmax - o) s]``. Backward, with ``r = round(x/s) - x/s`` inside the range::

    dL/dx        = g                                  inside, 0 outside
    dL/dclip_max = sum g * (r * ds/dclip_max [inside] + 1 [x > upper] + qmin/qmax [x < lower, symmetric])
    dL/dclip_min = sum g * (-r / (2^b - 1)   [inside] + 1 [x < lower])

with ``ds/dclip_max = 1/(2^b - 1)`` (asymmetric) or ``1/qmax`` (symmetric): AMCT's formulas
(``grad_clip_max = sum((round(x/s) - x/s)/(2^b - 1) + 1[x > upper]) g``) with the residual taken on the
clipped input, where it is zero outside the range.

**LSQ+** learns the scale ``s`` and the offset ``beta`` (the real value of code 0; the integer offset is
``o = round(-beta/s)``, so what trains is what deploys)::

    dL/dx    = g inside, 0 outside
    dL/ds    = gs * sum g * (r [inside] + qmin [x < lower] + qmax [x > upper])
    dL/dbeta = gs * sum g * (1 [outside])

with LSQ's gradient scale ``gs = 1 / sqrt(N * qmax)`` (``N`` elements per scale).

**Positive, finite scales by construction.** The parameters are free, but the forward uses
``clip_max >= 0 >= clip_min``, ``s >= 1e-8`` and replaces non-finite values, so a learned scale is never
negative, zero or NaN whatever an optimizer does to the parameter; gradients flowing back are made finite
(a NaN gradient would poison the parameter and the optimizer state).
"""

from __future__ import annotations

import math

import torch

from .formulas import qrange

__all__ = ["ulq_fake_quant", "ulq_factors", "lsq_fake_quant", "lsq_factors", "MIN_SCALE"]

MIN_SCALE = 1e-8
_BIG = 3.0e38


def _finite(t: torch.Tensor, nan: float) -> torch.Tensor:
    return torch.nan_to_num(t.detach(), nan=nan, posinf=_BIG, neginf=-_BIG)


def _clean(g: torch.Tensor | None) -> torch.Tensor | None:
    return None if g is None else torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)


def _per_tensor_sums(g: torch.Tensor, x: torch.Tensor, s: torch.Tensor, lower: torch.Tensor,
                     upper: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """One scale for the whole tensor: ``(g inside, sum g*r inside, sum g above, sum g below)``, or None.

    The same quantities as the masked formulas in the backward passes below, computed with the fused
    select kernels of ReLU6/ReLU (``hardtanh_backward``: ``g`` where ``lo < x < hi``; ``threshold_backward``:
    ``g`` where ``x > t``) instead of boolean masks and ``torch.where``, which on the CPU cost 3-20 times an
    arithmetic pass: this backward is a few passes over ``x`` instead of about twenty. ``lo``/``hi`` are the
    neighbouring floats just outside ``[lower, upper]``, so the strict kernels select the closed range.
    Other dtypes and per-channel scales return None (the generic path).
    """
    if s.numel() != 1 or x.dtype not in (torch.float32, torch.float64):
        return None
    inf = torch.tensor(float("inf"), dtype=x.dtype, device=x.device)
    lower, upper = lower.reshape(()).to(x.dtype), upper.reshape(()).to(x.dtype)
    lo, hi, up = torch.stack([torch.nextafter(lower, -inf), torch.nextafter(upper, inf), upper]).tolist()
    select = torch.ops.aten.hardtanh_backward
    gx = select(g, x, lo, hi)
    xs = x / s
    r = select(xs.round().sub_(xs), x, lo, hi)
    g_r = torch.sum(gx * r)
    g_above = torch.ops.aten.threshold_backward(g, x, up).sum()
    g_below = g.sum() - gx.sum() - g_above          # inside, above and below partition every x (NaN: inside)
    return gx, g_r, g_above, g_below


# -- ULQ ---------------------------------------------------------------------------------------
def ulq_factors(clip_max: torch.Tensor, clip_min: torch.Tensor | None, bits: int,
                symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and (integer-valued) offset from the clips, as the forward uses them."""
    qmin, qmax = qrange(bits)
    cmax = _finite(clip_max, 1.0).clamp(min=0.0)
    if symmetric:
        s = (cmax / qmax).clamp(min=MIN_SCALE)
        return s, torch.zeros_like(s)
    cmin = torch.zeros_like(cmax) if clip_min is None else _finite(clip_min, 0.0).clamp(max=0.0)
    s = ((cmax - cmin) / (2 ** bits - 1)).clamp(min=MIN_SCALE)
    o = torch.round(qmin - cmin / s).clamp(qmin, qmax)
    return s, o


class _Ulq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, clip_max, clip_min, bits: int, symmetric: bool):  # type: ignore[override]
        qmin, qmax = qrange(bits)
        s, o = ulq_factors(clip_max, clip_min, bits, symmetric)
        s, o = s.to(x.dtype), o.to(x.dtype)
        y = (x / s).round_().add_(o).clamp_(qmin, qmax).sub_(o).mul_(s)  # in place: one new tensor
        ctx.save_for_backward(x, s, o)
        ctx.bits, ctx.symmetric, ctx.has_min = bits, symmetric, clip_min is not None
        ctx.shapes = (clip_max.shape, None if clip_min is None else clip_min.shape)
        return y

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        x, s, o = ctx.saved_tensors
        qmin, qmax = qrange(ctx.bits)
        lower, upper = (qmin - o) * s, (qmax - o) * s
        fast = _per_tensor_sums(g, x, s, lower, upper)
        if fast is not None:
            gx, g_r, g_above, g_below = fast
            if ctx.symmetric:
                gmax = g_r / qmax + g_above + g_below * (qmin / qmax)
                return gx, _clean(gmax.reshape(ctx.shapes[0])), None, None, None
            levels = 2 ** ctx.bits - 1
            gmin = _clean((g_below - g_r / levels).reshape(ctx.shapes[1])) if ctx.has_min else None
            return gx, _clean((g_r / levels + g_above).reshape(ctx.shapes[0])), gmin, None, None
        below, above = x < lower, x > upper
        inside = ~(below | above)
        xs = x / s
        r = torch.where(inside, torch.round(xs) - xs, torch.zeros_like(x))
        gx = g * inside
        if ctx.symmetric:
            gmax = g * (r / qmax + above.to(g.dtype) + below.to(g.dtype) * (qmin / qmax))
            gmin = None
        else:
            levels = 2 ** ctx.bits - 1
            gmax = g * (r / levels + above.to(g.dtype))
            gmin = g * (below.to(g.dtype) - r / levels) if ctx.has_min else None
        gmax = _clean(gmax.sum_to_size(ctx.shapes[0]))
        if gmin is not None:
            gmin = _clean(gmin.sum_to_size(ctx.shapes[1]))
        return gx, gmax, gmin, None, None


def ulq_fake_quant(x: torch.Tensor, clip_max: torch.Tensor, clip_min: torch.Tensor | None, bits: int,
                   symmetric: bool = False) -> torch.Tensor:
    """ULQ fake quantization; ``clip_min=None`` with ``symmetric=False`` is ``fixed_min`` (lower clip 0).

    ``clip_max``/``clip_min`` broadcast against ``x`` (per-channel: shaped like the channel axis).
    """
    return _Ulq.apply(x, clip_max, clip_min, bits, symmetric)


# -- LSQ+ --------------------------------------------------------------------------------------
def lsq_factors(scale: torch.Tensor, beta: torch.Tensor | None, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer offset from LSQ+'s parameters (``beta=None``: symmetric, offset 0)."""
    qmin, qmax = qrange(bits)
    s = _finite(scale, 1.0).clamp(min=MIN_SCALE)
    if beta is None:
        return s, torch.zeros_like(s)
    o = torch.round(-_finite(beta, 0.0) / s).clamp(qmin, qmax)
    return s, o


class _Lsq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, beta, bits: int, grad_scale: float):  # type: ignore[override]
        qmin, qmax = qrange(bits)
        s, o = lsq_factors(scale, beta, bits)
        s, o = s.to(x.dtype), o.to(x.dtype)
        y = (x / s).round_().add_(o).clamp_(qmin, qmax).sub_(o).mul_(s)  # in place: one new tensor
        ctx.save_for_backward(x, s, o)
        ctx.bits, ctx.grad_scale = bits, grad_scale
        ctx.shapes = (scale.shape, None if beta is None else beta.shape)
        return y

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        x, s, o = ctx.saved_tensors
        qmin, qmax = qrange(ctx.bits)
        lower, upper = (qmin - o) * s, (qmax - o) * s
        gs = ctx.grad_scale
        fast = _per_tensor_sums(g, x, s, lower, upper)
        if fast is not None:
            gx, g_r, g_above, g_below = fast
            gscale = _clean(((g_r + g_below * qmin + g_above * qmax) * gs).reshape(ctx.shapes[0]))
            gbeta = None if ctx.shapes[1] is None else _clean(((g_below + g_above) * gs).reshape(ctx.shapes[1]))
            return gx, gscale, gbeta, None, None
        below, above = x < lower, x > upper
        inside = ~(below | above)
        xs = x / s
        r = torch.where(inside, torch.round(xs) - xs, torch.zeros_like(x))
        gscale = _clean((g * (r + below.to(g.dtype) * qmin + above.to(g.dtype) * qmax)).sum_to_size(ctx.shapes[0]) * gs)
        gbeta = None
        if ctx.shapes[1] is not None:
            gbeta = _clean((g * (~inside).to(g.dtype)).sum_to_size(ctx.shapes[1]) * gs)
        return g * inside, gscale, gbeta, None, None


def lsq_fake_quant(x: torch.Tensor, scale: torch.Tensor, beta: torch.Tensor | None, bits: int,
                   grad_scale: float | None = None) -> torch.Tensor:
    """LSQ+ fake quantization (``beta=None``: symmetric LSQ). ``grad_scale`` defaults to LSQ's
    ``1/sqrt(N * qmax)`` with ``N`` the elements per scale value."""
    if grad_scale is None:
        n = max(1, x.numel() // max(1, scale.numel()))
        grad_scale = 1.0 / math.sqrt(n * qrange(bits)[1])
    return _Lsq.apply(x, scale, beta, bits, grad_scale)
