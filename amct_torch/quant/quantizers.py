"""Quantizer modules: the activation quantizer (input/output slots) and the ARQ weight stage.

Both keep their scale and offset in buffers, created when the model is prepared, so they travel in the
``state_dict`` and a calibrated model restores exactly.

``ActivationQuantizer`` has two phases. While calibrating it passes its input through unchanged and
feeds it to its calibrator; after ``batch_num`` batches it computes scale and offset and from then on
fake-quantizes. ``ArqWeightQuantizer`` computes per-channel (or per-tensor) symmetric scales from the
weight's min/max (AMCT's ARQ) when the layer is prepared, and fake-quantizes the weight in the
pipeline.

For ONNX export, the activation quantizer's ``onnx_mode`` runs ``torch.ops.amct.fake_quant``, which the
exporter turns into a standard QuantizeLinear/DequantizeLinear pair; weights are frozen by the exporter.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..config import Granularity, PerChannel, PerTensor
from .calibrators import Calibrator
from .formulas import FLT_EPSILON, channel_major, channel_shape, fake_quantize, qrange, scale_offset
from .qdq_op import fake_quant as fake_quant_op

__all__ = ["ActivationQuantizer", "ArqWeightQuantizer", "CalibrationError"]


class CalibrationError(RuntimeError):
    """A quantizer was asked for factors it does not have yet (too few calibration batches)."""


class ActivationQuantizer(nn.Module):
    """Per-tensor activation quantizer: calibrate for ``batch_num`` batches, then fake-quantize.

    Graph capture treats it as one call (``_amct_leaf``): its forward branches on its state.

    Args:
        bits: 4, 8 or 16.
        symmetric: offset fixed at 0 when true.
        calibrator: the observer that picks the clip range (min/max, percentile, IFMR, HFMG, MSE).
        batch_num: batches to observe before the factors are fixed.
    """

    _amct_leaf = True

    def __init__(self, bits: int, symmetric: bool, calibrator: Calibrator, batch_num: int = 1):
        super().__init__()
        self.bits, self.symmetric, self.batch_num = bits, symmetric, batch_num
        self.calibrator = calibrator
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("offset", torch.tensor(0, dtype=torch.int32))
        self.register_buffer("batches_seen", torch.tensor(0, dtype=torch.int64))
        self.register_buffer("calibrated", torch.tensor(False))
        self.onnx_mode = False
        self._tied: ActivationQuantizer | None = None
        #: ``(lo, hi)`` the input can never leave (set for a bounded producer, e.g. ReLU6: ``(0, 6)``): the
        #: calibrated range is cut to it, and an empty range (a tensor that was all zero) becomes it
        self.range_limit: tuple[float, float] | None = None

    @property
    def tied_to(self) -> "ActivationQuantizer | None":
        """The quantizer whose factors this one reuses (see :meth:`tie`), or None."""
        return self.__dict__.get("_tied")

    def tie(self, source: "ActivationQuantizer") -> None:
        """Reuse ``source``'s factors instead of calibrating.

        For a tensor that is already on ``source``'s grid (it passed ``source`` and then only ops that keep
        the grid: max-pool, flatten, reshape, identity), re-quantizing with the same factors changes
        nothing, so the model computes what it computed before, and in ONNX the tensor gets the same
        Q/DQ parameters on both sides of the grid-keeping op (what ONNX Runtime needs to run it in int8).
        """
        while source.tied_to is not None:
            source = source.tied_to
        if source is self:
            raise ValueError("a quantizer cannot be tied to itself")
        self.__dict__["_tied"] = source  # a plain attribute: not a submodule, not in the state_dict twice

    def _sync(self) -> bool:
        src = self.tied_to
        if src is not None and src.is_calibrated and not bool(self.calibrated):
            with torch.no_grad():
                self.bits, self.symmetric = src.bits, src.symmetric
                self.scale.copy_(src.scale)
                self.offset.copy_(src.offset)
                self.calibrated.fill_(True)
            return True
        return False

    @property
    def is_calibrated(self) -> bool:
        self._sync()
        return bool(self.calibrated)

    def set_onnx_mode(self, enabled: bool) -> None:
        """Export through ``torch.ops.amct.fake_quant`` (-> QuantizeLinear/DequantizeLinear) with fixed factors.

        8 bits: uint8 with zero point ``offset + 128`` (the same real values as int8 with ``offset``, and the
        type onnxruntime's x86 integer kernels are fastest with); 16 bits: int16; 4 bits: int8 values in
        [-8, 7], which the exporter stores as ONNX INT4 (opset 21).
        """
        if enabled and not self.is_calibrated:
            raise CalibrationError("cannot export an uncalibrated activation quantizer")
        self.onnx_mode = enabled
        offset = self.offset.detach().to(torch.int32)
        if self.bits == 8:
            zero_point, self._onnx_range = (offset + 128).to(torch.uint8), (0, 255)
        elif self.bits == 16:
            zero_point, self._onnx_range = offset.to(torch.int16), qrange(16)
        else:
            zero_point, self._onnx_range = offset.to(torch.int8), qrange(self.bits)
        self._onnx_factors = (self.scale.detach().clone(), zero_point) if enabled else None
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.onnx_mode:
            return fake_quant_op(x, *self._onnx_factors, 0, *self._onnx_range)
        if self.tied_to is not None:
            if self._sync() or not bool(self.calibrated):
                return x  # the source is still calibrating (or fixed its factors in this very batch)
            return fake_quantize(x, self.scale, self.offset, self.bits)
        if not self.is_calibrated:
            self.calibrator.observe(x)
            self.batches_seen += 1
            if int(self.batches_seen) >= self.batch_num:
                self.finalize()
            return x
        return fake_quantize(x, self.scale, self.offset, self.bits)

    def calibrated_range(self) -> tuple[float, float]:
        """The calibrator's clip range, cut to :attr:`range_limit`."""
        lo, hi = self.calibrator.clip_range(self.bits, self.symmetric)
        if self.range_limit is not None:
            a, b = self.range_limit
            lo, hi = max(lo, a), min(hi, b)
            degenerate = (hi - lo) / (2 ** self.bits - 1) < torch.finfo(torch.float32).eps  # -> scale 1
            if degenerate and math.isfinite(a) and math.isfinite(b):
                lo, hi = a, b
        return lo, hi

    @torch.no_grad()
    def finalize(self) -> None:
        """Compute scale and offset from what the calibrator has seen; switch to fake-quantization."""
        lo, hi = self.calibrated_range()
        scale, offset = scale_offset(torch.tensor(lo), torch.tensor(hi), self.bits, self.symmetric)
        self.scale.copy_(scale.reshape(()))
        self.offset.copy_(offset.reshape(()))
        self.calibrated.fill_(True)
        self.calibrator.release()

    def reset(self) -> None:
        """Start calibration again."""
        if self.tied_to is None:
            self.calibrator.reset()
        self.batches_seen.zero_()
        self.calibrated.fill_(False)

    def set_factors(self, scale: float, offset: int) -> None:
        """Load factors (e.g. from an AMCT record) and mark the quantizer calibrated."""
        self.scale.fill_(float(scale))
        self.offset.fill_(int(offset))
        self.calibrated.fill_(True)
        self.calibrator.release()

    def extra_repr(self) -> str:
        state = (f"scale={float(self.scale):.6g}, offset={int(self.offset)}" if self.is_calibrated
                 else f"calibrating {int(self.batches_seen)}/{self.batch_num}")
        how = "tied" if self.tied_to is not None else self.calibrator.name
        return f"bits={self.bits}, {'sym' if self.symmetric else 'asym'}, {how}, {state}"


class ArqWeightQuantizer(nn.Module):
    """ARQ weight stage: symmetric scales from the weight's per-channel (or per-tensor) min/max.

    ``axis``/``groups`` describe the weight layout (the wrapper's ``weight_channel_axis``; ConvTranspose
    groups are regrouped so that scale ``o`` belongs to output channel ``o``).
    """

    def __init__(self, weight: torch.Tensor, bits: int, granularity: Granularity, axis: int, groups: int = 1):
        super().__init__()
        if not isinstance(granularity, (PerTensor, PerChannel)):
            raise ValueError(f"weight granularity {granularity.to_plain()!r} is not supported by ARQ "
                             "(allowed: per_tensor, per_channel)")
        self.bits, self.axis, self.groups = bits, axis, groups
        self.per_channel = isinstance(granularity, PerChannel)
        n = channel_major(weight.detach(), axis, groups).shape[0] if self.per_channel else 1
        self.register_buffer("scale", torch.ones(n))
        self.register_buffer("offset", torch.zeros(n, dtype=torch.int32))
        self.calibrate(weight)

    @torch.no_grad()
    def calibrate(self, weight: torch.Tensor) -> None:
        """ARQ: recompute the scales from ``weight`` (the pipeline's input at this stage)."""
        w = weight.detach().float()
        rows = channel_major(w, self.axis, self.groups) if self.per_channel else w.reshape(1, -1)
        lo, hi = rows.amin(dim=1), rows.amax(dim=1)   # on the CPU faster than aminmax or min/max(dim)
        # scale_offset(lo, hi, bits, symmetric=True) in float32 with fewer ops (QAT runs it every step):
        # float32 division of float32 values equals the float64 quotient rounded to float32
        qmin, qmax = qrange(self.bits)
        pos, neg = hi.abs(), lo.abs()
        scale = torch.where(pos >= neg, pos / qmax, neg / -qmin)
        self.scale.copy_(scale.masked_fill_(scale < FLT_EPSILON, 1.0))
        self.offset.zero_()

    def broadcast(self, t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        return channel_shape(t, shape, self.axis, self.groups) if self.per_channel else t.reshape(())

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return fake_quantize(weight, self.broadcast(self.scale, weight.shape), None, self.bits)  # offset is 0

    def integer_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The int8 (or narrower, stored in int8) weight values the deploy model carries."""
        qmin, qmax = qrange(self.bits)
        s = self.broadcast(self.scale, weight.shape)
        return torch.clamp(torch.round(weight.detach() / s), qmin, qmax).to(torch.int8)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, {'per_channel' if self.per_channel else 'per_tensor'}, channels={self.scale.numel()}"
