"""Wrapper modules: the original layer + an ordered weight pipeline + activation-quantizer slots."""

from .base import CompressedLayer, WeightPipeline, register_wrapper, registered_types, wrapper_for
from .bn_fold import BatchNormScale, FoldedBatchNorm
from .layers import CompressedAvgPool, CompressedConv, CompressedConv1D, CompressedConvTranspose, CompressedLinear

__all__ = ["CompressedLayer", "WeightPipeline", "register_wrapper", "registered_types", "wrapper_for",
           "CompressedAvgPool", "CompressedConv", "CompressedConv1D", "CompressedConvTranspose", "CompressedLinear",
           "FoldedBatchNorm", "BatchNormScale"]
