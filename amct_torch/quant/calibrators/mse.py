"""MSE calibrator: shrink the observed range by one common factor, chosen to minimise the quantization MSE.

Candidates ``[f * lo, f * hi]`` for ``f`` in 100 steps over (0, 1]; the error is computed on the running
histogram (``num_of_bins`` bins), as in HFMG, so memory stays constant.
"""

from __future__ import annotations

import torch

from .base import Calibrator
from .histogram import RunningHistogram, histogram_error

__all__ = ["MSECalibrator"]


class MSECalibrator(Calibrator):
    name = "mse"

    def __init__(self, num_of_bins: int = 2048, steps: int = 100):
        super().__init__()
        self.hist = RunningHistogram(num_of_bins)
        self.steps = steps

    def observe(self, x: torch.Tensor) -> None:
        self.hist.add(x)

    def reset(self) -> None:
        self.hist.reset()

    def clip_range(self, bits: int, symmetric: bool) -> tuple[float, float]:
        if self.hist.empty:
            raise RuntimeError("mse calibrator has observed nothing")
        lo, hi = min(self.hist.lo.item(), 0.0), max(self.hist.hi.item(), 0.0)
        f = torch.arange(1, self.steps + 1, dtype=torch.float64) / self.steps
        err = histogram_error(self.hist.centres(), self.hist.counts, f * lo, f * hi, bits, symmetric)
        k = int(torch.argmin(err))
        return (f[k] * lo).item(), (f[k] * hi).item()
