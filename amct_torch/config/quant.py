"""Quantization config of one layer (AMCT's per-layer keys, typed).

Weights are symmetric (offset 0) and per output channel by default; activations per tensor, with an
offset unless ``activation_offset=False`` (AMCT's ``activation_offset`` / per-layer ``asymmetric``).

    >>> QuantConfig(weight_bits=4, activation_calibrator="hfmg").weight_bits
    4
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .base import Config, ConfigError, allowed, check_range
from .granularity import Granularity, PerChannel, PerGroup, PerTensor, PerToken

__all__ = ["QuantConfig"]

Calibrator = Literal["minmax", "percentile", "ifmr", "hfmg", "kl", "mse"]


@dataclass(frozen=True)
class QuantConfig(Config):
    """What a quantized layer gets.

    Args:
        weight_bits: 4, 6, 7, 8 or 16 (6 and 7 only for Conv2d, checked when the layer is known).
        activation_bits: 4, 8 or 16; ``None`` quantizes weights only.
        weight_granularity: ``per_channel`` (default), ``per_tensor``, or ``{'per_group': N}``.
        activation_granularity: ``per_tensor`` (default) or ``per_token``.
        activation_offset: asymmetric activations (scale and offset) when true, symmetric when false.
        activation_calibrator: minmax, percentile, ifmr (AMCT default), hfmg, kl or mse.
        weight_algorithm: ``arq`` (per-channel min/max, AMCT default) or ``adaround``.
        batch_num: calibration batches before the scales are fixed.
    """

    weight_bits: int = 8
    activation_bits: int | None = 8
    weight_granularity: Granularity = field(default_factory=PerChannel)
    activation_granularity: Granularity = field(default_factory=PerTensor)
    activation_offset: bool = True
    activation_calibrator: Calibrator = "ifmr"
    weight_algorithm: Literal["arq", "adaround"] = "arq"
    batch_num: int = 1

    def validate(self) -> None:
        name = type(self).__name__
        allowed(name, "weight_bits", self.weight_bits, (4, 6, 7, 8, 16))
        if self.activation_bits is not None:
            allowed(name, "activation_bits", self.activation_bits, (4, 8, 16))
        if isinstance(self.weight_granularity, PerToken):
            raise ConfigError(f"{name}.weight_granularity", "per_token", "per_tensor, per_channel or {'per_group': N}")
        if not isinstance(self.activation_granularity, (PerTensor, PerToken)):
            raise ConfigError(f"{name}.activation_granularity", self.activation_granularity.to_plain(),
                              "per_tensor or per_token")
        if isinstance(self.weight_granularity, PerGroup) and self.weight_bits not in (4, 8):
            raise ConfigError(f"{name}.weight_bits", self.weight_bits, "4 or 8 with per_group weights")
        check_range(name, "batch_num", self.batch_num, 1)

    def short(self) -> str:
        """Compact description used in plans, e.g. ``W8 per_channel / A8 ifmr asym``."""
        g = self.weight_granularity.to_plain()
        g = g if isinstance(g, str) else ",".join(f"{k}={v}" for k, v in g.items())
        act = "A-" if self.activation_bits is None else (
            f"A{self.activation_bits} {self.activation_calibrator} {'asym' if self.activation_offset else 'sym'}")
        return f"W{self.weight_bits} {g} / {act}"
