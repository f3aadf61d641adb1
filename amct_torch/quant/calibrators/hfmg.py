"""HFMG (AMCT's histogram calibrator): merged histograms, then a search of the range minimising the L2 error.

Batches are merged into one running histogram of ``num_of_bins`` bins (1024..8192) whose range grows as
needed; memory stays constant whatever the number of batches. The search:

Asymmetric: 1. a coarse grid of candidate ranges: the left edge trims a fraction of the mass from the bottom, the
   right edge from the top (fractions 0, 1e-6 ... 0.1), every combination;
2. a local refinement of each edge bin by bin around the best candidate.
Symmetric: only the bound ``b`` of ``[-b, b]`` matters; a 512-point grid over (0, max|x|], then a finer grid.

The error of a range is ``sum_i n_i (c_i - fq(c_i))^2`` over bin centres ``c_i`` with counts ``n_i``.
"""

from __future__ import annotations

import torch

from .histogram import HistogramCalibrator, histogram_error

__all__ = ["HFMGCalibrator"]

_TRIMS = (0.0, 1e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1)


class HFMGCalibrator(HistogramCalibrator):
    name = "hfmg"

    def __init__(self, num_of_bins: int = 4096):
        super().__init__(num_of_bins)

    def clip_range(self, bits: int, symmetric: bool) -> tuple[float, float]:
        self._check_observed()
        counts, centres, bins = self.hist.counts, self.hist.centres(), self.hist.bins
        if symmetric:
            return self._symmetric(centres, counts, bits)
        width = self.hist.width()
        lo0 = self.hist.lo.item()
        edges = lambda l_bin, r_bin: (lo0 + width * l_bin, lo0 + width * (r_bin + 1))  # noqa: E731
        cdf = torch.cumsum(counts, 0) / counts.sum()
        left = sorted({int(torch.searchsorted(cdf, t, right=True).clamp(0, bins - 1)) if t > 0 else 0 for t in _TRIMS})
        right = sorted({int(torch.searchsorted(cdf, 1 - t).clamp(0, bins - 1)) if t > 0 else bins - 1 for t in _TRIMS})

        def best_of(pairs: list[tuple[int, int]]) -> tuple[float, tuple[int, int]]:
            pairs = [(l_bin, r_bin) for l_bin, r_bin in pairs if l_bin <= r_bin]
            los = torch.tensor([edges(*p)[0] for p in pairs], dtype=torch.float64)
            his = torch.tensor([edges(*p)[1] for p in pairs], dtype=torch.float64)
            err = histogram_error(centres, counts, los, his, bits, symmetric)
            k = int(torch.argmin(err))
            return err[k].item(), pairs[k]

        err, (lb, rb) = best_of([(l_bin, r_bin) for l_bin in left for r_bin in right])
        for radius in (64, 8, 1):
            step = max(1, radius // 8)
            err_r, (lb, rb) = best_of([(lb, r) for r in range(rb - radius, rb + radius + 1, step) if 0 <= r < bins])
            err_l, (lb, rb) = best_of([(l_, rb) for l_ in range(lb - radius, lb + radius + 1, step) if 0 <= l_ < bins])
        lo, hi = edges(lb, rb)
        return min(lo, 0.0) if lb == 0 else lo, hi

    def _symmetric(self, centres: torch.Tensor, counts: torch.Tensor, bits: int) -> tuple[float, float]:
        """Symmetric: only the bound ``b`` of ``[-b, b]`` matters; a grid search, then a finer one around the best."""
        top = max(abs(self.hist.lo.item()), abs(self.hist.hi.item()), 1e-12)
        grid = torch.linspace(top / 512, top, 512, dtype=torch.float64)
        for _ in range(2):
            err = histogram_error(centres, counts, -grid, grid, bits, True)
            k = int(torch.argmin(err))
            step = (grid[1] - grid[0]).item()
            best = grid[k].item()
            grid = torch.linspace(max(best - step, step / 64), best + step, 129, dtype=torch.float64)
        return -best, best
