"""KV-cache quantization config (AMCT's ``kv_data_quant_config``: IFMR or HFMG on the key/value
projections' outputs, per tensor or per channel).

    >>> KVCacheConfig().short()
    'kv-cache INT8 per_tensor ifmr asym'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .base import Config, allowed, check_range
from .quant import check_calibrator_fields

__all__ = ["KVCacheConfig"]


@dataclass(frozen=True)
class KVCacheConfig(Config):
    """How the key and value tensors of the cache are calibrated and quantized.

    Args:
        bits: 8 (AMCT's ``num_bits``) or 4.
        granularity: ``per_tensor`` (one scale per key / value tensor of a layer) or ``per_channel`` (one per
            hidden unit of the projection: per head and head dimension) — AMCT's ``quant_granularity`` 0 / 1.
        activation_calibrator: ``ifmr`` (AMCT default), ``hfmg`` or ``minmax``.
        activation_offset: asymmetric with an offset (AMCT's default) or symmetric.
        batch_num: calibration forwards before the factors are fixed.
        max_percentile, min_percentile, search_range, search_step: IFMR's parameters; num_of_bins: HFMG's.
    """

    bits: int = 8
    granularity: Literal["per_tensor", "per_channel"] = "per_tensor"
    activation_calibrator: Literal["ifmr", "hfmg", "minmax"] = "ifmr"
    activation_offset: bool = True
    batch_num: int = 1
    max_percentile: float = 0.999999
    min_percentile: float = 0.999999
    search_range: tuple[float, float] = (0.7, 1.3)
    search_step: float = 0.01
    num_of_bins: int = 4096

    def validate(self) -> None:
        name = type(self).__name__
        allowed(name, "bits", self.bits, (4, 8))
        check_range(name, "batch_num", self.batch_num, 1)
        check_calibrator_fields(name, self)

    def short(self) -> str:
        return (f"kv-cache INT{self.bits} {self.granularity} {self.activation_calibrator} "
                f"{'asym' if self.activation_offset else 'sym'}")
