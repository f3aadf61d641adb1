"""Typed configs, granularities and targeting (global -> module type -> module name)."""

from .base import Config, ConfigError
from .granularity import Granularity, PerChannel, PerGroup, PerTensor, PerToken, parse_granularity
from .qat import QAT_BIT_WIDTHS, QatConfig
from .quant import QuantConfig
from .targeting import Resolution, Targeting

__all__ = ["Config", "ConfigError", "Granularity", "PerChannel", "PerGroup", "PerTensor", "PerToken",
           "parse_granularity", "QatConfig", "QAT_BIT_WIDTHS", "QuantConfig", "Resolution", "Targeting"]

# AMCT file formats: PTQ JSON, simplified .cfg (protobuf text), record file.
from .amct_cfg import CalibrationCfg, read_calibration_cfg, resolve_layer_configs, write_calibration_cfg
from .amct_json import AmctGlobal, read_quant_json, write_quant_json
from .record import KVCacheRecord, LayerRecord, Record, read_record, write_record

__all__ += ["AmctGlobal", "read_quant_json", "write_quant_json", "CalibrationCfg", "read_calibration_cfg",
            "resolve_layer_configs", "write_calibration_cfg", "KVCacheRecord", "LayerRecord", "Record",
            "read_record", "write_record"]
