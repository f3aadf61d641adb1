"""QAT quantizer modules: learned activation quantizers (ULQ, LSQ+) and retrain weight stages.

They subclass the PTQ modules (:class:`ActivationQuantizer`, :class:`ArqWeightQuantizer`) and keep the same
``scale``/``offset`` buffers current (what was used in the last forward), so placement, ties, the record
file, ``check_calibrated`` and the ONNX export treat a QAT model exactly like a PTQ one: at export the
learned ops become standard QuantizeLinear/DequantizeLinear with the learned factors.

Learned parameters (clips, scales, offsets) are created when the model is prepared, so an optimizer built
afterwards sees them. Activation clips not given in the config are initialised from a calibrator (IFMR by
default) over the first ``batch_num`` steps; under ``torch.distributed`` the ranges the ranks observed are
averaged (``all_reduce``) so every rank starts from identical factors.
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod

import torch
import torch.distributed as dist
import torch.nn as nn

from ..config import Granularity
from .calibrators import Calibrator
from .formulas import channel_major, qrange
from .learnable import (lsq_factors, lsq_fake_quant, lsq_fake_quant_with_factors, ulq_factors, ulq_fake_quant,
                        ulq_fake_quant_with_factors)
from .quantizers import ActivationQuantizer, ArqWeightQuantizer

__all__ = ["LearnedActivationQuantizer", "UlqActivationQuantizer", "LsqActivationQuantizer",
           "ArqRetrainWeightQuantizer", "UlqWeightQuantizer", "LsqWeightQuantizer", "average_across_ranks"]


def average_across_ranks(*values: float) -> list[float]:
    """The mean over the ranks of a ``torch.distributed`` job (the values themselves outside one)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    backend = dist.get_backend()
    if backend == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return (t / dist.get_world_size()).cpu().tolist()


class LearnedActivationQuantizer(ActivationQuantizer, metaclass=ABCMeta):
    """Base of the learned activation quantizers: initialisation, ties, and the factor buffers."""

    algorithm = "?"

    def __init__(self, bits: int, symmetric: bool, calibrator: Calibrator, batch_num: int = 1):
        super().__init__(bits, symmetric, calibrator, batch_num)
        self.register_buffer("frozen", torch.tensor(False))

    # subclasses: the learned fake quantization, the factors it uses, and setting the range
    @abstractmethod
    def _learned(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | float, torch.Tensor | float]:
        """Fake-quantize ``x`` with the learned parameters (differentiable in them); also returns the
        scale and offset used."""

    @abstractmethod
    def current_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, offset)`` the forward uses now."""

    @abstractmethod
    def set_range(self, lo: float, hi: float) -> None:
        """Initialise the learned parameters from a clip range and mark the quantizer ready."""

    def learned_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters(recurse=False)]

    # --
    def _refresh(self, factors: tuple[torch.Tensor | float, torch.Tensor | float] | None = None) -> None:
        """Record the factors in the ``scale``/``offset`` buffers (those of the last forward, or current)."""
        s, o = factors if factors is not None else self.current_factors()
        with torch.no_grad():
            if isinstance(s, torch.Tensor):
                self.scale.copy_(s.reshape(()))
                self.offset.copy_(o.reshape(()).to(self.offset.dtype))
            else:
                self.scale.fill_(s)
                self.offset.fill_(int(o))

    def quantize_learned(self, x: torch.Tensor) -> torch.Tensor:
        y, s, o = self._learned(x)
        self._refresh((s, o))
        return y

    def finalize(self) -> None:
        lo, hi = average_across_ranks(*self.calibrated_range())
        self.set_range(lo, hi)
        self.calibrator.release()

    def set_factors(self, scale: float, offset: int) -> None:
        qmin, qmax = qrange(self.bits)
        self.set_range((qmin - int(offset)) * float(scale), (qmax - int(offset)) * float(scale))

    def _mark_ready(self) -> None:
        self.calibrated.fill_(True)
        self._refresh()

    def freeze(self, frozen: bool = True) -> None:
        """Stop (or resume) learning the range: the parameters stop receiving gradients."""
        self.frozen.fill_(frozen)
        for p in self.learned_parameters():
            p.requires_grad_(not frozen and self._trainable(p))

    def _trainable(self, p: nn.Parameter) -> bool:
        return True

    def set_onnx_mode(self, enabled: bool) -> None:
        src = self.tied_to
        if enabled and src is None and bool(self.calibrated):
            self._refresh()
        elif enabled and isinstance(src, LearnedActivationQuantizer) and src.is_calibrated:
            src._refresh()
            with torch.no_grad():
                self.scale.copy_(src.scale)
                self.offset.copy_(src.offset)
                self.calibrated.fill_(True)
        super().set_onnx_mode(enabled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.onnx_mode:
            return super().forward(x)
        src = self.tied_to
        if src is not None:
            if not src.is_calibrated:
                return x
            y = src.quantize_learned(x) if isinstance(src, LearnedActivationQuantizer) else src(x)
            with torch.no_grad():
                self.scale.copy_(src.scale)
                self.offset.copy_(src.offset)
                self.calibrated.fill_(True)
            return y
        if not bool(self.calibrated):
            self.calibrator.observe(x.detach())
            self.batches_seen += 1
            if int(self.batches_seen) >= self.batch_num:
                self.finalize()
            return x
        return self.quantize_learned(x)

    def extra_repr(self) -> str:
        return f"{self.algorithm}, " + super().extra_repr()


class UlqActivationQuantizer(LearnedActivationQuantizer):
    """AMCT's ULQ: learned ``clip_max`` (and ``clip_min`` unless symmetric or ``fixed_min``)."""

    algorithm = "ulq"

    def __init__(self, bits: int, symmetric: bool, calibrator: Calibrator, batch_num: int = 1, *,
                 clip_max: float | None = None, clip_min: float | None = None, fixed_min: bool = False):
        super().__init__(bits, symmetric, calibrator, batch_num)
        self.fixed_min = bool(fixed_min) and not symmetric
        self.clip_max = nn.Parameter(torch.tensor(1.0))
        self.clip_min = nn.Parameter(torch.tensor(0.0), requires_grad=self._trainable_min())
        if clip_max is not None:
            self.set_range(0.0 if clip_min is None else clip_min, clip_max)

    def _trainable_min(self) -> bool:
        return not (self.fixed_min or self.symmetric)

    def _trainable(self, p: nn.Parameter) -> bool:
        return p is not self.clip_min or self._trainable_min()

    def _min(self) -> torch.Tensor | None:
        return None if (self.fixed_min or self.symmetric) else self.clip_min

    def _learned(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | float, torch.Tensor | float]:
        return ulq_fake_quant_with_factors(x, self.clip_max, self._min(), self.bits, self.symmetric)

    def current_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return ulq_factors(self.clip_max.detach(), None if self._min() is None else self.clip_min.detach(),
                           self.bits, self.symmetric)

    @torch.no_grad()
    def set_range(self, lo: float, hi: float) -> None:
        if self.symmetric:
            _, qmax = qrange(self.bits)
            hi = max(hi, -lo * qmax / (qmax + 1), 0.0)
        self.clip_max.fill_(max(float(hi), 1e-6))
        self.clip_min.fill_(0.0 if self.fixed_min or self.symmetric else min(float(lo), 0.0))
        self._mark_ready()


class LsqActivationQuantizer(LearnedActivationQuantizer):
    """LSQ+: learned scale and offset (``beta``, the real value of code 0; none when symmetric)."""

    algorithm = "lsq_plus"

    def __init__(self, bits: int, symmetric: bool, calibrator: Calibrator, batch_num: int = 1, *,
                 clip_max: float | None = None, clip_min: float | None = None, fixed_min: bool = False):
        super().__init__(bits, symmetric, calibrator, batch_num)
        self.fixed_min = bool(fixed_min) and not symmetric
        self.learned_scale = nn.Parameter(torch.tensor(1.0))
        self.learned_beta = nn.Parameter(torch.tensor(0.0), requires_grad=self._trainable_beta())
        if clip_max is not None:
            self.set_range(0.0 if clip_min is None else clip_min, clip_max)

    def _trainable_beta(self) -> bool:
        return not (self.symmetric or self.fixed_min)

    def _trainable(self, p: nn.Parameter) -> bool:
        return p is not self.learned_beta or self._trainable_beta()

    def _beta(self) -> torch.Tensor | None:
        return None if self.symmetric else self.learned_beta

    def _learned(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | float, torch.Tensor | float]:
        return lsq_fake_quant_with_factors(x, self.learned_scale, self._beta(), self.bits)

    def current_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return lsq_factors(self.learned_scale.detach(), None if self._beta() is None else self.learned_beta.detach(),
                           self.bits)

    @torch.no_grad()
    def set_range(self, lo: float, hi: float) -> None:
        qmin, qmax = qrange(self.bits)
        if self.fixed_min:
            lo = 0.0
        if self.symmetric:
            s = max(hi / qmax, -lo / -qmin, 1e-8)
            beta = 0.0
        else:
            lo, hi = min(lo, 0.0), max(hi, 0.0)
            s = max((hi - lo) / (2 ** self.bits - 1), 1e-8)
            beta = -round(qmin - lo / s) * s  # code 0 <-> real value beta; the offset is -beta/s
        self.learned_scale.fill_(s)
        self.learned_beta.fill_(beta)
        self._mark_ready()


# -- weights -------------------------------------------------------------------------------------
class ArqRetrainWeightQuantizer(ArqWeightQuantizer):
    """AMCT's ``arq_retrain``: the per-channel (or per-tensor) min/max scale is recomputed from the weight at
    every step, with a straight-through gradient; ``freeze()`` fixes the scales."""

    algorithm = "arq_retrain"

    def __init__(self, weight: torch.Tensor, bits: int, granularity: Granularity, axis: int, groups: int = 1):
        super().__init__(weight, bits, granularity, axis, groups)
        self.register_buffer("frozen", torch.tensor(False))

    def freeze(self, frozen: bool = True) -> None:
        self.frozen.fill_(frozen)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not bool(self.frozen):
            self.calibrate(weight)
        return super().forward(weight)


class _LearnedWeight(ArqWeightQuantizer):
    algorithm = "?"

    def __init__(self, weight: torch.Tensor, bits: int, granularity: Granularity, axis: int, groups: int = 1):
        super().__init__(weight, bits, granularity, axis, groups)
        self.register_buffer("frozen", torch.tensor(False))

    def freeze(self, frozen: bool = True) -> None:
        self.frozen.fill_(frozen)
        for p in self.parameters(recurse=False):
            p.requires_grad_(not frozen)

    def _refresh(self, s: torch.Tensor) -> None:
        with torch.no_grad():
            self.scale.copy_(s.reshape(self.scale.shape))
            self.offset.zero_()


class UlqWeightQuantizer(_LearnedWeight):
    """AMCT's ``ulq_retrain``: a learned symmetric clip per output channel (or one), initialised at max|w|."""

    algorithm = "ulq_retrain"

    def __init__(self, weight: torch.Tensor, bits: int, granularity: Granularity, axis: int, groups: int = 1):
        super().__init__(weight, bits, granularity, axis, groups)
        _, qmax = qrange(bits)
        self.clip = nn.Parameter(self.scale.detach().clone() * qmax)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        clip = self.broadcast(self.clip, weight.shape)
        y = ulq_fake_quant(weight, clip, None, self.bits, symmetric=True)
        self._refresh(ulq_factors(self.clip.detach(), None, self.bits, True)[0])
        return y


class LsqWeightQuantizer(_LearnedWeight):
    """LSQ for weights: a learned symmetric scale per output channel (or one), initialised from ARQ."""

    algorithm = "lsq_plus"

    def __init__(self, weight: torch.Tensor, bits: int, granularity: Granularity, axis: int, groups: int = 1):
        super().__init__(weight, bits, granularity, axis, groups)
        self.learned_scale = nn.Parameter(self.scale.detach().clone())
        self.per_scale = max(1, channel_major(weight.detach(), axis, groups).shape[1]) if self.per_channel else weight.numel()

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        s = self.broadcast(self.learned_scale, weight.shape)
        gs = 1.0 / (self.per_scale * qrange(self.bits)[1]) ** 0.5
        y = lsq_fake_quant(weight, s, None, self.bits, grad_scale=gs)
        self._refresh(lsq_factors(self.learned_scale.detach(), None, self.bits)[0])
        return y

