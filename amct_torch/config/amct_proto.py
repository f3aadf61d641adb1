"""AMCT's protobuf message types, built at import time without ``protoc``.

The schemas of AMCT's ``calibration_config_pytorch.proto`` (the simplified ``.cfg`` of PTQ),
``retrain_config_pytorch.proto`` (the simplified ``.cfg`` of QAT, pruning and combined compression),
``distill_config_pytorch.proto`` (the simplified ``.cfg`` of block-wise distillation),
``scale_offset_record_pytorch.proto`` (the record file of quantization factors) and the ``AttrProto``
(used by prune records) and ``AutoChannelPruneConfig`` (the auto channel-prune search's config) of
``basic_info.proto`` (package ``AMCTProto``) are written out here as
``FileDescriptorProto`` objects and loaded into a *private* descriptor pool, so nothing in the
process-wide default pool is touched and no generated ``_pb2`` module is needed. Field names, numbers,
labels and defaults follow AMCT (proto2); see ``docs`` notes in amct.md sections 2.2, 2.3 and 3. In
the retrain schema the numbers amct.md does not give (the override messages, the pruner wrappers, the
oneof names) are our choice; AMCT's files are protobuf *text*, which uses names, not numbers.

``AttrProto`` follows AMCT's own helper code: the enum is ``AttrProto.AttrType`` with ONNX's numbering
(``UNDEFINED=0, FLOAT=1, INT=2, STRING=3, FLOATS=6, INTS=7, STRINGS=8``); ``AttributeType`` below is an
alias of it. The fields are numbered ``name=1, type=2, f=3, i=4, s=5, floats=6, ints=7, strings=8`` so
that text output lists them in the order AMCT's record examples show (``name``, ``type``, value). The
numbers are our choice (basic_info.proto was not available); AMCT's files are protobuf *text*, which
uses names, not numbers.

    >>> cfg = parse_text("batch_num: 2 common_config { hfmg_quantize { num_of_bins: 2048 } }", AMCTConfig)
    >>> cfg.common_config.WhichOneof("acts_quant_algo"), cfg.activation_offset
    ('hfmg_quantize', True)
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
from typing import Any, TypeVar

from google.protobuf import descriptor_pb2, descriptor_pool, message, text_format

from .base import ConfigError

__all__ = [
    "POOL", "parse_text", "to_text", "atomic_write_text",
    # calibration_config_pytorch.proto
    "AMCTConfig", "OverrideLayerType", "OverrideLayer", "CalibrationConfig", "ARQuantize", "ADAquantize",
    "DMQBalancer", "FMRQuantize", "HFMGQuantize", "CalibrationDataType", "FakequantPrecisionMode",
    # retrain_config_pytorch.proto
    "AMCTRetrainConfig", "RetrainOverrideLayer", "RetrainOverrideLayerType", "RetrainDataQuantConfig",
    "ActULQquantize", "ClipMaxMin", "RetrainWeightQuantConfig", "ARQRetrain", "WtsULQRetrain", "PruneConfig",
    "FilterPruner", "BalancedL2NormFilterPruner", "NOutOfMPruner", "L1SelectivePruner", "DataType", "NOutOfMType",
    # scale_offset_record_pytorch.proto and basic_info.proto
    "SingleLayerRecord", "SingleLayerKVCacheRecord", "MapFiledEntry", "ScaleOffsetRecord", "PruneRecord",
    "PruneNode", "AttrProto", "AttributeType", "AutoChannelPruneConfig",
    # quant_calibration_config_pytorch.proto (KV cache)
    "AMCTQuantCaliConfig", "KVCacheQuantConfig", "KVOverrideLayer", "KVDataQuantConfig",
    # distill_config_pytorch.proto
    "AMCTDistillConfig", "DistillGroup", "DistillWeightQuantConfig", "DistillOverrideLayer",
    "DistillOverrideLayerType",
]

M = TypeVar("M", bound=message.Message)

_F = descriptor_pb2.FieldDescriptorProto
_LABELS = {"optional": _F.LABEL_OPTIONAL, "required": _F.LABEL_REQUIRED, "repeated": _F.LABEL_REPEATED}
_SCALARS = {"float": _F.TYPE_FLOAT, "double": _F.TYPE_DOUBLE, "int32": _F.TYPE_INT32, "int64": _F.TYPE_INT64,
            "uint32": _F.TYPE_UINT32, "uint64": _F.TYPE_UINT64, "bool": _F.TYPE_BOOL, "string": _F.TYPE_STRING,
            "bytes": _F.TYPE_BYTES}

# One field: (label, type, name, number[, default][, oneof]). A type that is not a scalar is a
# fully qualified message or enum name (".AMCTProto.AttrProto.AttrType"); enums are listed in ``enums``.


def _file(name: str, package: str, messages: list[tuple], enums: list[tuple] = (),
          deps: tuple[str, ...] = (), enum_types: frozenset[str] = frozenset()) -> descriptor_pb2.FileDescriptorProto:
    fdp = descriptor_pb2.FileDescriptorProto(name=name, package=package, syntax="proto2", dependency=list(deps))
    for ename, values in enums:
        _enum(fdp.enum_type.add(), ename, values)
    for spec in messages:
        _message(fdp.message_type.add(), spec, enum_types)
    return fdp


def _enum(edp: descriptor_pb2.EnumDescriptorProto, name: str, values: list[tuple[str, int]]) -> None:
    edp.name = name
    for vname, number in values:
        edp.value.add(name=vname, number=number)


def _message(dp: descriptor_pb2.DescriptorProto, spec: tuple, enum_types: frozenset[str]) -> None:
    name, fields = spec[0], spec[1]
    extra = spec[2] if len(spec) > 2 else {}
    dp.name = name
    for ename, values in extra.get("enums", ()):
        _enum(dp.enum_type.add(), ename, values)
    oneofs: list[str] = []
    for field in fields:
        label, type_, fname, number = field[:4]
        opts = field[4] if len(field) > 4 else {}
        fd = dp.field.add(name=fname, number=number, label=_LABELS[label])
        if type_ in _SCALARS:
            fd.type = _SCALARS[type_]
        else:
            fd.type = _F.TYPE_ENUM if type_ in enum_types else _F.TYPE_MESSAGE
            fd.type_name = type_
        if "default" in opts:
            fd.default_value = opts["default"]
        if "oneof" in opts:
            if opts["oneof"] not in oneofs:
                oneofs.append(opts["oneof"])
                dp.oneof_decl.add(name=opts["oneof"])
            fd.oneof_index = oneofs.index(opts["oneof"])


def _d(value: str) -> dict[str, str]:
    return {"default": value}


def _o(name: str) -> dict[str, str]:
    return {"oneof": name}


_BASIC_INFO = _file(
    "amct_pytorch/proto/basic_info.proto", "AMCTProto",
    messages=[
        ("AttrProto", [
            ("optional", "string", "name", 1),
            ("optional", ".AMCTProto.AttrProto.AttrType", "type", 2),
            ("optional", "float", "f", 3),
            ("optional", "int64", "i", 4),
            ("optional", "string", "s", 5),
            ("repeated", "float", "floats", 6),
            ("repeated", "int64", "ints", 7),
            ("repeated", "string", "strings", 8),
        ], {"enums": [("AttrType", [("UNDEFINED", 0), ("FLOAT", 1), ("INT", 2), ("STRING", 3),
                                     ("FLOATS", 6), ("INTS", 7), ("STRINGS", 8)])]}),
        # auto_channel_prune_search's config (amct.md 2.6); the field numbers are our choice.
        ("AutoChannelPruneConfig", [
            ("required", "float", "compress_ratio", 1),
            ("optional", "bool", "ascend_optimized", 2, _d("true")),
            ("optional", "float", "max_prune_ratio", 3, _d("1.0")),
            ("optional", "uint32", "test_iteration", 4, _d("1")),
            ("optional", "string", "override_prune_cfg", 5),
        ]),
    ],
    enum_types=frozenset({".AMCTProto.AttrProto.AttrType"}),
)

_CALIBRATION = _file(
    "amct_pytorch/proto/calibration_config_pytorch.proto", "",
    enums=[("CalibrationDataType", [("INT8", 1), ("INT16", 2)]),
           ("FakequantPrecisionMode", [("DEFAULT", 0), ("FORCE_FP16_QUANT", 1)])],
    enum_types=frozenset({".CalibrationDataType", ".FakequantPrecisionMode"}),
    messages=[
        ("AMCTConfig", [
            ("optional", "uint32", "batch_num", 1, _d("1")),
            ("optional", "bool", "activation_offset", 2, _d("true")),
            ("repeated", "string", "skip_layers", 10),
            ("repeated", "string", "skip_layer_types", 11),
            ("optional", ".FakequantPrecisionMode", "fakequant_precision_mode", 21),
            ("optional", ".CalibrationConfig", "common_config", 50),
            ("repeated", ".OverrideLayerType", "override_layer_types", 51),
            ("repeated", ".OverrideLayer", "override_layer_configs", 100),
            ("optional", "bool", "do_fusion", 200, _d("true")),
            ("repeated", "string", "skip_fusion_layers", 201),
        ]),
        ("OverrideLayerType", [
            ("required", "string", "layer_type", 1),
            ("required", ".CalibrationConfig", "calibration_config", 2),
        ]),
        ("OverrideLayer", [
            ("required", "string", "layer_name", 1),
            ("required", ".CalibrationConfig", "calibration_config", 2),
        ]),
        ("CalibrationConfig", [
            ("optional", ".ARQuantize", "arq_quantize", 13, _o("wts_quant_algo")),
            ("optional", ".ADAquantize", "ada_quantize", 15, _o("wts_quant_algo")),
            ("optional", ".FMRQuantize", "ifmr_quantize", 100, _o("acts_quant_algo")),
            ("optional", ".HFMGQuantize", "hfmg_quantize", 101, _o("acts_quant_algo")),
            ("optional", ".DMQBalancer", "dmq_balancer", 200, _o("tensor_balancer")),
        ]),
        ("ARQuantize", [
            ("optional", "bool", "channel_wise", 1),
            ("optional", "uint32", "quant_bits", 10),
        ]),
        ("ADAquantize", [
            ("optional", "uint32", "num_iteration", 1, _d("10000")),
            ("optional", "float", "reg_param", 2, _d("0.01")),
            ("optional", "float", "beta_range_start", 3, _d("20")),
            ("optional", "float", "beta_range_end", 4, _d("2")),
            ("optional", "float", "warm_start", 5, _d("0.2")),
            ("optional", "bool", "channel_wise", 10),
        ]),
        ("DMQBalancer", [
            ("optional", "float", "migration_strength", 1, _d("0.5")),
        ]),
        ("FMRQuantize", [
            ("optional", "float", "search_range_start", 1, _d("0.7")),
            ("optional", "float", "search_range_end", 2, _d("1.3")),
            ("optional", "float", "search_step", 3, _d("0.01")),
            ("optional", "float", "max_percentile", 4, _d("0.999999")),
            ("optional", "float", "min_percentile", 5, _d("0.999999")),
            ("optional", "bool", "asymmetric", 6),
            ("optional", ".CalibrationDataType", "dst_type", 10, _d("INT8")),
        ]),
        ("HFMGQuantize", [
            ("optional", "uint32", "num_of_bins", 1, _d("4096")),
            ("optional", "bool", "asymmetric", 2),
            ("optional", ".CalibrationDataType", "dst_type", 10, _d("INT8")),
        ]),
    ],
)

# Retrain (QAT / prune / combined compression) config. AMCT gives batch_num=1, retrain_data_quant_config=2,
# retrain_weight_quant_config=3, skip_layers=4, override_layer_configs=5, skip_layer_types=6,
# override_layer_types=7, prune_config=8, regular_prune_skip_*=9/10, quant_skip_*=11/12, ClipMaxMin 3/5.
# Package AMCTRetrain (our choice, invisible in text format): its DataType values (INT4, INT8, INT16) would
# clash with CalibrationDataType's in one package, since proto enum values are package-scoped.
_OVERRIDE_BODY = [
    ("optional", ".AMCTRetrain.RetrainDataQuantConfig", "retrain_data_quant_config", 2),
    ("optional", ".AMCTRetrain.RetrainWeightQuantConfig", "retrain_weight_quant_config", 3),
    ("optional", ".AMCTRetrain.PruneConfig", "prune_config", 4),
]
_RETRAIN = _file(
    "amct_pytorch/proto/retrain_config_pytorch.proto", "AMCTRetrain",
    deps=("amct_pytorch/proto/calibration_config_pytorch.proto",),
    enums=[("DataType", [("INT4", 0), ("INT8", 1), ("INT16", 2)]),
           ("NOutOfMType", [("M4N2", 0)])],
    enum_types=frozenset({".AMCTRetrain.DataType", ".AMCTRetrain.NOutOfMType", ".FakequantPrecisionMode"}),
    messages=[
        ("AMCTRetrainConfig", [
            ("optional", "uint32", "batch_num", 1, _d("1")),
            ("optional", ".AMCTRetrain.RetrainDataQuantConfig", "retrain_data_quant_config", 2),
            ("optional", ".AMCTRetrain.RetrainWeightQuantConfig", "retrain_weight_quant_config", 3),
            ("repeated", "string", "skip_layers", 4),
            ("repeated", ".AMCTRetrain.RetrainOverrideLayer", "override_layer_configs", 5),
            ("repeated", "string", "skip_layer_types", 6),
            ("repeated", ".AMCTRetrain.RetrainOverrideLayerType", "override_layer_types", 7),
            ("optional", ".AMCTRetrain.PruneConfig", "prune_config", 8),
            ("repeated", "string", "regular_prune_skip_layers", 9),
            ("repeated", "string", "regular_prune_skip_types", 10),
            ("repeated", "string", "quant_skip_layers", 11),
            ("repeated", "string", "quant_skip_types", 12),
            ("optional", ".FakequantPrecisionMode", "fakequant_precision_mode", 21),
        ]),
        ("RetrainOverrideLayer", [("required", "string", "layer_name", 1)] + _OVERRIDE_BODY),
        ("RetrainOverrideLayerType", [("required", "string", "layer_type", 1)] + _OVERRIDE_BODY),
        ("RetrainDataQuantConfig", [
            ("optional", ".AMCTRetrain.ActULQquantize", "ulq_quantize", 1, _o("data_retrain_algo")),
        ]),
        ("ActULQquantize", [
            ("optional", ".AMCTRetrain.ClipMaxMin", "clip_max_min", 1),
            ("optional", "bool", "fixed_min", 2),
            ("optional", ".AMCTRetrain.DataType", "dst_type", 3, _d("INT8")),
        ]),
        ("ClipMaxMin", [
            ("required", "float", "clip_max", 3),
            ("required", "float", "clip_min", 5),
        ]),
        ("RetrainWeightQuantConfig", [
            ("optional", ".AMCTRetrain.ARQRetrain", "arq_retrain", 1, _o("weights_retrain_algo")),
            ("optional", ".AMCTRetrain.WtsULQRetrain", "ulq_retrain", 2, _o("weights_retrain_algo")),
        ]),
        ("ARQRetrain", [
            ("optional", ".AMCTRetrain.DataType", "dst_type", 1, _d("INT8")),
            ("optional", "bool", "channel_wise", 2),
        ]),
        ("WtsULQRetrain", [
            ("optional", ".AMCTRetrain.DataType", "dst_type", 1, _d("INT8")),
            ("optional", "bool", "channel_wise", 2),
        ]),
        ("PruneConfig", [
            ("optional", ".AMCTRetrain.FilterPruner", "filter_pruner", 1, _o("regular_prune_strategy")),
            ("optional", ".AMCTRetrain.NOutOfMPruner", "n_out_of_m_pruner", 2, _o("regular_prune_strategy")),
        ]),
        ("FilterPruner", [
            ("optional", ".AMCTRetrain.BalancedL2NormFilterPruner", "balanced_l2_norm_filter_prune", 1, _o("filter_prune_algo")),
        ]),
        ("BalancedL2NormFilterPruner", [
            ("required", "float", "prune_ratio", 1),
            ("optional", "bool", "ascend_optimized", 2, _d("true")),
        ]),
        ("NOutOfMPruner", [
            ("optional", ".AMCTRetrain.L1SelectivePruner", "l1_selective_prune", 1, _o("n_out_of_m_prune_algo")),
        ]),
        ("L1SelectivePruner", [
            ("optional", ".AMCTRetrain.NOutOfMType", "n_out_of_m_type", 1, _d("M4N2")),
            ("optional", "uint32", "update_freq", 2, _d("0")),
        ]),
    ],
)

_RECORD = _file(
    "amct_pytorch/proto/scale_offset_record_pytorch.proto", "",
    deps=("amct_pytorch/proto/basic_info.proto",),
    messages=[
        ("SingleLayerRecord", [
            ("optional", "float", "scale_d", 1),
            ("optional", "int32", "offset_d", 2),
            ("repeated", "float", "scale_w", 3),
            ("repeated", "int32", "offset_w", 4),
            ("repeated", "uint32", "shift_bit", 5),
            ("repeated", "float", "tensor_balance_factor", 6),
            ("optional", "bool", "skip_fusion", 9, _d("false")),
            ("optional", "string", "dst_type", 10, _d("INT8")),
            ("optional", "string", "act_type", 11, _d("INT8")),
            ("optional", "string", "wts_type", 12, _d("INT8")),
            ("optional", "string", "fakequant_precision_mode", 13, _d("DEFAULT")),
            ("optional", "float", "scale_h", 21),
            ("optional", "int32", "offset_h", 22),
            ("repeated", "float", "scale_r", 23),
            ("repeated", "int32", "offset_r", 24),
        ]),
        ("SingleLayerKVCacheRecord", [
            ("repeated", "float", "scale", 1),
            ("repeated", "int32", "offset", 2),
        ]),
        ("MapFiledEntry", [
            ("optional", "string", "key", 1),
            ("optional", ".SingleLayerRecord", "value", 2),
            ("optional", ".SingleLayerKVCacheRecord", "kv_cache_value", 3),
        ]),
        ("ScaleOffsetRecord", [
            ("repeated", ".MapFiledEntry", "record", 1),
            ("repeated", ".PruneRecord", "prune_record", 2),
        ]),
        ("PruneRecord", [
            ("repeated", ".PruneNode", "producer", 1),
            ("repeated", ".PruneNode", "consumer", 2),
            ("optional", ".PruneNode", "selective_prune", 3),
        ]),
        ("PruneNode", [
            ("required", "string", "name", 1),
            ("repeated", ".AMCTProto.AttrProto", "attr", 2),
        ]),
    ],
)

# KV-cache calibration config (quant_calibration_config_pytorch.proto; amct.md 2.5 gives the names
# kv_cache_quant_config / quant_layers / calibration_config / override_layers_configs / layer_name /
# kv_data_quant_config / quant_granularity; the numbers and message names are our choice). The algorithm
# messages are the PTQ config's FMRQuantize / HFMGQuantize.
_KV_DATA = [
    ("optional", ".FMRQuantize", "ifmr_quantize", 1, _o("kv_quant_algo")),
    ("optional", ".HFMGQuantize", "hfmg_quantize", 2, _o("kv_quant_algo")),
    ("optional", "uint32", "quant_granularity", 3, _d("0")),
]
_KV_CALIBRATION = _file(
    "amct_pytorch/proto/quant_calibration_config_pytorch.proto", "",
    deps=("amct_pytorch/proto/calibration_config_pytorch.proto",),
    messages=[
        ("AMCTQuantCaliConfig", [
            ("optional", "uint32", "batch_num", 1, _d("1")),
            ("optional", "bool", "activation_offset", 2, _d("true")),
            ("optional", ".KVCacheQuantConfig", "kv_cache_quant_config", 3),
            ("repeated", ".KVOverrideLayer", "override_layers_configs", 4),
        ]),
        ("KVCacheQuantConfig", [
            ("repeated", "string", "quant_layers", 1),
            ("optional", ".KVDataQuantConfig", "calibration_config", 2),
        ]),
        ("KVOverrideLayer", [
            ("required", "string", "layer_name", 1),
            ("required", ".KVDataQuantConfig", "kv_data_quant_config", 2),
        ]),
        ("KVDataQuantConfig", _KV_DATA),
    ],
)

# Block-wise distillation config (distill_config_pytorch.proto, package AMCTPytorchDistillProto; the field
# names and numbers are AMCT's). Its data config (oneof ulq_quantize: ActULQquantize) and the ARQDistill /
# WtsULQDistill weight messages have the retrain schema's fields, so the retrain messages are reused (text
# format uses field names only). AMCT's distill DataType has INT4 and INT8: the reused retrain DataType
# also parses INT16, which the distill readers refuse.
_DISTILL = _file(
    "amct_pytorch/proto/distill_config_pytorch.proto", "AMCTPytorchDistillProto",
    deps=("amct_pytorch/proto/retrain_config_pytorch.proto",),
    messages=[
        ("AMCTDistillConfig", [
            ("optional", "uint32", "batch_num", 1, _d("1")),
            ("optional", "uint32", "group_size", 2, _d("1")),
            ("optional", "bool", "data_dump", 3, _d("false")),
            ("repeated", ".AMCTPytorchDistillProto.DistillGroup", "distill_group", 10),
            ("optional", ".AMCTRetrain.RetrainDataQuantConfig", "distill_data_quant_config", 11),
            ("optional", ".AMCTPytorchDistillProto.DistillWeightQuantConfig", "distill_weight_quant_config", 12),
            ("repeated", ".AMCTPytorchDistillProto.DistillOverrideLayer", "distill_override_layers", 110),
            ("repeated", ".AMCTPytorchDistillProto.DistillOverrideLayerType", "distill_override_layer_types", 111),
            ("repeated", "string", "quant_skip_layers", 120),
            ("repeated", "string", "quant_skip_layer_types", 121),
        ]),
        ("DistillGroup", [
            ("required", "string", "start_layer_name", 1),
            ("required", "string", "end_layer_name", 2),
        ]),
        ("DistillWeightQuantConfig", [
            ("optional", ".AMCTRetrain.ARQRetrain", "arq_distill", 1, _o("weights_quant_algo")),
            ("optional", ".AMCTRetrain.WtsULQRetrain", "ulq_distill", 2, _o("weights_quant_algo")),
        ]),
        ("DistillOverrideLayer", [
            ("required", "string", "layer_name", 1),
            ("optional", ".AMCTRetrain.RetrainDataQuantConfig", "distill_data_quant_config", 10),
            ("optional", ".AMCTPytorchDistillProto.DistillWeightQuantConfig", "distill_weight_quant_config", 11),
        ]),
        ("DistillOverrideLayerType", [
            ("required", "string", "layer_type", 1),
            ("optional", ".AMCTRetrain.RetrainDataQuantConfig", "distill_data_quant_config", 10),
            ("optional", ".AMCTPytorchDistillProto.DistillWeightQuantConfig", "distill_weight_quant_config", 11),
        ]),
    ],
)

#: The private descriptor pool holding AMCT's types (the process-wide default pool is not touched).
POOL = descriptor_pool.DescriptorPool()
for _fdp in (_BASIC_INFO, _CALIBRATION, _RETRAIN, _RECORD, _KV_CALIBRATION, _DISTILL):
    POOL.Add(_fdp)


def _message_class(full_name: str) -> type[message.Message]:
    desc = POOL.FindMessageTypeByName(full_name)
    try:
        from google.protobuf.message_factory import GetMessageClass
    except ImportError:  # protobuf < 4.21
        from google.protobuf import message_factory
        return message_factory.MessageFactory(POOL).GetPrototype(desc)
    return GetMessageClass(desc)


AMCTConfig = _message_class("AMCTConfig")
OverrideLayerType = _message_class("OverrideLayerType")
OverrideLayer = _message_class("OverrideLayer")
CalibrationConfig = _message_class("CalibrationConfig")
ARQuantize = _message_class("ARQuantize")
ADAquantize = _message_class("ADAquantize")
DMQBalancer = _message_class("DMQBalancer")
FMRQuantize = _message_class("FMRQuantize")
HFMGQuantize = _message_class("HFMGQuantize")

AMCTRetrainConfig = _message_class("AMCTRetrain.AMCTRetrainConfig")
RetrainOverrideLayer = _message_class("AMCTRetrain.RetrainOverrideLayer")
RetrainOverrideLayerType = _message_class("AMCTRetrain.RetrainOverrideLayerType")
RetrainDataQuantConfig = _message_class("AMCTRetrain.RetrainDataQuantConfig")
ActULQquantize = _message_class("AMCTRetrain.ActULQquantize")
ClipMaxMin = _message_class("AMCTRetrain.ClipMaxMin")
RetrainWeightQuantConfig = _message_class("AMCTRetrain.RetrainWeightQuantConfig")
ARQRetrain = _message_class("AMCTRetrain.ARQRetrain")
WtsULQRetrain = _message_class("AMCTRetrain.WtsULQRetrain")
PruneConfig = _message_class("AMCTRetrain.PruneConfig")
FilterPruner = _message_class("AMCTRetrain.FilterPruner")
BalancedL2NormFilterPruner = _message_class("AMCTRetrain.BalancedL2NormFilterPruner")
NOutOfMPruner = _message_class("AMCTRetrain.NOutOfMPruner")
L1SelectivePruner = _message_class("AMCTRetrain.L1SelectivePruner")

SingleLayerRecord = _message_class("SingleLayerRecord")
SingleLayerKVCacheRecord = _message_class("SingleLayerKVCacheRecord")
MapFiledEntry = _message_class("MapFiledEntry")
ScaleOffsetRecord = _message_class("ScaleOffsetRecord")
PruneRecord = _message_class("PruneRecord")
PruneNode = _message_class("PruneNode")
AttrProto = _message_class("AMCTProto.AttrProto")
AMCTQuantCaliConfig = _message_class("AMCTQuantCaliConfig")
KVCacheQuantConfig = _message_class("KVCacheQuantConfig")
KVOverrideLayer = _message_class("KVOverrideLayer")
KVDataQuantConfig = _message_class("KVDataQuantConfig")
AutoChannelPruneConfig = _message_class("AMCTProto.AutoChannelPruneConfig")
AMCTDistillConfig = _message_class("AMCTPytorchDistillProto.AMCTDistillConfig")
DistillGroup = _message_class("AMCTPytorchDistillProto.DistillGroup")
DistillWeightQuantConfig = _message_class("AMCTPytorchDistillProto.DistillWeightQuantConfig")
DistillOverrideLayer = _message_class("AMCTPytorchDistillProto.DistillOverrideLayer")
DistillOverrideLayerType = _message_class("AMCTPytorchDistillProto.DistillOverrideLayerType")


class _EnumNames:
    """Tiny stand-in for a generated enum wrapper: ``E.INT8 == 1``, ``E.Name(1) == 'INT8'``."""

    def __init__(self, desc: Any):
        self.DESCRIPTOR = desc
        for value in desc.values:
            setattr(self, value.name, value.number)

    def Name(self, number: int) -> str:  # noqa: N802 (protobuf's spelling)
        return self.DESCRIPTOR.values_by_number[number].name

    def Value(self, name: str) -> int:  # noqa: N802
        return self.DESCRIPTOR.values_by_name[name].number

    def names(self) -> list[str]:
        return [v.name for v in self.DESCRIPTOR.values]


CalibrationDataType = _EnumNames(POOL.FindEnumTypeByName("CalibrationDataType"))
FakequantPrecisionMode = _EnumNames(POOL.FindEnumTypeByName("FakequantPrecisionMode"))
DataType = _EnumNames(POOL.FindEnumTypeByName("AMCTRetrain.DataType"))
NOutOfMType = _EnumNames(POOL.FindEnumTypeByName("AMCTRetrain.NOutOfMType"))
#: AMCT calls it ``AttrProto.AttrType``; the alias is the name used in this project's docs.
AttributeType = _EnumNames(POOL.FindEnumTypeByName("AMCTProto.AttrProto.AttrType"))


# -- text format ------------------------------------------------------------------------------------
_UNKNOWN_FIELD = re.compile(r'Message type "([\w.]+)" has no field named "([^"]*)"')
_UNKNOWN_ENUM = re.compile(r'Enum type "([\w.]+)" has no value (?:named|with number) ([^.\s]+)')
_MULTIPLE = re.compile(r'Message type "([\w.]+)" should not have multiple "(\w+)" fields')
_ONEOF = re.compile(r'Field "(\w+)" is specified along with field "(\w+)", another member of oneof "(\w+)"')
_FD = descriptor_pb2.FieldDescriptorProto
_TYPE_WORDS = {
    _FD.TYPE_FLOAT: "a number (float32)", _FD.TYPE_DOUBLE: "a number",
    _FD.TYPE_INT32: "an integer in [-2147483648, 2147483647]", _FD.TYPE_INT64: "a 64-bit integer",
    _FD.TYPE_UINT32: "an integer in [0, 4294967295]", _FD.TYPE_UINT64: "a non-negative 64-bit integer",
    _FD.TYPE_BOOL: "true or false", _FD.TYPE_STRING: "a quoted string", _FD.TYPE_BYTES: "a quoted string",
}


def _fields_below(desc: Any, out: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every field name reachable from message ``desc`` (first occurrence wins)."""
    out = {} if out is None else out
    for f in desc.fields:
        if f.name not in out:
            out[f.name] = f
            if f.message_type is not None:
                _fields_below(f.message_type, out)
    return out


def _describe(field: Any) -> str:
    if field.enum_type is not None:
        return "one of " + ", ".join(v.name for v in field.enum_type.values)
    if field.message_type is not None:
        return f"a {{ ... }} block ({field.message_type.name})"
    return _TYPE_WORDS.get(field.type, "a valid value")


def _explain(err: text_format.ParseError, source: str, text: str, root: Any) -> ConfigError:
    """Turn a text_format error into a ConfigError naming the field or value at fault."""
    line, col = err.GetLine(), err.GetColumn()
    where = source if line is None else f"{source}: line {line}, column {col}"
    msg = re.sub(r"^\s*\d+:\d+\s*:\s*", "", str(err))   # str(err) is "LINE:COL : message"
    line_text = text.splitlines()[line - 1] if line and line <= len(text.splitlines()) else ""
    # Errors on the current token are prefixed with "'<rest of the line>': ".
    m = re.match(r"^'(.*?)': (.*)$", msg, re.S)
    if m and (not line_text or m.group(1) in line_text or line_text.strip() in m.group(1)):
        msg = m.group(2)
    m = _UNKNOWN_FIELD.search(msg)
    if m:
        desc = POOL.FindMessageTypeByName(m.group(1))
        return ConfigError(where, m.group(2), f"a field of {desc.name}: " + ", ".join(f.name for f in desc.fields))
    m = _UNKNOWN_ENUM.search(msg)
    if m:
        try:
            names = ", ".join(v.name for v in POOL.FindEnumTypeByName(m.group(1)).values)
        except KeyError:
            names = "a value of " + m.group(1)
        return ConfigError(where, m.group(2), f"one of {names}")
    m = _MULTIPLE.search(msg)
    if m:
        return ConfigError(where, m.group(2), f"at most one '{m.group(2)}' in one {m.group(1)} (it is not repeated)")
    m = _ONEOF.search(msg)
    if m:
        return ConfigError(where, m.group(1), f"only one of the oneof '{m.group(3)}'; '{m.group(2)}' is already given")
    # A bad value: name the field (the identifier before the value on that line) and what it takes.
    before = line_text[: max(col - 1, 0)] if col else ""
    fm = re.search(r"(\w+)\s*:?\s*$", before)
    field = _fields_below(root.DESCRIPTOR).get(fm.group(1)) if fm else None
    vm = re.match(r"(?:Couldn't parse [\w ]+|Value out of range|Expected string but found|Invalid \w+ value)"
                  r"[:\s]*(.*)$", msg)
    bad = (vm.group(1).strip() if vm and vm.group(1).strip() else None)
    if bad is None:
        tm = re.match(r"\s*(\S+)", line_text[max(col - 1, 0):]) if col else None
        bad = tm.group(1) if tm else msg
    if field is not None and field.message_type is None:
        return ConfigError(f"{where}: {field.name}", bad.strip("'"), f"{_describe(field)} ({msg})")
    return ConfigError(where, bad, f"valid protobuf text of {root.DESCRIPTOR.name} ({msg})")


def parse_text(text: str, message_cls: type[M], source: str = "<text>", *, merge: bool = False) -> M:
    """Parse protobuf text into a new ``message_cls``; errors become :class:`ConfigError`.

    The error message names ``source`` (a file name), the line and column, and the unknown field or
    bad value, e.g. ``calib.cfg: line 3, column 1: got 'batchnum'; allowed: a field of AMCTConfig: ...``.
    Missing required fields are reported with their path in the message.

    ``merge=True`` uses ``text_format.Merge`` (a non-repeated field given twice: the last one wins; this
    is how AMCT reads its record files); otherwise ``text_format.Parse`` rejects such repeats.
    """
    msg = message_cls()
    try:
        (text_format.Merge if merge else text_format.Parse)(text, msg, descriptor_pool=POOL)
    except text_format.ParseError as err:
        raise _explain(err, source, text, msg) from None
    missing = msg.FindInitializationErrors()
    if missing:
        raise ConfigError(f"{source}: {missing[0]}", None,
                          "a value: the field is required"
                          + (f" (also missing: {', '.join(missing[1:])})" if len(missing) > 1 else ""))
    return msg


def to_text(msg: message.Message) -> str:
    """Protobuf text of ``msg`` as AMCT writes it (``text_format.MessageToString(msg, as_utf8=True)``).

    float fields are written with the shortest decimal that reads back as the same float32.
    """
    return text_format.MessageToString(msg, as_utf8=True, descriptor_pool=POOL)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically: a temp file in the same folder, then ``os.replace``.

    If anything fails the temp file is removed and an existing ``path`` is left untouched. A new file
    gets the usual ``0o666 & ~umask`` mode; an existing one keeps its mode.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
