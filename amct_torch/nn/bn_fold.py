"""Conv + BatchNorm trained as one folded unit (QAT), so that what is trained is what is deployed.

PTQ folds BN into the conv once. In QAT the BN statistics still move, so the pair is *simulated* folded
(Jacob et al. 2018, the scheme torch.ao also uses): the weight the quantizer sees is the folded weight
``w * gamma / sqrt(running_var + eps)`` (the :class:`BatchNormScale` stage, first in the conv's pipeline),
and after the convolution

* while BN statistics are live (training, not frozen): the per-channel factor is divided out again and
  BN runs on batch statistics (updating the running ones), so training sees batch-norm as usual. The
  factor is divided out of the fake-quantized *weight* (``conv(x, q(w f) / f) = conv(x, q(w f)) / f``, the
  factor being per output channel), not out of the much larger conv output;
* once frozen (``freeze_bn_stats``), and in eval: ``y + (b - running_mean) * factor + beta``, exactly the
  folded conv that export writes.

The BN stays at its own module path as a :class:`FoldedBatchNorm` with the same parameter and buffer
names, so the ``state_dict`` keys of the float model still load, and it is the identity in the forward
(the conv applies it). :meth:`CompressedConv.bake_batch_norm` turns the pair into a plain folded conv.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["FoldedBatchNorm", "BatchNormScale"]


class FoldedBatchNorm(nn.Module):
    """A BatchNorm whose computation its convolution performs; identity in the forward."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, conv_path: str = ""):
        super().__init__()
        self.num_features, self.eps, self.momentum = bn.num_features, bn.eps, bn.momentum
        self.bn_type = type(bn).__name__
        self.conv_path = conv_path
        self.weight, self.bias = bn.weight, bn.bias
        self.register_buffer("running_mean", bn.running_mean)
        self.register_buffer("running_var", bn.running_var)
        self.register_buffer("num_batches_tracked", bn.num_batches_tracked)
        self.register_buffer("frozen", torch.tensor(False))

    def factor(self) -> torch.Tensor:
        """``gamma / sqrt(running_var + eps)`` per output channel (differentiable in gamma)."""
        return self.weight / torch.sqrt(self.running_var + self.eps)

    def live(self) -> bool:
        """Batch statistics in use (training and not frozen)."""
        return self.training and not bool(self.frozen)

    def batch_norm(self, y: torch.Tensor) -> torch.Tensor:
        """BN on ``y``'s batch statistics, updating the running ones (the live path)."""
        self.num_batches_tracked.add_(1)
        momentum = self.momentum
        if momentum is None:  # cumulative moving average, as BatchNorm does
            momentum = 1.0 / float(self.num_batches_tracked)
        return F.batch_norm(y, self.running_mean, self.running_var, self.weight, self.bias, True, momentum, self.eps)

    def unfold_weight(self, folded: torch.Tensor, axis: int = 0) -> torch.Tensor:
        """``folded / factor`` along the output-channel ``axis``: the conv with this weight computes the
        folded conv's output divided by the factor (the factor is per output channel, so dividing the
        small weight equals dividing the large output, and costs nothing in the backward pass)."""
        shape = [1] * folded.dim()
        shape[axis] = -1
        return folded / self.factor().view(shape)

    def apply_after_conv(self, y: torch.Tensor, conv_bias: torch.Tensor | None) -> torch.Tensor:
        """Frozen or eval: ``y`` is the folded conv's output without bias; adds the folded bias (exactly
        what the exported folded conv computes). Live statistics go through :meth:`unfold_weight` and
        :meth:`batch_norm` instead."""
        shape = (1, -1) + (1,) * (y.dim() - 2)
        return y + self.folded_bias(conv_bias).view(shape)

    def folded_bias(self, conv_bias: torch.Tensor | None) -> torch.Tensor:
        b = conv_bias if conv_bias is not None else torch.zeros_like(self.running_mean)
        return (b - self.running_mean) * self.factor() + self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def extra_repr(self) -> str:
        return f"{self.bn_type}({self.num_features}) folded into {self.conv_path}, {'frozen' if bool(self.frozen) else 'live'}"


class BatchNormScale(nn.Module):
    """Weight stage: ``w * gamma / sqrt(running_var + eps)`` along the output-channel axis."""

    def __init__(self, bn: FoldedBatchNorm, axis: int = 0):
        super().__init__()
        self.__dict__["bn"] = bn  # not a submodule: the BN lives at its own path
        self.axis = axis

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        shape = [1] * weight.dim()
        shape[self.axis] = -1
        return weight * self.bn.factor().view(shape)

    def extra_repr(self) -> str:
        return f"folded {self.bn.bn_type}"
