"""Conv + BatchNorm trained as one folded unit (QAT), so that what is trained is what is deployed.

PTQ folds BN into the conv once. In QAT the BN statistics still move, so the pair is *simulated* folded
(Jacob et al. 2018, the scheme torch.ao also uses): the weight the quantizer sees is the folded weight
``w * gamma / sqrt(running_var + eps)`` (the :class:`BatchNormScale` stage, first in the conv's pipeline),
and after the convolution

* while BN statistics are live (training, not frozen): the per-channel factor is divided out again and
  BN runs on batch statistics (updating the running ones), so training sees batch-norm as usual;
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

    def apply_after_conv(self, y: torch.Tensor, conv_bias: torch.Tensor | None) -> torch.Tensor:
        """``y`` is the conv output with the folded weight and no bias; returns the BN output."""
        shape = (1, -1) + (1,) * (y.dim() - 2)
        factor = self.factor()
        if self.live():
            y = y / factor.view(shape)
            if conv_bias is not None:
                y = y + conv_bias.view(shape)
            momentum = self.momentum
            if momentum is None:  # cumulative moving average, as BatchNorm does
                self.num_batches_tracked.add_(1)
                momentum = 1.0 / float(self.num_batches_tracked)
            else:
                self.num_batches_tracked.add_(1)
            return F.batch_norm(y, self.running_mean, self.running_var, self.weight, self.bias, True, momentum, self.eps)
        b = conv_bias if conv_bias is not None else torch.zeros_like(self.running_mean)
        return y + ((b - self.running_mean) * factor + self.bias).view(shape)

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
