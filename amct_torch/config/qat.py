"""Quantization-aware training config of one layer (AMCT's retrain keys, typed).

    >>> QatConfig(weight_bits=4).short()
    'W4 per_channel arq_retrain / A8 ulq asym'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .base import Config, ConfigError, allowed, check_range
from .granularity import Granularity, PerChannel, PerTensor
from .quant import Calibrator, check_calibrator_fields

__all__ = ["QatConfig", "QAT_BIT_WIDTHS"]

#: AMCT's ``RETRAIN_ACT_WTS_TYPES``: (activation bits, weight bits)
QAT_BIT_WIDTHS = ((8, 8), (8, 4), (4, 4), (16, 8))


@dataclass(frozen=True)
class QatConfig(Config):
    """What a layer gets in quantization-aware training.

    Args:
        weight_bits, activation_bits: one of AMCT's pairs A8W8, A8W4, A4W4, A16W8 (``activation_bits=None``
            trains weight quantization only).
        weight_granularity: ``per_channel`` (default, AMCT ``channel_wise``) or ``per_tensor``.
        activation_offset: asymmetric activations (learned lower and upper clip) when true; symmetric
            (one learned clip, offset 0) when false.
        activation_algorithm: ``ulq`` (AMCT's ``ulq_quantize``: learned clip max/min) or ``lsq_plus``
            (learned scale and offset, LSQ+).
        weight_algorithm: ``arq_retrain`` (AMCT default: per-channel min/max recomputed every step),
            ``ulq_retrain`` (learned per-channel clips) or ``lsq_plus`` (learned per-channel scales).
        clip_max, clip_min: initial activation clips (AMCT ``clip_max_min``); ``None``: initialised by
            ``init_calibrator`` over the first ``batch_num`` training steps. ``clip_max > 0``, ``clip_min < 0``.
        fixed_min: pin the lower clip at 0; ``None`` (default) does so after ReLU-like producers.
        init_calibrator: how the clips are initialised when not given (``ifmr``, AMCT's, by default), with
            ``max_percentile``, ``min_percentile``, ``search_range``, ``search_step``, ``num_of_bins``.
        batch_num: steps observed before the clips are initialised.
    """

    weight_bits: int = 8
    activation_bits: int | None = 8
    weight_granularity: Granularity = field(default_factory=PerChannel)
    activation_offset: bool = True
    activation_algorithm: Literal["ulq", "lsq_plus"] = "ulq"
    weight_algorithm: Literal["arq_retrain", "ulq_retrain", "lsq_plus"] = "arq_retrain"
    clip_max: float | None = None
    clip_min: float | None = None
    fixed_min: bool | None = None
    init_calibrator: Calibrator = "ifmr"
    max_percentile: float = 0.999999
    min_percentile: float = 0.999999
    search_range: tuple[float, float] = (0.7, 1.3)
    search_step: float = 0.01
    num_of_bins: int = 4096
    batch_num: int = 1

    def validate(self) -> None:
        name = type(self).__name__
        allowed(name, "weight_bits", self.weight_bits, (4, 8))
        if self.activation_bits is not None:
            allowed(name, "activation_bits", self.activation_bits, (4, 8, 16))
            if (self.activation_bits, self.weight_bits) not in QAT_BIT_WIDTHS:
                raise ConfigError(f"{name}.(activation_bits, weight_bits)", [self.activation_bits, self.weight_bits],
                                  "A8W8, A8W4, A4W4 or A16W8 (AMCT's retrain bit widths)")
        if not isinstance(self.weight_granularity, (PerTensor, PerChannel)):
            raise ConfigError(f"{name}.weight_granularity", self.weight_granularity.to_plain(), "per_tensor or per_channel")
        if self.clip_max is not None:
            check_range(name, "clip_max", self.clip_max, 0.0, lo_open=True)
        if self.clip_min is not None:
            if self.clip_max is None:
                raise ConfigError(f"{name}.clip_min", self.clip_min, "only together with clip_max")
            check_range(name, "clip_min", self.clip_min, None, 0.0, hi_open=True)
        elif self.clip_max is not None and self.activation_offset and self.fixed_min is False:
            raise ConfigError(f"{name}.clip_min", None, "a value < 0 with clip_max (or fixed_min=True)")
        check_calibrator_fields(name, self)
        check_range(name, "batch_num", self.batch_num, 1)

    @property
    def activation_calibrator(self) -> str:
        """The calibrator that initialises the clips (the name ``make_calibrator`` reads)."""
        return self.init_calibrator

    def short(self) -> str:
        g = self.weight_granularity.to_plain()
        act = "A-" if self.activation_bits is None else (
            f"A{self.activation_bits} {self.activation_algorithm} {'asym' if self.activation_offset else 'sym'}")
        return f"W{self.weight_bits} {g} {self.weight_algorithm} / {act}"
