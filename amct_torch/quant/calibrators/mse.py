"""MSE calibrator: shrink the observed range by one common factor, chosen to minimise the quantization MSE.

Candidates ``[f * lo, f * hi]`` for ``f`` in 100 steps over (0, 1]; the error is computed on the running
histogram (``num_of_bins`` bins), as in HFMG, so memory stays constant.
"""

from __future__ import annotations

import torch

from .histogram import HistogramCalibrator, histogram_error

__all__ = ["MSECalibrator"]


class MSECalibrator(HistogramCalibrator):
    name = "mse"

    def __init__(self, num_of_bins: int = 2048, steps: int = 100):
        super().__init__(num_of_bins)
        self.steps = steps

    def clip_range(self, bits: int, symmetric: bool) -> tuple[float, float]:
        self._check_observed()
        lo, hi = min(self.hist.lo.item(), 0.0), max(self.hist.hi.item(), 0.0)
        f = torch.arange(1, self.steps + 1, dtype=torch.float64) / self.steps
        err = histogram_error(self.hist.centres(), self.hist.counts, f * lo, f * hi, bits, symmetric)
        k = int(torch.argmin(err))
        return (f[k] * lo).item(), (f[k] * hi).item()
