"""Min/max calibrator: the running minimum and maximum over all batches."""

from __future__ import annotations

import torch

from .base import Calibrator

__all__ = ["MinMaxCalibrator"]


class MinMaxCalibrator(Calibrator):
    """``[lo, hi] = [min x, max x]`` over every observed batch (kept in the state_dict)."""

    name = "minmax"

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("lo", torch.tensor(float("inf")))
        self.register_buffer("hi", torch.tensor(float("-inf")))

    def observe(self, x: torch.Tensor) -> None:
        x = x.detach()
        self.lo = torch.minimum(self.lo, x.min().float().to(self.lo.device))
        self.hi = torch.maximum(self.hi, x.max().float().to(self.hi.device))

    def clip_range(self, bits: int, symmetric: bool) -> tuple[float, float]:
        if not torch.isfinite(self.lo) or not torch.isfinite(self.hi):
            raise RuntimeError("minmax calibrator has observed nothing (or only non-finite values)")
        return self.lo.item(), self.hi.item()

    def reset(self) -> None:
        self.lo.fill_(float("inf"))
        self.hi.fill_(float("-inf"))
