"""amct-torch: PyTorch-native model compression with an AMCT-compatible API.

The public surface (more verbs arrive as techniques land)::

    from amct_torch import capture, fold_batch_norm, swap_layers, QuantConfig, Targeting

    graph = capture(model, x)                      # fx -> torch.export -> module walk, reported
    model, plan = fold_batch_norm(model.eval(), x) # Conv+BN folding, every BN reported
    model, plan = swap_layers(model, Targeting(QuantConfig(), module_name={"fc": None}), x)
    print(plan)
"""

from .config import (Config, ConfigError, Granularity, PerChannel, PerGroup, PerTensor, PerToken, QuantConfig,
                     Targeting)
from .graph import CapturedGraph, Plan, capture, fold_batch_norm, swap_layers
from .nn import CompressedLayer, register_wrapper

__version__ = "0.1.0"

__all__ = ["Config", "ConfigError", "Granularity", "PerChannel", "PerGroup", "PerTensor", "PerToken", "QuantConfig",
           "Targeting", "CapturedGraph", "Plan", "capture", "fold_batch_norm", "swap_layers", "CompressedLayer",
           "register_wrapper", "__version__"]
