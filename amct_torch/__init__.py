"""amct-torch: PyTorch-native model compression with an AMCT-compatible API.

Post-training quantization::

    import amct_torch
    model = amct_torch.quantize(model, amct_torch.QuantConfig(activation_calibrator="hfmg"), x)
    amct_torch.calibrate(model, loader)
    amct_torch.export(model, "out/model", x)     # fake-quant ONNX (ORT), deploy ONNX (ATC), record

Collaborative optimization (prune -> cluster -> QAT; each stage keeps what the previous one made)::

    model = amct_torch.prune_magnitude(model, amct_torch.MagnitudeConfig(sparsity=0.5, schedule="oneshot"), x)
    model = amct_torch.cluster_weights(model, amct_torch.ClusterConfig(clusters=16), x)
    qat = amct_torch.prepare_qat(model, amct_torch.QatConfig(), x)      # PCQAT
    amct_torch.check_preservation(qat).raise_if_broken()

Quantization-aware training::

    model = amct_torch.prepare_qat(model, amct_torch.QatConfig(weight_bits=4), x)
    ... train (or use amct_torch.lightning.QuantizationAwareTraining) ...
    amct_torch.export(model, "out/model", x)

AMCT scripts keep working with ``import amct_torch as amct`` (create_quant_config, quantize_model,
save_model; create_quant_retrain_config, create_quant_retrain_model, restore_quant_retrain_model,
save_quant_retrain_model; create/restore/save_prune_retrain_model, auto_channel_prune_search;
create/restore/save_compressed_retrain_model; auto_decomposition, decompose_network (also from
amct_torch.tensor_decompose); create_distill_config, create_distill_model, distill, save_distill_model;
accuracy_based_auto_calibration with AutoCalibrationEvaluatorBase (also from amct_torch.common.auto_calibration)).
The structural passes::

    from amct_torch import capture, fold_batch_norm, swap_layers, QuantConfig, Targeting

    graph = capture(model, x)                      # fx -> torch.export -> module walk, reported
    model, plan = fold_batch_norm(model.eval(), x) # Conv+BN folding, every BN reported
    model, plan = swap_layers(model, Targeting(QuantConfig(), module_name={"fc": None}), x)
    print(plan)
"""

from .config import (AutoCalibrationConfig, DecomposeConfig, DistillConfig, ChannelPruneConfig, ChannelSearchConfig, ClusterConfig, Config, ConfigError, Granularity,
                     DynamicQuantConfig, KVCacheConfig, MagnitudeConfig, NMConfig, PerChannel, PerGroup, PerTensor, PerToken, QatConfig,
                     QuantConfig, Targeting, WeightOnlyConfig)
from .graph import CapturedGraph, Plan, capture, fold_batch_norm, swap_layers
from .nn import CompressedLayer, register_wrapper
from .quant import (CalibrationError, balance, calibrate, freeze_bn_stats, freeze_quantizers, prepare_qat, quantize,
                    quantize_dynamic, quantize_weight_only)
from .sparsity import prune_channels, prune_magnitude, search_channel_pruning, shrink
from .quant.auto_calibration import AutoCalibrationResult, auto_calibrate, layer_sensitivity
from .decompose import apply_decomposition_info, decompose, plan_decomposition, save_decomposition_info
from . import distill  # the subpackage, callable as AMCT's distill() (see amct_torch/distill/__init__.py)
from .distill import BlockwiseLoss, distill_blockwise, find_blocks
from .analysis import CompressionReport, LayerReport, compression_report, layer_report
from .cluster import check_preservation, cluster_weights, reassign_clusters, strip_clustering
from . import export  # the subpackage, callable as the export verb (see amct_torch/export/__init__.py)
from .export.dynamic import export_dynamic
from .export.weight_only import export_weight_only
from .compat import (GreedySearch, SearchChannelBase, SensitivityBase, TaylorLossSensitivity, auto_channel_prune_search,
                     create_compressed_retrain_model, create_prune_retrain_model, create_quant_config,
                     create_quant_retrain_config, create_quant_retrain_model, quantize_model,
                     restore_compressed_retrain_model, restore_prune_retrain_model, restore_quant_retrain_model,
                     save_compressed_retrain_model, save_model, save_prune_retrain_model, save_quant_retrain_model,
                     QuantCalibrationOp, create_quant_cali_config, create_quant_cali_model, quantize_preprocess,
                     AutoCalibrationEvaluatorBase, accuracy_based_auto_calibration, auto_decomposition,
                     decompose_network, DistillSampleBase, ModelSingleTensorInput, create_distill_config,
                     create_distill_model, save_distill_model)

__version__ = "0.1.0"

__all__ = ["Config", "ConfigError", "Granularity", "PerChannel", "PerGroup", "PerTensor", "PerToken", "ChannelPruneConfig",
           "ChannelSearchConfig", "ClusterConfig", "MagnitudeConfig", "NMConfig", "KVCacheConfig", "WeightOnlyConfig",
           "quantize_weight_only", "export_weight_only", "DynamicQuantConfig", "quantize_dynamic", "export_dynamic",
           "QatConfig", "QuantConfig",
           "Targeting", "CapturedGraph", "Plan", "capture", "fold_batch_norm", "swap_layers", "CompressedLayer",
           "register_wrapper", "CalibrationError", "calibrate", "quantize", "prepare_qat",
           "freeze_bn_stats", "freeze_quantizers", "prune_channels", "prune_magnitude", "search_channel_pruning", "shrink",
           "cluster_weights", "reassign_clusters", "strip_clustering", "check_preservation", "compression_report",
           "CompressionReport", "export",
           "create_quant_config",
           "quantize_model", "save_model", "create_quant_retrain_config", "create_quant_retrain_model",
           "restore_quant_retrain_model", "save_quant_retrain_model", "create_prune_retrain_model",
           "restore_prune_retrain_model", "save_prune_retrain_model", "auto_channel_prune_search", "SensitivityBase",
           "TaylorLossSensitivity", "SearchChannelBase", "GreedySearch", "create_compressed_retrain_model",
           "restore_compressed_retrain_model", "save_compressed_retrain_model", "create_quant_cali_config",
           "create_quant_cali_model", "QuantCalibrationOp", "quantize_preprocess", "balance", "AutoCalibrationConfig", "AutoCalibrationResult", "auto_calibrate",
           "layer_sensitivity", "accuracy_based_auto_calibration", "AutoCalibrationEvaluatorBase", "DecomposeConfig",
           "decompose", "plan_decomposition", "save_decomposition_info", "apply_decomposition_info",
           "auto_decomposition", "decompose_network", "DistillConfig", "distill", "distill_blockwise", "find_blocks",
           "BlockwiseLoss", "create_distill_config", "create_distill_model", "save_distill_model", "DistillSampleBase",
           "ModelSingleTensorInput", "layer_report", "LayerReport", "__version__"]
