"""Wrappers of the supported layer types: convolutions, transposed convolutions, Linear,
transformers' ``Conv1D`` and average pooling. Each ``_op`` is the original layer's own computation
with the pipeline's weight substituted, so an empty pipeline is bit-exact."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import CompressedLayer, register_lazy, register_wrapper
from .bn_fold import BatchNormScale, FoldedBatchNorm

__all__ = ["CompressedConv", "CompressedConvTranspose", "CompressedLinear", "CompressedConv1D", "CompressedAvgPool"]


@register_wrapper(nn.Conv1d, nn.Conv2d, nn.Conv3d)
class CompressedConv(CompressedLayer):
    """Conv1d/2d/3d. Weight ``(out, in/groups, *k)``: output channels on axis 0."""

    weight_channel_axis = 0

    @property
    def folded_bn(self) -> FoldedBatchNorm | None:
        """The BatchNorm trained folded into this conv (QAT), or None."""
        return self.__dict__.get("_folded_bn")

    def attach_batch_norm(self, bn: FoldedBatchNorm) -> None:
        """Train this conv and ``bn`` as one folded unit (see :mod:`amct_torch.nn.bn_fold`)."""
        if self.folded_bn is not None:
            raise ValueError(f"a BatchNorm is already folded into this {type(self.module).__name__}")
        if any(type(s).__name__ == "ClusterStage" for s in self.weight_pipeline):
            raise ValueError(f"this {type(self.module).__name__} is clustered: its BatchNorm must be folded before "
                             "clustering (cluster_weights does that), not trained folded after it")
        self.__dict__["_folded_bn"] = bn
        self.weight_pipeline.insert(0, BatchNormScale(bn, self.weight_channel_axis))

    @torch.no_grad()
    def bake_batch_norm(self) -> None:
        """Make the folding permanent: weight and bias of the conv become the folded ones (for export)."""
        bn = self.folded_bn
        if bn is None:
            return
        m = self.module
        folded_w = self.weight_pipeline[0](m.weight)
        bias = bn.folded_bias(m.bias)
        m.weight.copy_(folded_w)
        if m.bias is None:
            m.bias = nn.Parameter(bias.clone())
        else:
            m.bias.copy_(bias)
        del self.weight_pipeline[0]
        del self.__dict__["_folded_bn"]

    def _op(self, x: torch.Tensor, weight: torch.Tensor | None, *args: Any, **kwargs: Any) -> torch.Tensor:
        bn = self.folded_bn
        if bn is None:
            return self.module._conv_forward(x, weight, self.effective_bias())
        if bn.live():
            unfolded = bn.unfold_weight(weight, self.weight_channel_axis)
            return bn.batch_norm(self.module._conv_forward(x, unfolded, self.effective_bias()))
        return bn.apply_after_conv(self.module._conv_forward(x, weight, None), self.effective_bias())


_CONV_T = {nn.ConvTranspose1d: (F.conv_transpose1d, 1), nn.ConvTranspose2d: (F.conv_transpose2d, 2),
           nn.ConvTranspose3d: (F.conv_transpose3d, 3)}


@register_wrapper(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
class CompressedConvTranspose(CompressedLayer):
    """ConvTranspose1d/2d/3d. Weight ``(in, out/groups, *k)``: output channels on axis 1, per group."""

    weight_channel_axis = 1

    def _op(self, x: torch.Tensor, weight: torch.Tensor | None, output_size: list[int] | None = None) -> torch.Tensor:
        m = self.module
        fn, dims = next(v for k, v in _CONV_T.items() if isinstance(m, k))
        output_padding = m._output_padding(x, output_size, m.stride, m.padding, m.kernel_size, dims, m.dilation)
        return fn(x, weight, self.effective_bias(), m.stride, m.padding, output_padding, m.groups, m.dilation)


@register_wrapper(nn.Linear)
class CompressedLinear(CompressedLayer):
    """Linear. Weight ``(out, in)``: output channels on axis 0."""

    weight_channel_axis = 0

    def _op(self, x: torch.Tensor, weight: torch.Tensor | None, *args: Any, **kwargs: Any) -> torch.Tensor:
        return F.linear(x, weight, self.effective_bias())


class CompressedConv1D(CompressedLayer):
    """transformers' ``Conv1D`` (GPT-2 projections): a Linear with weight ``(in, out)``, output axis 1."""

    weight_channel_axis = 1

    def _op(self, x: torch.Tensor, weight: torch.Tensor | None, *args: Any, **kwargs: Any) -> torch.Tensor:
        size_out = x.size()[:-1] + (self.module.nf,)
        y = torch.addmm(self.effective_bias(), x.view(-1, x.size(-1)), weight)
        return y.view(size_out)


def _register_transformers_conv1d() -> None:
    from transformers.pytorch_utils import Conv1D

    register_wrapper(Conv1D)(CompressedConv1D)


register_lazy("transformers.pytorch_utils", _register_transformers_conv1d)


@register_wrapper(nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
class CompressedAvgPool(CompressedLayer):
    """Average pooling: no weight; AMCT quantizes its input."""

    weight_channel_axis = None
    has_weight = False

    def _op(self, x: torch.Tensor, weight: torch.Tensor | None, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.module(x)
