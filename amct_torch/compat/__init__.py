"""AMCT's classic API (file-driven), built on the Pythonic API. Re-exported by ``amct_torch``.

AMCT's ``distill`` function is :func:`amct_torch.compat.distill.distill` (``amct_torch.compat.distill`` stays the
module); at the top level ``amct_torch.distill(...)`` calls it."""

from .prune import (GreedySearch, PruneReport, SearchChannelBase, SensitivityBase, TaylorLossSensitivity,
                    auto_channel_prune_search, create_compressed_retrain_model, create_prune_retrain_model,
                    restore_compressed_retrain_model, restore_prune_retrain_model, save_compressed_retrain_model,
                    save_prune_retrain_model)
from .auto_calibration import AutoCalibrationEvaluatorBase, accuracy_based_auto_calibration
from .balance import quantize_preprocess
from .decompose import auto_decomposition, decompose_network
from .distill import (DistillSampleBase, ModelSingleTensorInput, create_distill_config, create_distill_model,
                      save_distill_model)
from .kvcache import QuantCalibrationOp, create_quant_cali_config, create_quant_cali_model
from .ptq import create_quant_config, quantize_model, save_model
from .qat import (create_quant_retrain_config, create_quant_retrain_model, restore_quant_retrain_model,
                  save_quant_retrain_model)

__all__ = ["create_quant_config", "quantize_model", "save_model", "create_quant_retrain_config",
           "create_quant_retrain_model", "restore_quant_retrain_model", "save_quant_retrain_model",
           "create_prune_retrain_model", "restore_prune_retrain_model", "save_prune_retrain_model",
           "auto_channel_prune_search", "SensitivityBase", "TaylorLossSensitivity", "SearchChannelBase", "GreedySearch",
           "PruneReport", "create_compressed_retrain_model", "restore_compressed_retrain_model",
           "save_compressed_retrain_model", "create_quant_cali_config", "create_quant_cali_model", "QuantCalibrationOp",
           "quantize_preprocess", "accuracy_based_auto_calibration", "AutoCalibrationEvaluatorBase",
           "auto_decomposition", "decompose_network", "create_distill_config", "create_distill_model",
           "save_distill_model", "DistillSampleBase", "ModelSingleTensorInput"]
