"""Analysis: FLOPs/MACs and parameter counts (dense and sparsity-aware), and per-layer pruning sensitivity."""

from .flops import FlopsReport, LayerCount, count_flops
from .sensitivity_scan import (Pruner, SensitivityResult, prunable_layers, register_pruner, registered_pruners,
                          sensitivity)

__all__ = ["FlopsReport", "LayerCount", "count_flops", "Pruner", "SensitivityResult", "prunable_layers",
           "register_pruner", "registered_pruners", "sensitivity"]
