"""AMCT file formats: .cfg (protobuf text), PTQ JSON, and the record file. Round trips and error messages."""

from __future__ import annotations

import json
import os
import random
import re
import struct

import pytest

from amct_torch.config import ConfigError, PerChannel, PerGroup, PerTensor, PerToken, QuantConfig
from amct_torch.config import amct_proto as pb
from amct_torch.config.amct_cfg import (CalibrationCfg, read_calibration_cfg, resolve_layer_configs,
                                        write_calibration_cfg)
from amct_torch.config.amct_json import AmctGlobal, parse_quant_json, read_quant_json, write_quant_json
from amct_torch.config.record import KVCacheRecord, LayerRecord, Record, read_record, write_record

# The simplified config example of amct.md section 2.2, verbatim.
CFG_EXAMPLE = """\
batch_num : 2
activation_offset : true
skip_layers : "Opname"
skip_layer_types : "Optype"
common_config : { arq_quantize : { channel_wise : true  quant_bits : 7 }
                  ifmr_quantize : { search_range_start : 0.7 search_range_end : 1.3 search_step : 0.01
                                    max_percentile : 0.999999 min_percentile : 0.999999 asymmetric : true }
                  dmq_balancer : { migration_strength : 0.5 } }
override_layer_types : { layer_type : "Conv2d" calibration_config : { arq_quantize : { channel_wise : false quant_bits : 6 } } }
override_layer_configs : { layer_name : "Opname" calibration_config : { hfmg_quantize : { num_of_bins : 4096 } } }
"""

# The record examples of amct.md section 3 (the elided "…" consumer attrs left out).
RECORD_EXAMPLE = """\
record { key: "conv1" value { scale_d: 0.0798481479 offset_d: 1 scale_w: 0.00297622895 offset_w: 0 skip_fusion: true dst_type: "INT8" } }
record { key: "layer1.0.conv1" value { scale_d: 0.00392156886 offset_d: -128 scale_w: 0.00106807391 scale_w: 0.00104224426 offset_w: 0 offset_w: 0 } }
record { key: "linear_1" value { scale_d: 0.00784554612 offset_d: -1 scale_w: 0.00778095098 offset_w: 0
                                 tensor_balance_factor: 0.948409557 tensor_balance_factor: 0.984379828 } }
prune_record { producer { name: "conv1" attr { name: "type" type: STRING s: "Conv2d" } attr { name: "begin" type: INT i: 0 }
                          attr { name: "end" type: INT i: 64 } }
               consumer { name: "BN_1" attr { name: "type" type: STRING s: "FusedBatchNormV3" } } }
prune_record { selective_prune { name: "conv1" attr { name: "mask_shape" type: INTS ints: 3 ints: 3 ints: 3 ints: 32 } } }
"""

# The JSON example of amct.md section 2.1, verbatim.
JSON_EXAMPLE = """\
{ "version": 1, "batch_num": 2, "activation_offset": true, "do_fusion": true, "skip_fusion_layers": [],
  "conv1": { "quant_enable": true, "dmq_balancer_param": 0.5,
             "activation_quant_params": { "num_bits": 8, "max_percentile": 0.999999, "min_percentile": 0.999999,
                                          "search_range": [0.7, 1.3], "search_step": 0.01, "act_algo": "ifmr", "asymmetric": false },
             "weight_quant_params": { "num_bits": 8, "wts_algo": "arq_quantize", "channel_wise": true } },
  "fc":    { "quant_enable": true, "activation_quant_params": { "num_bits": 8, "act_algo": "hfmg", "num_of_bins": 4096, "asymmetric": false },
             "weight_quant_params": { "num_bits": 8, "wts_algo": "arq_quantize", "channel_wise": false } } }
"""


def f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


def bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


def lit(text: str) -> str:
    return re.escape(text)


# ==== amct_proto ======================================================================================
def test_types_live_in_a_private_pool():
    from google.protobuf import descriptor_pool
    with pytest.raises(KeyError):
        descriptor_pool.Default().FindMessageTypeByName("AMCTConfig")
    assert pb.POOL.FindMessageTypeByName("ScaleOffsetRecord").fields_by_name["record"].number == 1


def test_schema_numbers_and_defaults_follow_amct():
    d = pb.SingleLayerRecord.DESCRIPTOR
    numbers = {f.name: f.number for f in d.fields}
    assert numbers == {"scale_d": 1, "offset_d": 2, "scale_w": 3, "offset_w": 4, "shift_bit": 5,
                       "tensor_balance_factor": 6, "skip_fusion": 9, "dst_type": 10, "act_type": 11, "wts_type": 12,
                       "fakequant_precision_mode": 13, "scale_h": 21, "offset_h": 22, "scale_r": 23, "offset_r": 24}
    assert pb.SingleLayerRecord().dst_type == "INT8"
    cfg = pb.AMCTConfig()
    assert (cfg.batch_num, cfg.activation_offset, cfg.do_fusion) == (1, True, True)
    assert pb.ADAquantize().num_iteration == 10000 and pb.ADAquantize().beta_range_start == 20
    assert pb.HFMGQuantize().num_of_bins == 4096 and pb.FMRQuantize().dst_type == pb.CalibrationDataType.INT8
    assert pb.AMCTConfig.DESCRIPTOR.fields_by_name["override_layer_configs"].number == 100
    assert {f.name: f.containing_oneof.name for f in pb.CalibrationConfig.DESCRIPTOR.fields} == {
        "arq_quantize": "wts_quant_algo", "ada_quantize": "wts_quant_algo", "ifmr_quantize": "acts_quant_algo",
        "hfmg_quantize": "acts_quant_algo", "dmq_balancer": "tensor_balancer"}
    assert pb.FakequantPrecisionMode.FORCE_FP16_QUANT == 1
    assert pb.AttributeType.names()[1:] == ["FLOAT", "INT", "STRING", "FLOATS", "INTS", "STRINGS"]


def test_parse_cfg_example_of_amct_md():
    cfg = pb.parse_text(CFG_EXAMPLE, pb.AMCTConfig, "example.cfg")
    assert cfg.batch_num == 2 and list(cfg.skip_layers) == ["Opname"] and list(cfg.skip_layer_types) == ["Optype"]
    assert cfg.common_config.arq_quantize.quant_bits == 7
    assert cfg.common_config.ifmr_quantize.HasField("asymmetric")
    assert cfg.common_config.dmq_balancer.migration_strength == f32(0.5)
    assert cfg.override_layer_types[0].calibration_config.arq_quantize.quant_bits == 6
    assert cfg.override_layer_configs[0].calibration_config.WhichOneof("acts_quant_algo") == "hfmg_quantize"
    again = pb.parse_text(pb.to_text(cfg), pb.AMCTConfig, "again.cfg")
    assert again == cfg


@pytest.mark.parametrize("text, expected", [
    ("batch_num: 2\nbatchnum: 3\n", ["bad.cfg: line 2, column 1", "'batchnum'", "a field of AMCTConfig", "batch_num"]),
    ("batch_num: -1\n", ["bad.cfg: line 1, column 12", "batch_num", "'-1'", "[0, 4294967295]"]),
    ("common_config {\n  ada_quantize { reg_param: x }\n}\n", ["bad.cfg: line 2, column 29", "reg_param", "'x'", "float"]),
    ("fakequant_precision_mode: FP8\n", ["bad.cfg: line 1, column 27", "'FP8'", "DEFAULT, FORCE_FP16_QUANT"]),
    ("do_fusion: maybe\n", ["bad.cfg: line 1, column 12", "do_fusion", "'maybe'", "true or false"]),
    ("common_config { ifmr_quantize {} hfmg_quantize {} }", ["bad.cfg: line 1, column 34", "'hfmg_quantize'",
                                                             "acts_quant_algo", "ifmr_quantize"]),
    ("batch_num: 1 batch_num: 2", ["bad.cfg: line 1, column 25", "'batch_num'", "not repeated"]),
    ("common_config {\n", ["bad.cfg: line 1", 'Expected "}"']),
    ('override_layer_configs { layer_name: "conv1" }', ["bad.cfg", "override_layer_configs[0].calibration_config",
                                                        "required"]),
])
def test_parse_errors_name_file_line_column_and_culprit(text, expected):
    with pytest.raises(ConfigError) as info:
        pb.parse_text(text, pb.AMCTConfig, "bad.cfg")
    for part in expected:
        assert part in str(info.value), (part, str(info.value))


# ==== record ============================================================================================
def test_read_amct_record_examples():
    rec = Record.from_text(RECORD_EXAMPLE, "record.txt")
    conv1 = rec.layers["conv1"]
    assert conv1.scale_d == f32(0.0798481479) and conv1.offset_d == 1
    assert conv1.scale_w == [f32(0.00297622895)] and conv1.offset_w == [0]
    assert conv1.skip_fusion is True and conv1.dst_type == "INT8" and conv1.act_type is None
    l1 = rec.layers["layer1.0.conv1"]
    assert l1.scale_w == [f32(0.00106807391), f32(0.00104224426)] and l1.offset_d == -128
    assert rec.layers["linear_1"].tensor_balance_factor == [f32(0.948409557), f32(0.984379828)]
    assert rec.prune_records[0] == {
        "producer": [{"name": "conv1", "attrs": {"type": "Conv2d", "begin": 0, "end": 64}}],
        "consumer": [{"name": "BN_1", "attrs": {"type": "FusedBatchNormV3"}}]}
    assert rec.prune_records[1] == {"producer": [], "consumer": [],
                                    "selective_prune": {"name": "conv1", "attrs": {"mask_shape": [3, 3, 3, 32]}}}
    assert rec.problems() == []


def _random_f32(rng: random.Random) -> float:
    while True:  # any finite float32 bit pattern: normals, subnormals, huge, tiny, negative
        x = struct.unpack("<f", struct.pack("<I", rng.getrandbits(32)))[0]
        if x == x and abs(x) != float("inf"):
            return x


def test_record_round_trip_keeps_every_float32_bit(tmp_path):
    rng = random.Random(0)
    rec = Record()
    for i in range(20):
        rec.set_layer(f"layer{i}.conv", scale_d=_random_f32(rng), offset_d=rng.randint(-128, 127),
                      scale_w=[_random_f32(rng) for _ in range(rng.randint(1, 64))],
                      tensor_balance_factor=[_random_f32(rng) for _ in range(8)], skip_fusion=bool(i % 2),
                      act_type="INT8", wts_type="INT4" if i % 3 else "INT8")
        rec.layers[f"layer{i}.conv"].offset_w = [0] * len(rec.layers[f"layer{i}.conv"].scale_w)
    rec.set_layer("lstm", scale_d=0.5, offset_d=3, scale_w=[0.25, 0.125], offset_w=[0, 0],
                  scale_h=f32(0.1), offset_h=-7, scale_r=[f32(1e-3), f32(3e-38)], offset_r=[0, 0],
                  fakequant_precision_mode="FORCE_FP16_QUANT", shift_bit=[1, 2])
    rec.set_layer("edge", scale_d=struct.unpack("<f", struct.pack("<I", 1))[0],  # smallest subnormal
                  scale_w=[3.4028234663852886e38, -0.0, 0.0])
    rec.set_kv_cache("k_cache", [_random_f32(rng) for _ in range(16)], [rng.randint(-128, 127) for _ in range(16)])
    rec.set_kv_cache("conv1", [0.75], [0])  # a key with both value and kv_cache_value
    rec.set_layer("conv1", scale_d=0.5)
    rec.prune_records.append({"producer": [{"name": "conv1", "attrs": {"type": "Conv2d", "begin": 0, "end": 64,
                                                                       "ratio": f32(0.3), "keep": [1, 0, 1]}}],
                              "consumer": [{"name": "bn1", "attrs": {"names": ["a", "b"], "w": [f32(0.1), 2.5]}}]})
    rec.prune_records.append({"producer": [], "consumer": [],
                              "selective_prune": {"name": "conv2", "attrs": {"mask_shape": [3, 3, 3, 32],
                                                                             "empty": ("FLOATS", [])}}})
    path = tmp_path / "record.txt"
    write_record(rec, path)
    back = read_record(path)
    for name, layer in rec.layers.items():
        got = back.layers[name]
        for key in ("scale_d", "scale_h"):
            if getattr(layer, key) is not None:
                assert bits(getattr(got, key)) == bits(getattr(layer, key)), (name, key)
        for key in ("scale_w", "tensor_balance_factor", "scale_r"):
            assert [bits(v) for v in getattr(got, key)] == [bits(v) for v in getattr(layer, key)], (name, key)
    assert back.layers == rec.layers
    assert back.kv_cache == rec.kv_cache
    assert [bits(v) for v in back.kv_cache["k_cache"].scale] == [bits(v) for v in rec.kv_cache["k_cache"].scale]
    assert back.prune_records[0] == rec.prune_records[0]
    # an empty list keeps its type as a ("TYPE", []) pair (a bare [] would be written as INTS)
    assert back.prune_records[1]["selective_prune"]["attrs"] == {"mask_shape": [3, 3, 3, 32], "empty": ("FLOATS", [])}
    # written twice, identical bytes
    write_record(back, tmp_path / "again.txt")
    assert (tmp_path / "again.txt").read_text() == path.read_text()


def test_record_is_written_in_amct_layout(tmp_path):
    rec = Record()
    rec.set_layer("conv1", scale_d=f32(0.0798481479), offset_d=1, scale_w=[f32(0.00297622895)], offset_w=[0],
                  skip_fusion=True, dst_type="INT8")
    rec.set_kv_cache("matmul1", [0.5], [0])
    write_record(rec, tmp_path / "r.txt")
    assert (tmp_path / "r.txt").read_text() == (
        'record {\n  key: "conv1"\n  value {\n    scale_d: 0.07984815\n    offset_d: 1\n'
        '    scale_w: 0.002976229\n    offset_w: 0\n    skip_fusion: true\n    dst_type: "INT8"\n  }\n}\n'
        'record {\n  key: "matmul1"\n  kv_cache_value {\n    scale: 0.5\n    offset: 0\n  }\n}\n')


def test_duplicated_keys_merge_field_by_field_later_wins():
    text = RECORD_EXAMPLE + (
        'record { key: "conv1" value { scale_d: 0.5 scale_w: 0.25 scale_w: 0.125 offset_w: 0 offset_w: 0 } }\n'
        'record { key: "conv1" value { scale_d: 0.0625 scale_d: 0.75 } }\n')
    conv1 = Record.from_text(text).layers["conv1"]
    assert conv1.scale_d == 0.75                      # last of all (within one entry too)
    assert conv1.scale_w == [0.25, 0.125]             # replaced as a whole, not concatenated
    assert conv1.offset_d == 1 and conv1.skip_fusion is True  # not set later: kept from the first entry


def test_nonzero_offset_w_is_read_and_reported_by_validate():
    rec = Record.from_text('record { key: "fc" value { scale_d: 0.1 offset_d: 0 scale_w: 0.2 offset_w: 3 } }')
    assert rec.layers["fc"].offset_w == [3]
    assert rec.problems() == ["layer 'fc' offset_w: got [3]; allowed: 0 (weights are symmetric)"]
    with pytest.raises(ConfigError, match=lit("layer 'fc' offset_w: got [3]")):
        rec.validate()
    bad = Record.from_text('record { key: "c" value { scale_d: -1 offset_d: 300 scale_w: 0.1 scale_w: 0.2 offset_w: 0 '
                           'act_type: "INT5" } } record { key: "k" kv_cache_value { scale: 0 offset: 0 offset: 1 } }')
    problems = " | ".join(bad.problems())
    for part in ("scale_d: got -1.0", "offset_d: got 300", "offset_w: got 1 values", "act_type: got 'INT5'",
                 "kv_cache 'k' scale: got 0.0", "kv_cache 'k' offset: got 2 values"):
        assert part in problems


@pytest.mark.parametrize("text, expected", [
    ('record { key: "conv1" value { scale_d: 0.1 } }\nrecord { key: "fc" value { scale_x: 1 } }\n',
     ["record.txt: line 2, column 28", "'scale_x'", "a field of SingleLayerRecord"]),
    ('record {\n  key: "conv1"\n  value { offset_d: 1.5 }\n}\n', ["record.txt: line 3, column 21", "offset_d", "'1.5'"]),
    ('record { key: "conv1" value { scale_d: 0.1 } }\nrecord {\n  value { scale_d: 0.2 }\n}\n',
     ["record.txt: line 2", "key", "every record entry needs key"]),
    ('record { key: "conv1" }\n', ["record.txt: line 1", "record 'conv1'", "no value"]),
    ('prune_record { producer { attr { name: "type" } } }', ["record.txt", "prune_record[0].producer[0].name",
                                                             "required"]),
    ('record { key: "conv1" value { scale_d: 0.1 } ', ["record.txt: line 1", 'Expected "}"']),
])
def test_malformed_record_errors_name_file_line_and_problem(tmp_path, text, expected):
    path = tmp_path / "record.txt"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        read_record(path)
    for part in expected:
        assert part in str(info.value), (part, str(info.value))


def test_write_record_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "record.txt"
    good = Record()
    good.set_layer("conv1", scale_d=0.5, offset_d=0)
    write_record(good, path)
    before = path.read_text()

    bad = Record()
    bad.set_layer("conv1", offset_d=2 ** 40)  # does not fit int32: fails before the file is touched
    with pytest.raises(ConfigError, match=lit("Record.layers['conv1'].offset_d")):
        write_record(bad, path)
    assert path.read_text() == before

    def boom(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_record(Record(), path)
    assert path.read_text() == before
    assert os.listdir(tmp_path) == ["record.txt"]  # no temp file left behind


def test_record_merge_and_set_layer():
    a = Record()
    a.set_layer("conv1", scale_d=0.5, offset_d=3, scale_w=[0.1, 0.2], offset_w=[0, 0])
    a.prune_records.append({"producer": [{"name": "conv1", "attrs": {}}], "consumer": []})
    b = Record()
    b.set_layer("conv1", scale_w=[0.3], offset_w=[0], tensor_balance_factor=1.5)
    b.set_layer("fc", scale_d=0.25)
    b.set_kv_cache("k", 0.5)
    b.prune_records.append({"producer": [], "consumer": [{"name": "bn", "attrs": {"x": 1}}]})
    assert a.merge(b) is a
    assert a.layers["conv1"] == LayerRecord(scale_d=0.5, offset_d=3, scale_w=[0.3], offset_w=[0],
                                            tensor_balance_factor=[1.5])
    assert a.layers["fc"].scale_d == 0.25 and a.kv_cache["k"] == KVCacheRecord([0.5], [])
    assert len(a.prune_records) == 2
    a.set_layer("conv1", scale_d=None)
    assert a.layers["conv1"].scale_d is None
    with pytest.raises(ConfigError, match=lit("Record.set_layer('conv1').scale: got 1; allowed: no such field")):
        a.set_layer("conv1", scale=1)
    with pytest.raises(ConfigError, match=lit("Record.set_layer('conv1').offset_d: got 1.5; allowed: an integer")):
        a.set_layer("conv1", offset_d=1.5)


# ==== PTQ JSON ==========================================================================================
LAYERS = {
    "conv1": QuantConfig(dmq_balancer_param=0.35, activation_offset=False, batch_num=4),
    "layer1.0.conv1": QuantConfig(weight_bits=7, activation_calibrator="hfmg", num_of_bins=2048, batch_num=4),
    "layer1.0.conv2": QuantConfig(max_percentile=0.9999, min_percentile=0.999, search_range=(0.8, 1.2),
                                  search_step=0.05, batch_num=4),
    "fc": QuantConfig(weight_granularity=PerTensor(), activation_calibrator="minmax", batch_num=4),
    "head.0": QuantConfig(activation_calibrator="percentile", max_percentile=0.99, batch_num=4),
    "head.1": QuantConfig(activation_calibrator="mse", num_of_bins=8192, activation_bits=16, batch_num=4),
    "ada": QuantConfig(weight_algorithm="adaround", ada_num_iteration=500, ada_reg_param=0.02,
                       ada_beta_range=(16.0, 4.0), ada_warm_start=0.1, weight_granularity=PerTensor(), batch_num=4),
    "wonly": QuantConfig(activation_bits=None, weight_bits=4, batch_num=4),
    "skipped": None,
}


def test_json_round_trip(tmp_path):
    settings = AmctGlobal(batch_num=4, activation_offset=True, do_fusion=False, skip_fusion_layers=("conv1", "bn1"))
    path = tmp_path / "quant.json"
    write_quant_json(path, settings, LAYERS)
    got_settings, got_layers = read_quant_json(path)
    assert got_settings == settings
    assert got_layers == LAYERS and list(got_layers) == list(LAYERS)
    data = json.loads(path.read_text())
    assert data["skipped"] == {"quant_enable": False}
    assert data["conv1"]["dmq_balancer_param"] == 0.35 and "dmq_balancer_param" not in data["fc"]
    assert data["conv1"]["activation_quant_params"] == {
        "num_bits": 8, "max_percentile": 0.999999, "min_percentile": 0.999999, "search_range": [0.7, 1.3],
        "search_step": 0.01, "act_algo": "ifmr", "asymmetric": False}
    assert data["layer1.0.conv1"]["activation_quant_params"] == {"num_bits": 8, "num_of_bins": 2048,
                                                                 "act_algo": "hfmg", "asymmetric": True}
    assert data["fc"]["activation_quant_params"] == {"num_bits": 8, "act_algo": "minmax", "asymmetric": True}
    assert data["ada"]["weight_quant_params"] == {"num_bits": 8, "wts_algo": "ada_quantize", "num_iteration": 500,
                                                  "reg_param": 0.02, "beta_range": [16.0, 4.0], "warm_start": 0.1,
                                                  "channel_wise": False}
    assert data["fc"]["weight_quant_params"] == {"num_bits": 8, "wts_algo": "arq_quantize", "channel_wise": False}
    assert "activation_quant_params" not in data["wonly"]


def test_read_amct_json_example(tmp_path):
    settings, layers = parse_quant_json(JSON_EXAMPLE, "example.json")
    assert settings == AmctGlobal(batch_num=2)
    assert layers["conv1"] == QuantConfig(dmq_balancer_param=0.5, activation_offset=False, batch_num=2)
    assert layers["fc"] == QuantConfig(activation_calibrator="hfmg", activation_offset=False,
                                       weight_granularity=PerTensor(), batch_num=2)


def test_json_asymmetric_defaults_to_global_activation_offset():
    _, layers = parse_quant_json('{"activation_offset": false, "a": {"activation_quant_params": {"num_bits": 8}}}')
    assert layers["a"].activation_offset is False and layers["a"].activation_calibrator == "ifmr"


def _layer(act=None, wts=None, **extra):
    entry = {"quant_enable": True, **extra}
    entry["activation_quant_params"] = {"num_bits": 8, "act_algo": "ifmr", **(act or {})}
    entry["weight_quant_params"] = {"num_bits": 8, "wts_algo": "arq_quantize", "channel_wise": True, **(wts or {})}
    return entry


@pytest.mark.parametrize("data, expected", [
    ({"conv1": _layer({"act_algo": "hfmg", "num_of_bins": 1000})},
     "config.json: layer 'conv1' activation_quant_params.num_of_bins: got 1000; allowed: one of 1024, 2048, 4096, 8192"),
    ({"version": 2}, "config.json: version: got 2; allowed: 1"),
    ({"batch_num": 0}, "config.json: batch_num: got 0; allowed: an integer > 0"),
    ({"batch_num": "2"}, "config.json: batch_num: got '2'; allowed: an integer"),
    ({"batch_num": True}, "config.json: batch_num: got True; allowed: an integer"),
    ({"do_fusion": 1}, "config.json: do_fusion: got 1; allowed: true or false"),
    ({"skip_fusion_layers": "conv1"}, "config.json: skip_fusion_layers: got 'conv1'; allowed: a list of layer names"),
    ({"verison": 1}, "config.json: verison: got 1; allowed: a global key (version, batch_num"),
    ({"tensor_quantize": [1]}, "config.json: tensor_quantize: got [1]; allowed: not supported by amct_torch"),
    ({"conv1": {**_layer(), "quant_enabled": True}},
     "config.json: layer 'conv1' quant_enabled: got True; allowed: no such key; known keys: quant_enable,"),
    ({"conv1": {**_layer(), "quant_enable": "yes"}}, "config.json: layer 'conv1' quant_enable: got 'yes'; allowed: true or false"),
    ({"conv1": _layer(dmq_balancer_param=0.9)},
     "config.json: layer 'conv1' dmq_balancer_param: got 0.9; allowed: 0.2 <= dmq_balancer_param <= 0.8"),
    ({"conv1": _layer(dmq_balancer_param="0.5")}, "config.json: layer 'conv1' dmq_balancer_param: got '0.5'; allowed: a number"),
    ({"conv1": _layer({"max_percentile": 0.5})},
     "config.json: layer 'conv1' activation_quant_params.max_percentile: got 0.5; allowed: 0.5 < max_percentile <= 1"),
    ({"conv1": _layer({"min_percentile": 1.01})},
     "config.json: layer 'conv1' activation_quant_params.min_percentile: got 1.01; allowed: 0.5 < min_percentile <= 1"),
    ({"conv1": _layer({"search_range": [1.3, 0.7]})},
     "config.json: layer 'conv1' activation_quant_params.search_range: got [1.3, 0.7]; allowed: [start, end] with 0 < start < end"),
    ({"conv1": _layer({"search_range": [0, 1.3]})},
     "config.json: layer 'conv1' activation_quant_params.search_range: got [0, 1.3]; allowed: [start, end]"),
    ({"conv1": _layer({"search_range": [0.7]})},
     "config.json: layer 'conv1' activation_quant_params.search_range: got [0.7]; allowed: a list of two numbers"),
    ({"conv1": _layer({"search_step": 0.7})},
     "config.json: layer 'conv1' activation_quant_params.search_step: got 0.7; allowed: 0 < search_step <= search_range end - start (0.6)"),
    ({"conv1": _layer({"search_step": 0})}, "activation_quant_params.search_step: got 0; allowed: 0 < search_step"),
    ({"conv1": _layer({"num_bits": 9})}, "config.json: layer 'conv1' activation_quant_params.num_bits: got 9; allowed: one of 4, 8, 16"),
    ({"conv1": _layer(wts={"num_bits": 5})}, "config.json: layer 'conv1' weight_quant_params.num_bits: got 5; allowed: one of 4, 6, 7, 8, 16"),
    ({"conv1": _layer({"act_algo": "kl"})},
     "config.json: layer 'conv1' activation_quant_params.act_algo: got 'kl'; allowed: one of ifmr, hfmg, minmax, percentile, mse"),
    ({"conv1": _layer({"num_of_bins": 4096})},
     "config.json: layer 'conv1' activation_quant_params.num_of_bins: got 4096; allowed: no such key for act_algo 'ifmr'"),
    ({"conv1": _layer({"asymmetric": 1})}, "config.json: layer 'conv1' activation_quant_params.asymmetric: got 1; allowed: true or false"),
    ({"conv1": _layer(wts={"wts_algo": "nuq_quantize"})},
     "config.json: layer 'conv1' weight_quant_params.wts_algo: got 'nuq_quantize'; allowed: one of arq_quantize, ada_quantize"),
    ({"conv1": _layer(wts={"num_iteration": 10})},
     "config.json: layer 'conv1' weight_quant_params.num_iteration: got 10; allowed: no such key for wts_algo 'arq_quantize'"),
    ({"conv1": _layer(wts={"wts_algo": "ada_quantize", "beta_range": [2, 20]})},
     "config.json: layer 'conv1' weight_quant_params.beta_range: got [2, 20]; allowed: [start, end] with start > end > 0"),
    ({"conv1": _layer(wts={"wts_algo": "ada_quantize", "warm_start": 1.0})},
     "config.json: layer 'conv1' weight_quant_params.warm_start: got 1.0; allowed: 0 <= warm_start < 1"),
    ({"conv1": _layer(wts={"wts_algo": "ada_quantize", "num_iteration": 0})},
     "config.json: layer 'conv1' weight_quant_params.num_iteration: got 0; allowed: an integer > 0"),
    ({"conv1": _layer(wts={"channel_wise": "true"})},
     "config.json: layer 'conv1' weight_quant_params.channel_wise: got 'true'; allowed: true or false"),
    ({"conv1": {"quant_enable": True, "activation_quant_params": [8]}},
     "config.json: layer 'conv1' activation_quant_params: got [8]; allowed: an object"),
])
def test_json_errors_name_file_layer_key_and_value(tmp_path, data, expected):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError) as info:
        read_quant_json(path)
    assert expected in str(info.value)
    assert str(path) in str(info.value)


def test_json_syntax_and_duplicate_key_errors(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"version": 1,\n "conv1": {"quant_enable": true,}\n}')
    with pytest.raises(ConfigError, match=lit("config.json: line 2, column 33: got '}")):
        read_quant_json(path)
    path.write_text('{"conv1": {"quant_enable": true}, "conv1": {"quant_enable": false}}')
    with pytest.raises(ConfigError, match=lit("config.json: key 'conv1': got 'given twice'")):
        read_quant_json(path)


def test_json_write_rejects_what_amct_cannot_spell_and_is_atomic(tmp_path):
    path = tmp_path / "q.json"
    write_quant_json(path, AmctGlobal(), {"a": QuantConfig()})
    before = path.read_text()
    with pytest.raises(ConfigError, match=lit("layer 'b' weight_granularity: got {'per_group': 32}")):
        write_quant_json(path, AmctGlobal(), {"a": QuantConfig(), "b": QuantConfig(weight_bits=4,
                                                                                 weight_granularity=PerGroup(32))})
    with pytest.raises(ConfigError, match=lit("layer 'b' activation_granularity: got 'per_token'")):
        write_quant_json(path, AmctGlobal(), {"b": QuantConfig(activation_granularity=PerToken())})
    with pytest.raises(ConfigError, match=lit("layer name: got 'batch_num'")):
        write_quant_json(path, AmctGlobal(), {"batch_num": QuantConfig()})
    assert path.read_text() == before and os.listdir(tmp_path) == ["q.json"]
    with pytest.raises(ConfigError, match=lit("AmctGlobal.version: got 2; allowed: 1")):
        AmctGlobal(version=2)


# ==== simplified .cfg ===================================================================================
def resolve(text: str, layers: dict[str, str], source: str = "<cfg text>"):
    return resolve_layer_configs(CalibrationCfg.from_text(text, source), layers)


def test_resolve_amct_md_example():
    settings, out = resolve(CFG_EXAMPLE, {"Opname": "Conv2d", "conv1": "Conv2d", "pool": "Optype"})
    assert settings == AmctGlobal(batch_num=2, activation_offset=True)
    assert out["Opname"] is None and out["pool"] is None  # skip_layers / skip_layer_types beat overrides
    assert out["conv1"] == QuantConfig(weight_bits=6, weight_granularity=PerTensor(), dmq_balancer_param=0.5,
                                       batch_num=2, activation_offset=True)
    # float32 values from the cfg come back as the decimals that were written
    assert out["conv1"].search_step == 0.01 and out["conv1"].max_percentile == 0.999999


def test_precedence_name_over_type_over_common_over_global():
    cfg = """
    activation_offset: false
    common_config { arq_quantize { channel_wise: false } hfmg_quantize { num_of_bins: 2048 } }
    override_layer_types { layer_type: "Conv2d" calibration_config { hfmg_quantize { num_of_bins: 1024 asymmetric: true } } }
    override_layer_types { layer_type: "Linear" calibration_config { ifmr_quantize { search_step: 0.02 } } }
    override_layer_configs { layer_name: "conv2" calibration_config { hfmg_quantize { num_of_bins: 8192 asymmetric: false } } }
    override_layer_configs { layer_name: "fc2" calibration_config { arq_quantize { channel_wise: true } } }
    """
    _, out = resolve(cfg, {"conv1": "Conv2d", "conv2": "Conv2d", "fc1": "Linear", "fc2": "Linear", "pool": "AvgPool2d"})
    assert list(out) == ["conv1", "conv2", "fc1", "fc2", "pool"]
    # global only, plus common_config
    assert out["pool"] == QuantConfig(activation_offset=False, activation_calibrator="hfmg", num_of_bins=2048,
                                      weight_granularity=PerTensor())
    # type override beats common (bins, and asymmetric beats the global activation_offset)
    assert out["conv1"] == out["pool"].replace(num_of_bins=1024, activation_offset=True)
    # name override beats type override
    assert out["conv2"] == out["pool"].replace(num_of_bins=8192, activation_offset=False)
    # switching the algorithm keeps the fields the level does not set (num_of_bins stays 2048, unused)
    assert out["fc1"] == out["pool"].replace(activation_calibrator="ifmr", search_step=0.02)
    assert out["fc2"] == out["fc1"].replace(weight_granularity=PerChannel())


def test_partial_overrides_merge_field_by_field():
    cfg = """
    common_config { ada_quantize { num_iteration: 500 beta_range_start: 10 channel_wise: false }
                    ifmr_quantize { search_range_start: 0.6 max_percentile: 0.9999 asymmetric: false }
                    dmq_balancer { migration_strength: 0.3 } }
    override_layer_types { layer_type: "Conv2d" calibration_config { ada_quantize { beta_range_end: 4 }
                                                                     ifmr_quantize { search_range_end: 1.5 } } }
    override_layer_configs { layer_name: "c" calibration_config { dmq_balancer { } ada_quantize { reg_param: 0.05 } } }
    """
    _, out = resolve(cfg, {"c": "Conv2d", "d": "Conv2d", "fc": "Linear"})
    base = dict(weight_algorithm="adaround", ada_num_iteration=500, weight_granularity=PerTensor(),
                max_percentile=0.9999, activation_offset=False)
    assert out["fc"] == QuantConfig(**base, ada_beta_range=(10.0, 2.0), search_range=(0.6, 1.3), dmq_balancer_param=0.3)
    assert out["d"] == QuantConfig(**base, ada_beta_range=(10.0, 4.0), search_range=(0.6, 1.5), dmq_balancer_param=0.3)
    # an empty dmq_balancer {} sets the proto default 0.5; the ada fields from below are kept
    assert out["c"] == out["d"].replace(dmq_balancer_param=0.5, ada_reg_param=0.05)


def test_unset_everything_gives_quantconfig_defaults_and_global_keys():
    settings, out = resolve('batch_num: 3 do_fusion: false skip_fusion_layers: "bn1"', {"a": "Linear"})
    assert settings == AmctGlobal(batch_num=3, do_fusion=False, skip_fusion_layers=("bn1",))
    assert out["a"] == QuantConfig(batch_num=3)


@pytest.mark.parametrize("text, layers, expected", [
    ('override_layer_configs { layer_name: "conv9" calibration_config { } }', {"conv1": "Conv2d"},
     "my.cfg: override_layer_configs[0].layer_name: got 'conv9'; allowed: a layer of the model (conv1)"),
    ('override_layer_types { layer_type: "Conv3d" calibration_config { } }', {"conv1": "Conv2d"},
     "my.cfg: override_layer_types[0].layer_type: got 'Conv3d'; allowed: a layer type of the model (Conv2d)"),
    ('skip_layers: "conv1" skip_layers: "cnov2"', {"conv1": "Conv2d", "conv2": "Conv2d"},
     "my.cfg: skip_layers[1]: got 'cnov2'; allowed: a layer of the model (conv1, conv2)"),
    ('common_config { arq_quantize { quant_bits: 7 } }', {"conv1": "Conv2d", "fc": "Linear"},
     "my.cfg: layer 'fc' (Linear) common_config.arq_quantize.quant_bits: got 7; allowed: 4, 8 or 16 (6 and 7 only for Conv2d)"),
    ('override_layer_types { layer_type: "Linear" calibration_config { arq_quantize { quant_bits: 6 } } }',
     {"fc": "Linear"}, "my.cfg: layer 'fc' (Linear) override_layer_types[0] (Linear).calibration_config.arq_quantize.quant_bits: got 6"),
    ('common_config { arq_quantize { quant_bits: 5 } }', {"conv1": "Conv2d"},
     "my.cfg: layer 'conv1' (Conv2d) common_config.arq_quantize.quant_bits: got 5; allowed: one of 4, 6, 7, 8, 16"),
    ('override_layer_configs { layer_name: "c" calibration_config { hfmg_quantize { num_of_bins: 1000 } } }', {"c": "Conv2d"},
     "my.cfg: layer 'c' (Conv2d) override_layer_configs[0].calibration_config.hfmg_quantize.num_of_bins: got 1000; "
     "allowed: one of 1024, 2048, 4096, 8192"),
    ('common_config { ifmr_quantize { max_percentile: 0.4 } }', {"c": "Conv2d"},
     "my.cfg: layer 'c' (Conv2d) common_config.ifmr_quantize.max_percentile: got 0.4; allowed: 0.5 < max_percentile <= 1"),
    ('common_config { dmq_balancer { migration_strength: 0.9 } }', {"c": "Conv2d"},
     "my.cfg: layer 'c' (Conv2d) common_config.dmq_balancer.migration_strength: got 0.9; allowed: 0.2 <= dmq_balancer_param <= 0.8"),
    ('batch_num: 0', {"c": "Conv2d"}, "my.cfg: batch_num: got 0; allowed: an integer > 0"),
])
def test_cfg_resolution_errors_name_file_layer_and_origin(text, layers, expected):
    with pytest.raises(ConfigError) as info:
        resolve(text, layers, "my.cfg")
    assert expected in str(info.value)


def test_quant_bits_6_allowed_for_conv2d_only_via_type_override():
    cfg = 'override_layer_types { layer_type: "Conv2d" calibration_config { arq_quantize { quant_bits: 6 } } }'
    _, out = resolve(cfg, {"conv": "Conv2d", "fc": "Linear"})
    assert out["conv"].weight_bits == 6 and out["fc"].weight_bits == 8


def test_cfg_file_read_write_round_trip(tmp_path):
    path = tmp_path / "calib.cfg"
    path.write_text(CFG_EXAMPLE)
    cfg = read_calibration_cfg(path)
    assert cfg.source == str(path) and cfg.message.batch_num == 2
    assert read_calibration_cfg(str(path)).message == cfg.message
    out = tmp_path / "out" / "written.cfg"
    write_calibration_cfg(cfg, out)
    assert read_calibration_cfg(out).message == cfg.message
    layers = {"Opname": "Conv2d", "conv1": "Conv2d"}
    assert resolve_layer_configs(read_calibration_cfg(out), layers) == resolve_layer_configs(cfg, layers)
    bad = pb.AMCTConfig()
    bad.override_layer_configs.add(layer_name="x")
    with pytest.raises(ConfigError, match=lit("override_layer_configs[0].calibration_config")):
        write_calibration_cfg(bad, out)
    assert read_calibration_cfg(out).message == cfg.message


def test_cfg_file_errors_name_the_file(tmp_path):
    path = tmp_path / "calib.cfg"
    path.write_text("batch_num: 2\ncommon_config {\n  hfmg_quantize { num_of_bin: 2048 }\n}\n")
    with pytest.raises(ConfigError) as info:
        read_calibration_cfg(path)
    assert f"{path}: line 3, column 19: got 'num_of_bin'; allowed: a field of HFMGQuantize: num_of_bins" in str(info.value)


def test_read_calibration_cfg_tells_text_from_path(tmp_path):
    assert read_calibration_cfg("batch_num: 3").message.batch_num == 3
    assert read_calibration_cfg("").message == pb.AMCTConfig()
    long_line = " ".join(f'skip_layers: "layer{i}"' for i in range(100))  # longer than NAME_MAX
    assert len(read_calibration_cfg(long_line).message.skip_layers) == 100
    with pytest.raises(FileNotFoundError):
        read_calibration_cfg(str(tmp_path / "missing.cfg"))
