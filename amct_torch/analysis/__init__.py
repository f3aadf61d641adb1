"""Analysis: FLOPs/MACs and parameter counts (dense and sparsity-aware), per-layer pruning sensitivity,
compression reports (sparsity, unique values, bits, gzip size against fp32), and per-layer reports (bits,
factors, sparsity, MACs, output error against float; table, JSON, Markdown/HTML with plots)."""

from .flops import FlopsReport, LayerCount, count_flops
from .layer_report import LayerReport, LayerRow, layer_report
from .report import CompressionReport, LayerCompression, ModelSize, compression_report
from .sensitivity_scan import (Pruner, SensitivityResult, prunable_layers, register_pruner, registered_pruners,
                          sensitivity)

__all__ = ["FlopsReport", "LayerCount", "count_flops", "Pruner", "SensitivityResult", "prunable_layers",
           "register_pruner", "registered_pruners", "sensitivity", "CompressionReport", "LayerCompression",
           "ModelSize", "compression_report", "LayerReport", "LayerRow", "layer_report"]
