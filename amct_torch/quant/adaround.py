"""AdaRound (AMCT's ``ada_quantize``): learn whether each weight rounds up or down.

With ``s`` the ARQ scale and ``W_floor = floor(W / s)``, the soft weight is
``s * clip(W_floor + h(alpha), qmin, qmax)`` with the rectified sigmoid
``h(alpha) = clip(sigmoid(alpha) * (zeta - gamma) + gamma, 0, 1)``, ``zeta = 1.1``, ``gamma = -0.1``.
``alpha`` is learned to minimise the layer's output error on calibration inputs plus
``reg_param * sum(1 - |2h - 1|^beta)``, which pushes ``h`` to 0 or 1; ``beta`` anneals from
``beta_range[0]`` to ``beta_range[1]`` after the first ``warm_start`` fraction of ``num_iteration`` steps
(no regularisation before). Finally ``round_up = h(alpha) >= 0.5``, unless that reconstructs the layer
output worse than round-to-nearest on the same inputs (too few iterations), in which case nearest stays.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn

from ..config import Granularity
from .formulas import qrange
from .quantizers import ArqWeightQuantizer

__all__ = ["AdaRoundWeightQuantizer", "optimize_rounding"]

ZETA, GAMMA = 1.1, -0.1


class AdaRoundWeightQuantizer(ArqWeightQuantizer):
    """ARQ scales with learned rounding: ``round_up`` (0/1 per weight) replaces round-to-nearest."""

    def __init__(self, weight: torch.Tensor, bits: int, granularity: Granularity, axis: int, groups: int = 1):
        super().__init__(weight, bits, granularity, axis, groups)
        self.register_buffer("round_up", torch.zeros_like(weight, dtype=torch.uint8))
        self.register_buffer("optimized", torch.tensor(False))
        self._nearest(weight)

    @torch.no_grad()
    def _nearest(self, weight: torch.Tensor) -> None:
        v = weight.detach() / self.broadcast(self.scale, weight.shape)
        self.round_up.copy_((torch.round(v) > torch.floor(v)).to(torch.uint8))

    def _integers(self, weight: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        qmin, qmax = qrange(self.bits)
        s = self.broadcast(self.scale, weight.shape)
        return torch.clamp(torch.floor(weight.detach() / s) + up, qmin, qmax)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return self.forward_values(weight)

    def forward_values(self, weight: torch.Tensor) -> torch.Tensor:
        s = self.broadcast(self.scale, weight.shape)
        q = self._integers(weight, self.round_up.to(weight.dtype))
        # straight-through: the value is the rounded weight, the gradient that of the identity
        return weight + (q * s - weight).detach()

    def integer_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return self._integers(weight, self.round_up.to(weight.dtype)).to(torch.int8)

    def soft(self, weight: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        s = self.broadcast(self.scale, weight.shape)
        h = torch.clamp(torch.sigmoid(alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)
        qmin, qmax = qrange(self.bits)
        return torch.clamp(torch.floor(weight.detach() / s) + h, qmin, qmax) * s

    def init_alpha(self, weight: torch.Tensor) -> torch.Tensor:
        s = self.broadcast(self.scale, weight.shape)
        v = weight.detach() / s
        rest = (v - torch.floor(v)).clamp(0.01, 0.99)
        return -torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)


def _rec_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error summed per sample, averaged over the batch (as in the AdaRound/BRECQ code)."""
    return ((pred - target) ** 2).reshape(pred.shape[0], -1).sum(1).mean()


def optimize_rounding(stage: AdaRoundWeightQuantizer, weight: torch.Tensor,
                      layer_op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], inputs: Sequence[torch.Tensor],
                      quantized_inputs: Sequence[torch.Tensor], *, num_iteration: int, reg_param: float,
                      beta_range: tuple[float, float], warm_start: float, lr: float = 1e-2) -> dict[str, float]:
    """Learn ``stage.round_up`` for one layer; returns the reconstruction error before and after.

    ``layer_op(x, w)`` runs the layer with weight ``w``; targets are ``layer_op(x, weight)`` on the
    float ``inputs``, predictions use ``quantized_inputs`` (the layer's own input quantizer applied).
    """
    weight = weight.detach()
    with torch.no_grad():
        targets = [layer_op(x, weight) for x in inputs]
        before = sum(_rec_loss(layer_op(xq, stage.forward_values(weight)), t).item()
                     for xq, t in zip(quantized_inputs, targets)) / len(targets)
    alpha = nn.Parameter(stage.init_alpha(weight))
    opt = torch.optim.Adam([alpha], lr=lr)
    b_start, b_end = beta_range
    warm = int(warm_start * num_iteration)
    for it in range(num_iteration):
        k = it % len(targets)
        w_soft = stage.soft(weight, alpha)
        loss = _rec_loss(layer_op(quantized_inputs[k], w_soft), targets[k])
        if it >= warm:
            progress = (it - warm) / max(1, num_iteration - warm)
            beta = b_end + (b_start - b_end) * (1 - progress)
            h = torch.clamp(torch.sigmoid(alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)
            loss = loss + reg_param * torch.sum(1 - torch.abs(2 * h - 1) ** beta)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        h = torch.clamp(torch.sigmoid(alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)
        stage.round_up.copy_((h >= 0.5).to(torch.uint8))
        stage.optimized.fill_(True)
        after = sum(_rec_loss(layer_op(xq, stage.forward_values(weight)), t).item()
                    for xq, t in zip(quantized_inputs, targets)) / len(targets)
        if after > before:  # too few iterations to beat round-to-nearest: keep nearest
            stage._nearest(weight)
            after = before
    return {"error_nearest": before, "error_adaround": after}
