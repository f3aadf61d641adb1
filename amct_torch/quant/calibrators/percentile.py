"""Percentile calibrator: clip at the ``max_percentile`` / ``min_percentile`` points of the data."""

from __future__ import annotations

import torch

from .base import Calibrator, SampleStore, kth_largest, kth_smallest

__all__ = ["PercentileCalibrator"]


class PercentileCalibrator(Calibrator):
    """``hi`` = value with ``max_percentile`` of the data below it, ``lo`` likewise from the bottom.

    Example: ``max_percentile=0.9999`` clips the top 0.01 % of values.
    """

    name = "percentile"

    def __init__(self, max_percentile: float = 0.999999, min_percentile: float = 0.999999):
        super().__init__()
        self.max_percentile, self.min_percentile = max_percentile, min_percentile
        self.store = SampleStore()

    def observe(self, x: torch.Tensor) -> None:
        self.store.add(x)

    def percentile_range(self) -> tuple[float, float]:
        data = self.store.data()
        hi = max(kth_largest(data, self.max_percentile), 0.0)
        lo = min(kth_smallest(data, self.min_percentile), 0.0)
        return lo, hi

    def clip_range(self, bits: int, symmetric: bool) -> tuple[float, float]:
        return self.percentile_range()

    def reset(self) -> None:
        self.store.clear()

    def release(self) -> None:
        self.store.clear()
