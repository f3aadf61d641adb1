"""IFMR (AMCT's Input Feature Map Reconstruction) calibrator.

1. Start from the percentile points: ``hi0`` (``max_percentile``, clamped >= 0), ``lo0``
   (``min_percentile``, clamped <= 0).
2. For every ratio ``r`` in ``arange(search_range[0], search_range[1], search_step)`` try the clip
   ``hi = r * hi0`` (symmetric: also ``lo = r * lo0``; asymmetric: ``lo = lo0`` fixed) and fake-quantize
   all observed data with it.
3. Keep the clip with the smallest mean squared error against the original data (first one on ties).
"""

from __future__ import annotations

import numpy as np
import torch

from .base import candidate_mse
from .percentile import PercentileCalibrator

__all__ = ["IFMRCalibrator"]

_CHUNK = 8  # candidates evaluated together (memory: _CHUNK x the observed data)


class IFMRCalibrator(PercentileCalibrator):
    name = "ifmr"

    def __init__(self, max_percentile: float = 0.999999, min_percentile: float = 0.999999,
                 search_range: tuple[float, float] = (0.7, 1.3), search_step: float = 0.01):
        super().__init__(max_percentile, min_percentile)
        self.search_range, self.search_step = tuple(search_range), search_step
        self.last_search: list[tuple[float, float]] = []

    def ratios(self) -> np.ndarray:
        start, end = self.search_range
        n = int(np.floor((end - start) / self.search_step + 1e-9))  # [start, end): float arange may include end
        n += start + n * self.search_step < end - 1e-12
        return start + self.search_step * np.arange(n)

    def clip_range(self, bits: int, symmetric: bool) -> tuple[float, float]:
        lo0, hi0 = self.percentile_range()
        data = self.store.data()
        ratios = torch.as_tensor(self.ratios(), dtype=torch.float64)
        los = ratios * lo0 if symmetric else torch.full_like(ratios, lo0)
        his = ratios * hi0
        errors = torch.cat([candidate_mse(data, los[i:i + _CHUNK], his[i:i + _CHUNK], bits, symmetric)
                            for i in range(0, len(ratios), _CHUNK)])
        self.last_search = [(float(r), float(e)) for r, e in zip(ratios, errors)]
        k = int(torch.argmin(errors))  # first minimum on ties
        return float(los[k]), float(his[k])
