"""Typed configs, granularities and targeting (global -> module type -> module name)."""

from .auto_calibration import AutoCalibrationConfig
from .base import Config, ConfigError
from .cluster import ClusterConfig
from .decompose import DecomposeConfig
from .distill import DistillConfig
from .dynamic import DynamicQuantConfig
from .kvcache import KVCacheConfig
from .weight_only import WeightOnlyConfig
from .granularity import Granularity, PerChannel, PerGroup, PerTensor, PerToken, parse_granularity
from .prune import ChannelPruneConfig, ChannelSearchConfig
from .qat import QAT_BIT_WIDTHS, QatConfig
from .quant import QuantConfig
from .sparsity import MagnitudeConfig, NMConfig
from .targeting import Resolution, Targeting

__all__ = ["Config", "ConfigError", "Granularity", "PerChannel", "PerGroup", "PerTensor", "PerToken",
           "parse_granularity", "ClusterConfig", "DynamicQuantConfig", "KVCacheConfig", "WeightOnlyConfig", "ChannelPruneConfig", "ChannelSearchConfig", "QatConfig", "QAT_BIT_WIDTHS", "QuantConfig", "MagnitudeConfig", "NMConfig", "Resolution",
           "Targeting", "AutoCalibrationConfig", "DecomposeConfig", "DistillConfig"]

# AMCT file formats: PTQ JSON, simplified .cfg (protobuf text), QAT JSON and retrain .cfg, record file.
from .amct_cfg import CalibrationCfg, read_calibration_cfg, resolve_layer_configs, write_calibration_cfg
from .amct_json import AmctGlobal, read_quant_json, write_quant_json
from .amct_retrain import (RetrainCfg, RetrainSettings, read_retrain_cfg, read_retrain_json, resolve_retrain_configs,
                           write_retrain_json)
from .record import KVCacheRecord, LayerRecord, Record, read_record, write_record

__all__ += ["AmctGlobal", "read_quant_json", "write_quant_json", "CalibrationCfg", "read_calibration_cfg",
            "resolve_layer_configs", "write_calibration_cfg", "RetrainCfg", "RetrainSettings", "read_retrain_cfg",
            "read_retrain_json", "resolve_retrain_configs", "write_retrain_json", "KVCacheRecord", "LayerRecord", "Record",
            "read_record", "write_record"]
