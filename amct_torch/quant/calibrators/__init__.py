"""Activation calibrators, one file each: min/max, percentile, IFMR, HFMG, MSE."""

from __future__ import annotations

from typing import Any

from .base import Calibrator
from .hfmg import HFMGCalibrator
from .ifmr import IFMRCalibrator
from .minmax import MinMaxCalibrator
from .mse import MSECalibrator
from .percentile import PercentileCalibrator

__all__ = ["Calibrator", "HFMGCalibrator", "IFMRCalibrator", "MinMaxCalibrator", "MSECalibrator",
           "PercentileCalibrator", "make_calibrator", "CALIBRATORS"]

CALIBRATORS: dict[str, type[Calibrator]] = {c.name: c for c in (MinMaxCalibrator, PercentileCalibrator, IFMRCalibrator,
                                                                 HFMGCalibrator, MSECalibrator)}


def make_calibrator(config: Any) -> Calibrator:
    """The calibrator a :class:`~amct_torch.config.QuantConfig` asks for, with its parameters."""
    name = config.activation_calibrator
    if name == "minmax":
        return MinMaxCalibrator()
    if name == "percentile":
        return PercentileCalibrator(config.max_percentile, config.min_percentile)
    if name == "ifmr":
        return IFMRCalibrator(config.max_percentile, config.min_percentile, config.search_range, config.search_step)
    if name == "hfmg":
        return HFMGCalibrator(config.num_of_bins)
    if name == "mse":
        return MSECalibrator(config.num_of_bins)
    raise ValueError(f"activation_calibrator: got {name!r}; allowed: one of {', '.join(CALIBRATORS)}")
