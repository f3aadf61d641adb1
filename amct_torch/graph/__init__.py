"""Graph capture (fx -> export -> module walk) and the structural passes: fold, swap, plan."""

from .capture import CaptureAttempt, CapturedGraph, CaptureError, Node, capture
from .fold import fold_batch_norm, fold_conv_bn_
from .plan import LayerPlan, Plan
from .swap import swap_layers

__all__ = ["CaptureAttempt", "CapturedGraph", "CaptureError", "Node", "capture", "fold_batch_norm",
           "fold_conv_bn_", "LayerPlan", "Plan", "swap_layers"]
