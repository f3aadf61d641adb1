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

__all__ = ["QuantConfig", "check_calibrator_fields"]


def check_calibrator_fields(name: str, cfg: "QuantConfig") -> None:
    """Ranges of the calibrator parameters (percentiles, IFMR search, HFMG/MSE bins) any config carries."""
    for key in ("max_percentile", "min_percentile"):
        check_range(name, key, getattr(cfg, key), 0.5, 1.0, lo_open=True)
    start, end = cfg.search_range
    if not 0 < start < end:
        raise ConfigError(f"{name}.search_range", list(cfg.search_range), "[start, end] with 0 < start < end")
    check_range(name, "search_step", cfg.search_step, 0.0, end - start, lo_open=True)
    allowed(name, "num_of_bins", cfg.num_of_bins, (1024, 2048, 4096, 8192))

Calibrator = Literal["minmax", "percentile", "ifmr", "hfmg", "mse"]


@dataclass(frozen=True)
class QuantConfig(Config):
    """What a quantized layer gets (AMCT's per-layer keys, typed).

    Args:
        weight_bits: 4, 6, 7, 8 or 16 (6 and 7 only for Conv2d, checked when the layer is known).
        activation_bits: 4, 8 or 16; ``None`` quantizes weights only.
        weight_granularity: ``per_channel`` (default, AMCT ``channel_wise``), ``per_tensor``, or
            ``{'per_group': N}``.
        activation_granularity: ``per_tensor`` (default) or ``per_token``.
        activation_offset: asymmetric activations (scale and offset) when true, symmetric when false
            (AMCT's global ``activation_offset`` and per-layer ``asymmetric``).
        activation_calibrator: ``ifmr`` (AMCT default), ``hfmg``, ``minmax``, ``percentile`` or ``mse``.
        max_percentile, min_percentile: IFMR/percentile start points, in (0.5, 1].
        search_range, search_step: IFMR's clip search ``max_init * [start, end)`` in steps of ``search_step``.
        num_of_bins: HFMG/MSE histogram bins, one of 1024, 2048, 4096, 8192.
        weight_algorithm: ``arq`` (per-channel min/max, AMCT default) or ``adaround`` (``ada_quantize``).
        ada_num_iteration, ada_reg_param, ada_beta_range, ada_warm_start: AdaRound's schedule.
        batch_num: calibration batches before the activation scales are fixed.
        dmq_balancer_param: DMQ migration strength in [0.2, 0.8], ``None`` for no balancing.
    """

    weight_bits: int = 8
    activation_bits: int | None = 8
    weight_granularity: Granularity = field(default_factory=PerChannel)
    activation_granularity: Granularity = field(default_factory=PerTensor)
    activation_offset: bool = True
    activation_calibrator: Calibrator = "ifmr"
    max_percentile: float = 0.999999
    min_percentile: float = 0.999999
    search_range: tuple[float, float] = (0.7, 1.3)
    search_step: float = 0.01
    num_of_bins: int = 4096
    weight_algorithm: Literal["arq", "adaround"] = "arq"
    ada_num_iteration: int = 10000
    ada_reg_param: float = 0.01
    ada_beta_range: tuple[float, float] = (20.0, 2.0)
    ada_warm_start: float = 0.2
    batch_num: int = 1
    dmq_balancer_param: float | None = None

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
        check_calibrator_fields(name, self)
        check_range(name, "ada_num_iteration", self.ada_num_iteration, 1)
        check_range(name, "ada_reg_param", self.ada_reg_param, 0.0, lo_open=True)
        b_start, b_end = self.ada_beta_range
        if not b_start > b_end > 0:
            raise ConfigError(f"{name}.ada_beta_range", list(self.ada_beta_range), "[start, end] with start > end > 0")
        check_range(name, "ada_warm_start", self.ada_warm_start, 0.0, 1.0, hi_open=True)
        check_range(name, "batch_num", self.batch_num, 1)
        if self.dmq_balancer_param is not None:
            check_range(name, "dmq_balancer_param", self.dmq_balancer_param, 0.2, 0.8)

    def short(self) -> str:
        """Compact description used in plans, e.g. ``W8 per_channel / A8 ifmr asym``."""
        g = self.weight_granularity.to_plain()
        g = g if isinstance(g, str) else ",".join(f"{k}={v}" for k, v in g.items())
        algo = "" if self.weight_algorithm == "arq" else f" {self.weight_algorithm}"
        act = "A-" if self.activation_bits is None else (
            f"A{self.activation_bits} {self.activation_calibrator} {'asym' if self.activation_offset else 'sym'}")
        return f"W{self.weight_bits} {g}{algo} / {act}"
