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

import numpy as np
import torch

from .formulas import qrange

__all__ = ["ulq_fake_quant", "ulq_fake_quant_with_factors", "ulq_factors", "lsq_fake_quant",
           "lsq_fake_quant_with_factors", "lsq_factors", "MIN_SCALE"]

MIN_SCALE = 1e-8
_BIG = 3.0e38


def _finite(t: torch.Tensor, nan: float) -> torch.Tensor:
    return torch.nan_to_num(t.detach(), nan=nan, posinf=_BIG, neginf=-_BIG)


def _clean(g: torch.Tensor | None) -> torch.Tensor | None:
    return None if g is None else torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)


# -- factors as Python scalars -----------------------------------------------------------------
# A training step runs every activation quantizer once; computing its two factors with tensor ops costs
# about ten tiny kernel launches each time (more than the fake quantization of a small activation). For
# one-element parameters on the CPU the same float32 arithmetic is done on NumPy scalars instead (IEEE
# float32 like the tensor ops, round half to even like ``torch.round``); a test checks both paths agree.
_NP = {torch.float32: np.float32, torch.float64: np.float64}


def _scalar_path(x: torch.Tensor, *params: torch.Tensor | None) -> bool:
    return x.dtype in _NP and all(p is None or (p.numel() == 1 and p.device.type == "cpu") for p in params)


def _np_finite(t: torch.Tensor, nan: float) -> np.float32:
    v = t.item()
    return np.float32(nan if math.isnan(v) else max(-_BIG, min(_BIG, v)))


def _ulq_scalars(clip_max: torch.Tensor, clip_min: torch.Tensor | None, bits: int,
                 symmetric: bool) -> tuple[np.float32, np.float32]:
    """:func:`ulq_factors` on one-element CPU parameters, as float32 scalars."""
    qmin, qmax = qrange(bits)
    f = np.float32
    with np.errstate(all="ignore"):
        cmax = max(_np_finite(clip_max, 1.0), f(0.0))
        if symmetric:
            return max(cmax / f(qmax), f(MIN_SCALE)), f(0.0)
        cmin = f(0.0) if clip_min is None else min(_np_finite(clip_min, 0.0), f(0.0))
        s = max((cmax - cmin) / f(2 ** bits - 1), f(MIN_SCALE))
        o = np.clip(np.round(f(qmin) - cmin / s), f(qmin), f(qmax))
    return s, o


def _lsq_scalars(scale: torch.Tensor, beta: torch.Tensor | None, bits: int) -> tuple[np.float32, np.float32]:
    """:func:`lsq_factors` on one-element CPU parameters, as float32 scalars."""
    qmin, qmax = qrange(bits)
    f = np.float32
    with np.errstate(all="ignore"):
        s = max(_np_finite(scale, 1.0), f(MIN_SCALE))
        if beta is None:
            return s, f(0.0)
        return s, np.clip(np.round(-_np_finite(beta, 0.0) / s), f(qmin), f(qmax))


def _fake_quant(x: torch.Tensor, s: torch.Tensor | float, o: torch.Tensor | float, qmin: int, qmax: int) -> torch.Tensor:
    """``(clip(round(x/s) + o, qmin, qmax) - o) * s`` in four passes over ``x``.

    Written as ``clip(round(x/s), qmin - o, qmax - o) * s``: ``o`` is integer-valued, so adding and
    subtracting it around the clip is exact and can be folded into the clip bounds.
    """
    return torch.div(x, s).round_().clamp_(qmin - o, qmax - o).mul_(s)


def _per_tensor_sums(g: torch.Tensor, x: torch.Tensor, s: float, lower: float, upper: float,
                     need_below: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """One scale for the whole tensor: ``(g inside, sum g*r inside, sum g above, sum g below)``, or None.

    The same quantities as the masked formulas in the backward passes below, computed with the fused
    select kernels of ReLU6/ReLU (``hardtanh_backward``: ``g`` where ``lo < x < hi``; ``threshold_backward``:
    ``g`` where ``x > t``) instead of boolean masks and ``torch.where``, which on the CPU cost 3-20 times an
    arithmetic pass, and with ``sum g*r`` as one dot product of the selected gradient with the selected
    residual: about eight passes over ``x`` instead of about twenty. ``lo``/``hi`` are the
    neighbouring floats just outside ``[lower, upper]``, so the strict kernels select the closed range.
    ``sum g below`` is only computed when ``need_below`` (ULQ with ``fixed_min`` does not use it).
    Other dtypes and non-contiguous tensors return None (the generic path).
    """
    if x.dtype not in _NP or not (g.is_contiguous() and x.is_contiguous()):
        return None
    ft = _NP[x.dtype]
    lo = float(np.nextafter(ft(lower), ft(-np.inf)))
    hi = float(np.nextafter(ft(upper), ft(np.inf)))
    select = torch.ops.aten.hardtanh_backward
    gx = select(g, x, lo, hi)
    xs = torch.div(x, s)
    r = select(xs.round().sub_(xs), x, lo, hi)   # masked too: at x = +-inf, r is NaN and 0 * NaN = NaN
    g_r = torch.dot(gx.reshape(-1), r.reshape(-1))
    g_above = torch.ops.aten.threshold_backward(g, x, float(upper)).sum()
    g_below = g.sum() - gx.sum() - g_above if need_below else None  # inside, above, below partition every x
    return gx, g_r, g_above, g_below


def _bounds(s: torch.Tensor | float, o: torch.Tensor | float, qmin: int, qmax: int,
            dtype: torch.dtype) -> tuple[float, float] | None:
    """``(lower, upper) = ((qmin - o) s, (qmax - o) s)`` as Python floats in ``dtype``'s arithmetic, or None
    for per-channel factors."""
    if isinstance(s, torch.Tensor):
        if s.numel() != 1 or dtype not in _NP:
            return None
        s, o = s.item(), o.item()
    ft = _NP.get(dtype, np.float32)
    with np.errstate(all="ignore"):
        return float(ft(qmin - o) * ft(s)), float(ft(qmax - o) * ft(s))


def _save(ctx, x: torch.Tensor, s: torch.Tensor | float, o: torch.Tensor | float) -> None:
    """Keep what the backward needs: ``x``, and the factors (tensors saved, Python floats on ``ctx``)."""
    if isinstance(s, torch.Tensor):
        ctx.save_for_backward(x, s, o)
    else:
        ctx.save_for_backward(x)
        ctx.so = (s, o)


def _saved(ctx) -> tuple[torch.Tensor, torch.Tensor | float, torch.Tensor | float]:
    x, *so = ctx.saved_tensors
    s, o = so if so else ctx.so
    return x, s, o


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


def _ulq_forward_factors(x: torch.Tensor, clip_max: torch.Tensor, clip_min: torch.Tensor | None, bits: int,
                         symmetric: bool) -> tuple[torch.Tensor | float, torch.Tensor | float]:
    if _scalar_path(x, clip_max, clip_min):
        s, o = _ulq_scalars(clip_max, clip_min, bits, symmetric)
        return float(s), float(o)
    s, o = ulq_factors(clip_max, clip_min, bits, symmetric)
    return s.to(x.dtype), o.to(x.dtype)


class _Ulq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, clip_max, clip_min, bits: int, symmetric: bool, factors=None):  # type: ignore[override]
        qmin, qmax = qrange(bits)
        s, o = factors if factors is not None else _ulq_forward_factors(x, clip_max, clip_min, bits, symmetric)
        y = _fake_quant(x, s, o, qmin, qmax)
        _save(ctx, x, s, o)
        ctx.bits, ctx.symmetric, ctx.has_min = bits, symmetric, clip_min is not None
        ctx.shapes = (clip_max.shape, None if clip_min is None else clip_min.shape)
        return y

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        x, s, o = _saved(ctx)
        qmin, qmax = qrange(ctx.bits)
        bounds = _bounds(s, o, qmin, qmax, x.dtype)
        fast = None
        if bounds is not None:
            fast = _per_tensor_sums(g.contiguous(), x, float(s), *bounds, need_below=ctx.symmetric or ctx.has_min)
        if fast is not None:
            gx, g_r, g_above, g_below = fast
            if ctx.symmetric:
                gmax = g_r / qmax + g_above + g_below * (qmin / qmax)
                return gx, _clean(gmax.reshape(ctx.shapes[0])), None, None, None, None
            levels = 2 ** ctx.bits - 1
            gmin = _clean((g_below - g_r / levels).reshape(ctx.shapes[1])) if ctx.has_min else None
            return gx, _clean((g_r / levels + g_above).reshape(ctx.shapes[0])), gmin, None, None, None
        lower, upper = (qmin - o) * s, (qmax - o) * s
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
        return gx, gmax, gmin, None, None, None


def ulq_fake_quant(x: torch.Tensor, clip_max: torch.Tensor, clip_min: torch.Tensor | None, bits: int,
                   symmetric: bool = False) -> torch.Tensor:
    """ULQ fake quantization; ``clip_min=None`` with ``symmetric=False`` is ``fixed_min`` (lower clip 0).

    ``clip_max``/``clip_min`` broadcast against ``x`` (per-channel: shaped like the channel axis).
    """
    return _Ulq.apply(x, clip_max, clip_min, bits, symmetric)


def ulq_fake_quant_with_factors(x: torch.Tensor, clip_max: torch.Tensor, clip_min: torch.Tensor | None, bits: int,
                                symmetric: bool = False) -> tuple[torch.Tensor, float | torch.Tensor, float | torch.Tensor]:
    """:func:`ulq_fake_quant`, also returning the scale and offset it used (Python floats for one-element
    CPU clips, tensors otherwise), so a caller that records them does not compute them twice."""
    s, o = _ulq_forward_factors(x, clip_max, clip_min, bits, symmetric)
    return _Ulq.apply(x, clip_max, clip_min, bits, symmetric, (s, o)), s, o


# -- LSQ+ --------------------------------------------------------------------------------------
def lsq_factors(scale: torch.Tensor, beta: torch.Tensor | None, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer offset from LSQ+'s parameters (``beta=None``: symmetric, offset 0)."""
    qmin, qmax = qrange(bits)
    s = _finite(scale, 1.0).clamp(min=MIN_SCALE)
    if beta is None:
        return s, torch.zeros_like(s)
    o = torch.round(-_finite(beta, 0.0) / s).clamp(qmin, qmax)
    return s, o


def _lsq_forward_factors(x: torch.Tensor, scale: torch.Tensor, beta: torch.Tensor | None,
                         bits: int) -> tuple[torch.Tensor | float, torch.Tensor | float]:
    if _scalar_path(x, scale, beta):
        s, o = _lsq_scalars(scale, beta, bits)
        return float(s), float(o)
    s, o = lsq_factors(scale, beta, bits)
    return s.to(x.dtype), o.to(x.dtype)


class _Lsq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, beta, bits: int, grad_scale: float, factors=None):  # type: ignore[override]
        qmin, qmax = qrange(bits)
        s, o = factors if factors is not None else _lsq_forward_factors(x, scale, beta, bits)
        y = _fake_quant(x, s, o, qmin, qmax)
        _save(ctx, x, s, o)
        ctx.bits, ctx.grad_scale = bits, grad_scale
        ctx.shapes = (scale.shape, None if beta is None else beta.shape)
        return y

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        x, s, o = _saved(ctx)
        qmin, qmax = qrange(ctx.bits)
        gs = ctx.grad_scale
        bounds = _bounds(s, o, qmin, qmax, x.dtype)
        fast = None if bounds is None else _per_tensor_sums(g.contiguous(), x, float(s), *bounds, need_below=True)
        if fast is not None:
            gx, g_r, g_above, g_below = fast
            gscale = _clean(((g_r + g_below * qmin + g_above * qmax) * gs).reshape(ctx.shapes[0]))
            gbeta = None if ctx.shapes[1] is None else _clean(((g_below + g_above) * gs).reshape(ctx.shapes[1]))
            return gx, gscale, gbeta, None, None, None
        lower, upper = (qmin - o) * s, (qmax - o) * s
        below, above = x < lower, x > upper
        inside = ~(below | above)
        xs = x / s
        r = torch.where(inside, torch.round(xs) - xs, torch.zeros_like(x))
        gscale = _clean((g * (r + below.to(g.dtype) * qmin + above.to(g.dtype) * qmax)).sum_to_size(ctx.shapes[0]) * gs)
        gbeta = None
        if ctx.shapes[1] is not None:
            gbeta = _clean((g * (~inside).to(g.dtype)).sum_to_size(ctx.shapes[1]) * gs)
        return g * inside, gscale, gbeta, None, None, None


def _lsq_grad_scale(x: torch.Tensor, scale: torch.Tensor, bits: int, grad_scale: float | None) -> float:
    if grad_scale is None:
        n = max(1, x.numel() // max(1, scale.numel()))
        grad_scale = 1.0 / math.sqrt(n * qrange(bits)[1])
    return grad_scale


def lsq_fake_quant(x: torch.Tensor, scale: torch.Tensor, beta: torch.Tensor | None, bits: int,
                   grad_scale: float | None = None) -> torch.Tensor:
    """LSQ+ fake quantization (``beta=None``: symmetric LSQ). ``grad_scale`` defaults to LSQ's
    ``1/sqrt(N * qmax)`` with ``N`` the elements per scale value."""
    return _Lsq.apply(x, scale, beta, bits, _lsq_grad_scale(x, scale, bits, grad_scale))


def lsq_fake_quant_with_factors(x: torch.Tensor, scale: torch.Tensor, beta: torch.Tensor | None, bits: int,
                                grad_scale: float | None = None) -> tuple[torch.Tensor, float | torch.Tensor, float | torch.Tensor]:
    """:func:`lsq_fake_quant`, also returning the scale and offset it used (see
    :func:`ulq_fake_quant_with_factors`)."""
    s, o = _lsq_forward_factors(x, scale, beta, bits)
    return _Lsq.apply(x, scale, beta, bits, _lsq_grad_scale(x, scale, bits, grad_scale), (s, o)), s, o
