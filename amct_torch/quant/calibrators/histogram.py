"""A running histogram whose range grows to cover every batch (old counts are re-binned by bin centre)."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..formulas import scale_offset
from .base import Calibrator

__all__ = ["RunningHistogram", "HistogramCalibrator", "histogram_error"]


class RunningHistogram(nn.Module):
    """``bins`` counts over ``[lo, hi]``; the range expands when a batch falls outside it."""

    def __init__(self, bins: int):
        super().__init__()
        self.bins = bins
        self.register_buffer("counts", torch.zeros(bins, dtype=torch.float64))
        self.register_buffer("lo", torch.tensor(float("inf"), dtype=torch.float64))
        self.register_buffer("hi", torch.tensor(float("-inf"), dtype=torch.float64))

    @property
    def empty(self) -> bool:
        return not bool(torch.isfinite(self.lo))

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1).double().cpu()
        x = x[torch.isfinite(x)]
        if x.numel() == 0:
            return
        lo, hi = x.min(), x.max()
        if self.empty:
            new_lo, new_hi = lo, hi
        else:
            new_lo, new_hi = torch.minimum(self.lo, lo), torch.maximum(self.hi, hi)
        if new_hi <= new_lo:
            new_hi = new_lo + 1e-12
        if not self.empty and (new_lo < self.lo or new_hi > self.hi):
            self.counts = self._rebin(new_lo, new_hi)
        self.lo, self.hi = new_lo.clone(), new_hi.clone()
        self.counts += torch.histc(x, self.bins, self.lo.item(), self.hi.item())

    def _rebin(self, new_lo: torch.Tensor, new_hi: torch.Tensor) -> torch.Tensor:
        centres = self.centres()
        idx = ((centres - new_lo) / (new_hi - new_lo) * self.bins).long().clamp(0, self.bins - 1)
        out = torch.zeros_like(self.counts)
        out.index_add_(0, idx, self.counts)
        return out

    def width(self) -> float:
        return ((self.hi - self.lo) / self.bins).item()

    def centres(self) -> torch.Tensor:
        w = (self.hi - self.lo) / self.bins
        return self.lo + w * (torch.arange(self.bins, dtype=torch.float64) + 0.5)

    def reset(self) -> None:
        self.counts.zero_()
        self.lo.fill_(float("inf"))
        self.hi.fill_(float("-inf"))


def histogram_error(centres: torch.Tensor, counts: torch.Tensor, los: torch.Tensor, his: torch.Tensor,
                    bits: int, symmetric: bool) -> torch.Tensor:
    """L2 error ``sum_i n_i (c_i - fq(c_i))^2`` for each candidate range ``[los[k], his[k]]`` (vectorised)."""
    scale, offset = scale_offset(los, his, bits, symmetric)
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    s = scale.double().unsqueeze(1)
    o = offset.double().unsqueeze(1)
    q = torch.clamp(torch.round(centres.unsqueeze(0) / s + o), qmin, qmax)
    err = ((q - o) * s - centres.unsqueeze(0)) ** 2
    return (err * counts.unsqueeze(0)).sum(dim=1)


class HistogramCalibrator(Calibrator):
    """Base of the calibrators that search a range on a :class:`RunningHistogram` (constant memory)."""

    def __init__(self, num_of_bins: int):
        super().__init__()
        self.hist = RunningHistogram(num_of_bins)

    def observe(self, x: torch.Tensor) -> None:
        self.hist.add(x)

    def reset(self) -> None:
        self.hist.reset()

    def _check_observed(self) -> None:
        if self.hist.empty:
            raise RuntimeError(f"{self.name} calibrator has observed nothing")
