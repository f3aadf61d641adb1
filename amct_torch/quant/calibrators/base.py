"""Calibrator base: observe activation batches, then give the clip range ``[lo, hi]``.

A calibrator is an ``nn.Module`` so that small running statistics travel in the ``state_dict``; the
ones that keep raw samples (percentile, IFMR) hold them in a plain list and free them once the range
has been computed.
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod

import torch
import torch.nn as nn

from ..formulas import scale_offset

__all__ = ["Calibrator", "SampleStore", "candidate_mse"]

MAX_SAMPLES_PER_BATCH = 1 << 22


class Calibrator(nn.Module, metaclass=ABCMeta):
    """Observes tensors; ``clip_range(bits, symmetric)`` returns the chosen ``(lo, hi)``."""

    name: str = ""

    @abstractmethod
    def observe(self, x: torch.Tensor) -> None:
        """Accumulate statistics of one batch."""

    @abstractmethod
    def clip_range(self, bits: int, symmetric: bool) -> tuple[float, float]:
        """The range to quantize to, from everything observed so far."""

    @abstractmethod
    def reset(self) -> None:
        """Forget everything observed."""

    def release(self) -> None:
        """Free large buffers once the range is fixed (default: nothing to free)."""

    def compute(self, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = self.clip_range(bits, symmetric)
        return scale_offset(torch.tensor(lo), torch.tensor(hi), bits, symmetric)


class SampleStore:
    """Keeps the observed values (flattened float32), subsampled with a fixed stride above 4M per batch."""

    def __init__(self) -> None:
        self.chunks: list[torch.Tensor] = []

    def add(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1).float().cpu()
        if flat.numel() > MAX_SAMPLES_PER_BATCH:
            flat = flat[:: -(-flat.numel() // MAX_SAMPLES_PER_BATCH)]
        self.chunks.append(flat)

    def data(self) -> torch.Tensor:
        if not self.chunks:
            raise RuntimeError("nothing observed yet: run calibration batches through the model first")
        if len(self.chunks) > 1:
            self.chunks = [torch.cat(self.chunks)]
        return self.chunks[0]

    def clear(self) -> None:
        self.chunks = []


def kth_largest(data: torch.Tensor, fraction: float) -> float:
    """The value below which ``fraction`` of the data lies, counted from the top (1.0 -> the max)."""
    n = data.numel()
    k = int(round(n * (1.0 - fraction)))
    if k <= 0:
        return data.max().item()
    return torch.kthvalue(data, max(1, n - k)).values.item()


def kth_smallest(data: torch.Tensor, fraction: float) -> float:
    n = data.numel()
    k = int(round(n * (1.0 - fraction)))
    if k <= 0:
        return data.min().item()
    return torch.kthvalue(data, min(n, k + 1)).values.item()


def candidate_mse(data: torch.Tensor, los: torch.Tensor, his: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """Mean squared error of fake-quantizing ``data`` with each candidate range ``[los[k], his[k]]`` (one row each)."""
    scale, offset = scale_offset(los, his, bits, symmetric)
    s = scale.to(data.dtype).unsqueeze(1)
    o = offset.to(data.dtype).unsqueeze(1)
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    fq = (torch.clamp(torch.round(data.unsqueeze(0) / s + o), qmin, qmax) - o) * s
    return torch.mean((fq - data.unsqueeze(0)) ** 2, dim=1).double()
